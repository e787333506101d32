"""Piecewise graphs (hma/piecewise_graphs.py): everything but attention replayed at a padded
token count over fixed buffers, attention eager on the real rows. On the CPU the pieces run as
plain functions over the same buffers, which checks the data flow (padding, buffers, per-layer
order, which batches may run); on a GPU the same checks run through captured CUDA graphs."""

import pytest
import torch

from hma.batch import Batch, SeqChunk
from hma.kv_cache import KVCache
from hma.kv_formats import get_kv_format
from hma.piecewise_graphs import bucket_sizes

from .helpers import hma_model_from_hf, tiny_hf_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BLOCK = 4


def test_buckets_are_small_powers_then_multiples_of_128_up_to_the_first_that_holds_the_limit():
    assert bucket_sizes(16) == [16]
    assert bucket_sizes(100) == [16, 32, 64, 128]
    assert bucket_sizes(2048) == [16, 32, 64] + list(range(128, 2049, 128))
    assert bucket_sizes(2049)[-1] == 2176


def _cache(model, device, kv_dtype="fp32"):
    return KVCache(model.config, 64, BLOCK, get_kv_format(kv_dtype), device)


def _mixed_batch(device, cached_blocks=None):
    """Two fresh prompts, one prompt over 6 cached tokens and two decodes: 5 sequences, 29 tokens."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(0, 257, (n,), generator=g).tolist()

    prefills = [SeqChunk(ids(13), 0, [0, 1, 2, 3]), SeqChunk(ids(9), 0, [4, 5, 6]),
                SeqChunk(ids(5), 6, [7, 8, 9])]
    decodes = [SeqChunk(ids(1), 10, [10, 11, 12]), SeqChunk(ids(1), 3, [13])]
    return Batch.build(prefills, decodes, BLOCK, device)


def _prime(model, cache, device):
    """Fills every block with K/V, so the cached prefix and the decodes read something real."""
    tokens = torch.randint(0, 257, (14 * BLOCK,), generator=torch.Generator().manual_seed(2)).tolist()
    model(Batch.build([SeqChunk(tokens, 0, list(range(14)))], [], BLOCK, device), cache)


def _run_both(model, device, kv_dtype="fp32", max_tokens=64):
    """(eager logits, piecewise logits, eager cache, piecewise cache, layers seen by on_layer)."""
    caches = [_cache(model, device, kv_dtype) for _ in range(2)]
    for cache in caches:
        _prime(model, cache, device)
    batch = _mixed_batch(device)
    eager = model(batch, caches[0])
    model.use_piecewise_graphs(max_tokens)
    seen = []
    graphs = model(batch, caches[1], seen.append)
    return eager, graphs, caches, seen


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_piecewise_run_gives_the_eager_logits_and_writes_the_same_kv(device):
    model = hma_model_from_hf(tiny_hf_model(), device)
    eager, graphs, (eager_cache, graph_cache), seen = _run_both(model, device)
    assert model.piecewise.pieces.keys() == {32}, "29 tokens run in the 32-token bucket"
    assert seen == [0, 1, 2]
    torch.testing.assert_close(graphs, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager_cache.layers, graph_cache.layers):
        torch.testing.assert_close(b.k, a.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v, a.v, rtol=1e-5, atol=1e-5)


def test_stale_rows_from_a_longer_batch_do_not_reach_a_shorter_one():
    model = hma_model_from_hf(tiny_hf_model())
    model.use_piecewise_graphs(64)
    cache = _cache(model, "cpu")
    long = Batch.build([SeqChunk(list(range(60)), 0, list(range(15)))], [], BLOCK, "cpu")
    model(long, cache)  # leaves 60 rows of its own in every buffer
    short = Batch.build([SeqChunk([7, 8, 9], 0, [20])], [], BLOCK, "cpu")
    graphs = model(short, _cache(model, "cpu"))
    model.piecewise = None
    torch.testing.assert_close(graphs, model(short, _cache(model, "cpu")), rtol=1e-5, atol=1e-5)


def test_inside_eagerly_no_piece_runs_and_the_graphs_come_back_after():
    model = hma_model_from_hf(tiny_hf_model())
    model.use_piecewise_graphs(64)
    graphs = model.piecewise
    with model.eagerly():
        model(_mixed_batch("cpu"), _cache(model, "cpu"))
    assert model.piecewise is graphs and not graphs.pieces


def test_batches_past_the_limit_run_eagerly():
    model = hma_model_from_hf(tiny_hf_model())
    model.use_piecewise_graphs(16)
    batch = _mixed_batch("cpu")  # 29 tokens
    assert not model.piecewise.can_run(batch)
    model(batch, _cache(model, "cpu"))
    assert not model.piecewise.pieces


def test_quantized_prefill_runs_piecewise_only_when_every_row_is_a_prefill_row():
    model = hma_model_from_hf(tiny_hf_model(hidden_size=64, intermediate_size=96))
    model.use_prefill_precision("int8")
    prompts = [SeqChunk(list(range(10, 30)), 0, [0, 1, 2, 3, 4])]
    only_prompts = Batch.build(prompts, [], BLOCK, "cpu")
    mixed = Batch.build(prompts, [SeqChunk([3], 5, [6, 7])], BLOCK, "cpu")
    eager = model(only_prompts, _cache(model, "cpu"))
    model.use_piecewise_graphs(64)
    assert not model.piecewise.can_run(mixed), "decode rows would run through the int8 weights"
    assert model.piecewise.can_run(only_prompts)
    torch.testing.assert_close(model(only_prompts, _cache(model, "cpu")), eager, rtol=1e-5, atol=1e-5)


def test_changing_the_prefill_precision_drops_the_captured_pieces():
    model = hma_model_from_hf(tiny_hf_model())
    model.use_piecewise_graphs(64)
    model(_mixed_batch("cpu"), _cache(model, "cpu"))
    assert model.piecewise.pieces
    model.use_prefill_precision("int8")
    assert not model.piecewise.pieces
    assert not model.piecewise.can_run(_mixed_batch("cpu")), "the int8 copies are seen after the change"


@needs_cuda
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_gpu_quantized_prefill_through_graphs_matches_eager(mode):
    model = hma_model_from_hf(tiny_hf_model(hidden_size=64, intermediate_size=96), "cuda")
    model.use_prefill_precision(mode)
    batch = Batch.build([SeqChunk(list(range(10, 40)), 0, list(range(8)))], [], BLOCK, "cuda")
    eager = model(batch, _cache(model, "cuda", mode))
    model.use_piecewise_graphs(64)
    graphs = model(batch, _cache(model, "cuda", mode))
    assert isinstance(model.piecewise.pieces[32][0].__self__, torch.cuda.CUDAGraph)
    torch.testing.assert_close(graphs, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_a_prefill_hosts_batch_hands_off_the_same_kv_and_first_tokens_through_the_pieces(device):
    from hma.prefill import PrefillJob, prefill_batch
    from hma.sampling import SamplingParams

    model = hma_model_from_hf(tiny_hf_model(), device)

    def run():
        cache = _cache(model, device)
        jobs = [PrefillJob("a", list(range(50, 70)), SamplingParams(max_tokens=1, temperature=0.0), [0, 1, 2, 3, 4]),
                PrefillJob("b", list(range(9, 16)), SamplingParams(max_tokens=1, temperature=0.0), [5, 6])]
        messages = []
        prefill_batch(model, cache, jobs, messages.append)
        return [m for m in messages if m.TYPE == "KVLayer"], [m.token_id for m in messages if m.TYPE == "FirstToken"]

    eager_layers, eager_tokens = run()
    model.use_piecewise_graphs(64)
    graph_layers, graph_tokens = run()
    assert model.piecewise.pieces, "the prefill ran through the graphs"
    assert graph_tokens == eager_tokens
    assert [(m.request_id, m.layer) for m in graph_layers] == [(m.request_id, m.layer) for m in eager_layers]
    for a, b in zip(eager_layers, graph_layers):
        torch.testing.assert_close(b.k, a.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v, a.v, rtol=1e-5, atol=1e-5)
