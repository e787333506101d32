import json

import torch

from hma import eval as quality
from hma.batch import Batch, SeqChunk
from hma.kv_cache import KVCache
from hma.kv_formats import get_kv_format
from tests.helpers import hma_model_from_hf, tiny_hf_model


def _groups():
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 257, (11,), generator=gen).tolist()
    return ctx, [torch.randint(0, 257, (n,), generator=gen).tolist() for n in (1, 6, 3)]


def test_scorer_equals_a_plain_forward_over_the_whole_sequence():
    model = hma_model_from_hf(tiny_hf_model("Qwen3ForCausalLM"))
    ctx, conts = _groups()
    scores = quality.Scorer(model, "fp32").score([(ctx, conts)])[0]
    cache = KVCache(model.config, 8, 4, get_kv_format("fp32"), "cpu")
    for cont, got in zip(conts, scores):
        seq = ctx + cont
        chunk = SeqChunk(seq, 0, list(range(8)), all_logits=True)
        logprobs = model(Batch.build([chunk], [], 4, "cpu"), cache).log_softmax(-1)
        expected = logprobs[len(ctx) - 1:-1].gather(1, torch.tensor(cont)[:, None])[:, 0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_choices_sharing_a_context_score_as_if_alone():
    model = hma_model_from_hf(tiny_hf_model("LlamaForCausalLM"))
    ctx, conts = _groups()
    scorer = quality.Scorer(model, "int8")
    together = scorer.score([(ctx, conts), (ctx[:5], conts[:1])])
    for cont, got in zip(conts, together[0]):
        torch.testing.assert_close(got, scorer.score([(ctx, [cont])])[0][0])


def test_eval_command_writes_a_table_against_its_reference(tmp_path, demo_model_path):
    out = tmp_path / "quality.json"
    rows = quality.main(["--model", str(demo_model_path), "--device", "cpu", "--prefill-dtype", "bf16,int8",
                         "--kv-dtype", "bf16", "--ppl-windows", "2", "--ppl-context", "32",
                         "--ppl-continuation", "32", "--mc-items", "3", "--chat-prompts", "2",
                         "--chat-tokens", "4", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["prefill_dtype"], r["kv_dtype"]) for r in saved["rows"]] == [("bf16", "bf16"), ("int8", "bf16")]
    ref, int8 = rows
    assert ref["vs_reference"]["ppl_delta_pct"] == 0 and ref["vs_reference"]["greedy_identical"] == 1
    assert ref["ppl_tokens"] == 64 and 1 < ref["ppl"] < 1000
    assert int8["ppl"] != ref["ppl"]  # the context really ran through the int8 weights
    assert all(mc["items"] == 3 for mc in ref["mc"].values())
