"""The real demo model (SmolLM2-135M-Instruct) end to end through hma.LLM."""

import pytest

from hma import LLM, SamplingParams


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
