"""The GPU decode path (CUDA graphs + the fused Triton attention) against the CPU reference.

The end-to-end tests need a CUDA GPU and are skipped without one (the kernels themselves are
checked on the CPU under Triton's interpreter in test_kernels.py); the host side of the graph
runner (buckets, padding, input rows) is checked on the CPU."""

import random

import pytest
import torch

from hma.engine import run_to_completion
from hma.sampling import SamplingParams

from hma.batch import SeqChunk
from hma.cuda_graphs import DecodeGraphs
from hma.kv_cache import KVCache
from hma.kv_formats import get_kv_format

from .helpers import engine_from_hf, hma_model_from_hf, tiny_hf_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 9, 2, 77, 31], [100, 3], list(range(40, 80)), [250] * 17, [1, 2, 3, 4, 5, 6, 7, 8, 9]]
GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


@needs_cuda
@pytest.mark.parametrize("kv_dtype, head_dim", [("fp32", 24), ("int8", 24), ("fp8", 32), ("int4", 32),
                                                ("bfp8", 32)])
def test_gpu_decode_through_cuda_graphs_gives_the_cpu_reference_tokens(kv_dtype, head_dim):
    hf = tiny_hf_model(head_dim=head_dim)
    cpu = run_to_completion(engine_from_hf(hf, kv_dtype=kv_dtype), PROMPTS, GREEDY)
    gpu_engine = engine_from_hf(hf, kv_dtype=kv_dtype, device="cuda", max_num_seqs=8)
    gpu = run_to_completion(gpu_engine, PROMPTS, GREEDY)
    assert gpu_engine.graphs.graphs, "decode steps should have run through captured graphs"
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
    # every block is back, besides the one the graphs keep for padding rows
    assert gpu_engine.kv_cache.allocator.num_free == gpu_engine.kv_cache.num_blocks - 1


@needs_cuda
def test_eager_gpu_decode_gives_the_same_tokens_as_graphs():
    hf = tiny_hf_model(head_dim=32)
    graphs = run_to_completion(engine_from_hf(hf, kv_dtype="int8", device="cuda"), PROMPTS, GREEDY)
    eager_engine = engine_from_hf(hf, kv_dtype="int8", device="cuda", enforce_eager=True)
    eager = run_to_completion(eager_engine, PROMPTS, GREEDY)
    assert eager_engine.graphs is None
    assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in graphs]



@needs_cuda
def test_overlapped_graph_steps_give_the_plain_steps_tokens():
    hf = tiny_hf_model(head_dim=32)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (3, 30, 1, 17, 30)]

    def run(mode):
        engine = engine_from_hf(hf, kv_dtype="fp8", device="cuda", max_num_seqs=8, async_scheduling=mode)
        reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
        fed = []
        if engine.overlap is not None:
            launch = engine.overlap.launch
            engine.overlap.launch = lambda chunks, feedback: fed.append(max(feedback)) or launch(chunks, feedback)
        while engine.has_unfinished:
            engine.step()
        assert engine.kv_cache.allocator.num_free == engine.kv_cache.num_blocks - 1
        return [r.output_token_ids for r in reqs], fed

    plain, _ = run("off")
    overlapped, fed = run("auto")
    assert overlapped == plain
    assert len(fed) > 20 and max(fed) >= 0  # launched with tokens fed back on the device


def _graph_runner(max_num_seqs: int = 5, max_model_len: int = 64) -> DecodeGraphs:
    model = hma_model_from_hf(tiny_hf_model())
    cache = KVCache(model.config, 32, 4, get_kv_format("int8"), "cpu")
    return DecodeGraphs(model, cache, max_num_seqs, max_model_len)


def test_graph_runner_buckets_batch_sizes_and_keeps_one_block_for_padding():
    runner = _graph_runner(max_num_seqs=5)
    assert runner.buckets == [1, 2, 4, 5]
    allocator = runner.kv_cache.allocator
    assert allocator.num_free == 31
    assert runner.pad_block not in allocator.allocate(31)


def test_graph_runner_fills_padding_rows_that_attention_skips():
    runner = _graph_runner()
    bs = runner.block_size
    decodes = [SeqChunk([7], 5, [3, 9]), SeqChunk([11], 0, [4])]
    runner._fill(decodes, [-1, -1], 4)
    runner._upload(4)
    runner._feed(4)
    batch = runner._static_batch(4)
    assert batch.input_ids.tolist() == [7, 11, 0, 0]
    assert batch.positions.tolist() == [5, 0, 0, 0]
    assert batch.slot_mapping.tolist() == [9 * bs + 1, 4 * bs, runner.pad_block * bs, runner.pad_block * bs]
    assert batch.seq_lens.tolist() == [6, 1, 0, 0]  # length 0: attention reads nothing for padding
    assert batch.block_tables[0, :2].tolist() == [3, 9] and batch.block_tables[1, 0] == 4


def test_graph_runner_feeds_rows_the_previous_steps_tokens_on_the_device():
    runner = _graph_runner()
    runner.tokens[:3] = torch.tensor([40, 41, 42])  # what the step before sampled
    decodes = [SeqChunk([-1], 5, [3, 9]), SeqChunk([11], 0, [4]), SeqChunk([-1], 2, [5])]
    runner._fill(decodes, [2, -1, 0], 4)
    runner._upload(4)
    runner._feed(4)
    assert runner._static_batch(4).input_ids.tolist() == [42, 11, 40, 0]


def test_graph_runner_fills_its_two_input_sets_in_turn():
    runner = _graph_runner()
    for turn, token in ((1, 7), (0, 8), (1, 9)):
        runner.turn ^= 1
        runner._fill([SeqChunk([token], 0, [4])], [-1], 1)
        assert runner.turn == turn and runner.host_scalars[turn, 0, 0] == token
    assert runner.host_scalars[0, 0, 0] == 8  # the other set still holds the step before's inputs


def test_graph_runner_rewrites_a_table_row_only_for_new_blocks_or_a_new_list():
    runner = _graph_runner()
    blocks = [3, 9]
    runner._fill([SeqChunk([1], 0, blocks)], [-1], 1)
    tables = runner.host_tables[runner.turn].numpy()
    tables[0, 0] = 99  # an entry no fill should touch again while this list only grows
    blocks.append(5)
    runner._fill([SeqChunk([1], 8, blocks)], [-1], 1)
    assert tables[0, :3].tolist() == [99, 9, 5]  # just the new block was written
    runner._fill([SeqChunk([1], 8, [3, 9, 5])], [-1], 1)  # the same values in another list
    assert tables[0, :3].tolist() == [3, 9, 5]


def test_graph_runner_fills_what_a_row_by_row_fill_would_over_a_run_of_steps():
    """Sequences join, grow, leave and get new lists while rows shift between steps; every
    step's rows hold exactly each chunk's blocks, positions, slots and lengths."""
    runner = _graph_runner(max_num_seqs=5, max_model_len=64)
    bs, rng = runner.block_size, random.Random(0)
    live = [[rng.randrange(30)] for _ in range(3)]
    for _ in range(60):
        if rng.random() < 0.2:
            live[rng.randrange(len(live))] = [rng.randrange(30)]  # preempted, readmitted: a new list
        if rng.random() < 0.2 and len(live) < 5:
            live.append([rng.randrange(30)])
        if rng.random() < 0.2 and len(live) > 1:
            live.pop(rng.randrange(len(live)))
        rng.shuffle(live)
        for blocks in live:
            if rng.random() < 0.5 and len(blocks) < 16:
                blocks.append(rng.randrange(30))  # grows in place, as the scheduler's += does
        decodes = [SeqChunk([7 + i], len(b) * bs - 1 - rng.randrange(bs), b) for i, b in enumerate(live)]
        feedback = [rng.choice([-1, 0]) for _ in decodes]
        runner.turn ^= 1
        runner._fill(decodes, feedback, 5)
        scalars, tables = runner.host_scalars[runner.turn], runner.host_tables[runner.turn]
        for i, (chunk, fed) in enumerate(zip(decodes, feedback)):
            pos = chunk.context_len
            assert tables[i, :len(chunk.block_ids)].tolist() == chunk.block_ids
            slot = chunk.block_ids[pos // bs] * bs + pos % bs
            assert scalars[:, i].tolist() == [chunk.token_ids[0] if fed < 0 else 0, pos, slot, pos + 1, fed]
        assert scalars[3, len(decodes):].tolist() == [0] * (5 - len(decodes))


def test_graph_runner_declines_what_no_graph_fits():
    runner = _graph_runner(max_num_seqs=2, max_model_len=16)  # 4 blocks of 4 tokens at most
    one = SeqChunk([1], 3, [0])
    assert runner.can_run([one, one])
    assert not runner.can_run([one, one, one])
    assert not runner.can_run([SeqChunk([1], 16, [0, 1, 2, 3, 4])])


def test_the_padding_block_is_left_out_of_max_model_len():
    from hma.config import EngineConfig
    from hma.engine import _max_model_len

    runner = _graph_runner()  # 32 blocks of 4 tokens
    config = EngineConfig(device="cpu", block_size=4)
    model_config = runner.model.config
    assert _max_model_len(config, model_config, runner.kv_cache) == 128
    assert _max_model_len(config, model_config, runner.kv_cache, reserved_blocks=1) == 124
