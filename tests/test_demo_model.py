"""The real demo model (SmolLM2-135M-Instruct) end to end through hma.LLM."""

import json
from pathlib import Path

import pytest

from hma import LLM, SamplingParams
from hma.eval import Scorer
from hma.loading import apply_chat_template


@pytest.fixture(scope="module")
def llm(demo_model_path):
    return LLM(str(demo_model_path), device="cpu", kv_memory_gb=0.2)


def test_demo_model_knows_the_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its answer with EOS


def test_text_prompts_batch_and_stop_strings(llm):
    params = SamplingParams(max_tokens=16, temperature=0.0)
    prompts = ["The capital of France is", "One, two, three, four,", "def add(a, b):"]
    batched = llm.generate(prompts, params, use_tqdm=False)
    alone = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    counting = batched[1].text
    stop = counting.strip().split()[1]  # a word the greedy run produces
    cut = llm.generate(prompts[1], SamplingParams(max_tokens=16, temperature=0.0, stop=[stop]),
                       use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert stop not in cut.text and counting.startswith(cut.text)


def test_prompt_token_ids_dict_equals_text_prompt(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=8, temperature=0.0)
    text = llm.generate("Paris is a city in", params, use_tqdm=False)[0]
    ids = llm.generate({"prompt_token_ids": tok("Paris is a city in").input_ids}, params, use_tqdm=False)[0]
    assert ids.token_ids == text.token_ids and ids.text == text.text


CHAT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "eval" / "chat_prompts.jsonl"


def _chat_prompts(n: int) -> list[list[dict]]:
    records = [json.loads(line) for line in CHAT_PROMPTS.read_text().splitlines()]
    return [[{"role": "user", "content": r["turns"][0]}] for r in records[::len(records) // n][:n]]


def test_8bit_kv_greedy_output_mostly_equals_bf16_kv(demo_model_path):
    """Measured here (torch 2.13, CPU) on 12 chat prompts x 32 tokens: fp8 KV 7/12 identical to
    bf16 KV, int8 KV 8/12 (and fp32 KV 11/12: this 135M model flips on tiny logit changes).
    The floor asserts a majority."""
    params = SamplingParams(max_tokens=32, temperature=0.0)
    prompts = _chat_prompts(12)
    runs = {kv: [o.token_ids for o in LLM(str(demo_model_path), device="cpu", kv_dtype=kv,
                                          kv_memory_gb=0.1).chat(prompts, params, use_tqdm=False)]
            for kv in ("bf16", "fp8", "int8")}
    for kv in ("fp8", "int8"):
        same = sum(a == b for a, b in zip(runs[kv], runs["bf16"]))
        assert same >= 7, f"{kv} KV: only {same}/12 greedy outputs equal bf16 KV"


def test_low_precision_prefill_keeps_the_answer_likely(llm, demo_model_path):
    """W8A8 prefill costs the reference answer under 1 nat of log-likelihood. Measured (int8 KV):
    total -2.62 with bf16 prefill, fp8 -1.81, int8 -2.62, bfp8 -2.69 on the CI machine of
    2026-12-01, and -2.61, -1.57, -1.59, -2.84 on that of 12-02, where the previous day's code
    gives the same and gguf 0.18 or transformers 5.23 for the newest change nothing (likely the
    float32 matmuls round differently there and move W8A8's activation rounding). Nearly all of
    it is the first token, "The", which the float model prefers over "L" by 0.08 nats, a margin
    W8A8 noise moves either way (greedy, only fp8 prefill keeps "The ..."); every token from
    "capital" to "Paris" stays above -0.06."""
    tok = llm.get_tokenizer()
    prompt = apply_chat_template(tok, [{"role": "user", "content": "What is the capital of France?"}])
    answer = tok("The capital of France is Paris.", add_special_tokens=False).input_ids
    model = llm.engine.model
    scores = {}
    for mode in ("bf16", "fp8", "int8", "bfp8"):
        model.use_prefill_precision(mode)
        scores[mode] = Scorer(model, "int8").score([(prompt, [answer])])[0][0]
    model.use_prefill_precision("bf16")
    for mode in ("fp8", "int8", "bfp8"):
        assert scores[mode].sum() > scores["bf16"].sum() - 1.0
        assert abs(scores[mode][1:].sum() - scores["bf16"][1:].sum()) < 0.5  # past the near-tie first token
        assert scores[mode][1:-1].min() > -0.1  # "capital of France is Paris"
    fp8 = LLM(str(demo_model_path), device="cpu", prefill_dtype="fp8", kv_dtype="int8",
              kv_memory_gb=0.05)
    out = fp8.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)[0]
    assert "Paris" in out.text
