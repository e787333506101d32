"""Each Triton kernel against its PyTorch reference (on CPU through Triton's interpreter)."""

import dataclasses

import pytest
import torch

from hma import kernels, quant_kernels
from hma.attention import decode_reference, write_kv_reference
from hma.batch import slots_for
from hma.kernels import DecodeConfig, choose_partition, paged_decode_attention
from hma.quant_kernels import can_write_kv
from hma.kv_cache import LayerKV
from hma.kv_formats import KV_FORMATS, get_kv_format

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 64, 8  # 3 query heads per KV head, as the demo model


def _filled_layer(name: str, seq_lens: list[int], gen: torch.Generator, dtype: torch.dtype,
                  head_dim: int = HEAD_DIM):
    """A pool holding each sequence's tokens in shuffled blocks, and the block tables."""
    per_seq = max(1, -(-max(seq_lens) // BLOCK))
    order = torch.randperm(len(seq_lens) * per_seq + 3, generator=gen).tolist()
    layer = LayerKV.empty(get_kv_format(name), len(order), BLOCK, KV_HEADS, head_dim, DEVICE)
    tables = torch.tensor([order[i * per_seq:(i + 1) * per_seq] for i in range(len(seq_lens))])
    for table, n in zip(tables.tolist(), seq_lens):
        k, v = (3 * torch.randn(2, n, KV_HEADS, head_dim, generator=gen)).to(dtype).unbind(0)
        slots = torch.tensor(slots_for(table, 0, n, BLOCK), dtype=torch.long)
        write_kv_reference(layer, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    return layer, tables.to(DEVICE)


@pytest.mark.parametrize("name", list(KV_FORMATS))
@pytest.mark.parametrize("partition", [64, None])
def test_fused_decode_attention_matches_the_reference(name, partition):
    _check_against_reference(name, partition, HEAD_DIM)


@pytest.mark.parametrize("name", ["fp32", "fp8", "int8"])
def test_fused_decode_attention_pads_a_head_dim_that_is_not_a_power_of_two(name):
    _check_against_reference(name, 64, 24)


# Triton's interpreter computes bfloat16 through numpy, which has no bfloat16: on the CPU the
# half-precision runs use float16 models, on a GPU the bfloat16 models they serve.
HALF, HALF_KV = (torch.bfloat16, "bf16") if DEVICE == "cuda" else (torch.float16, "fp16")


@pytest.mark.parametrize("name", [HALF_KV, "fp8", "int8", "int4", "bfp8"])
def test_fused_decode_attention_in_half_precision_stays_close_to_the_reference(name):
    """Half-precision models run the dots in their dtype, or float16 for 8-bit payloads."""
    _check_against_reference(name, 64, HEAD_DIM, HALF, tolerance=2e-2)


@pytest.mark.parametrize("name", ["fp8", "int8"])
@pytest.mark.parametrize("in_registers", [True, False], ids=["k-in-registers", "k-in-assembly"])
def test_8_bit_k_converts_in_registers_or_in_assembly_to_the_same_attention(name, in_registers):
    """Both places 8-bit K can become float16 (on a GPU: a plain cast the compiler does in
    registers, or inline PTX before shared memory) give the reference's attention."""
    config = dataclasses.replace(kernels.EIGHT_BIT, k_in_registers=in_registers)
    _check_against_reference(name, 64, HEAD_DIM, HALF, tolerance=2e-2, config=config)


@pytest.mark.parametrize("name", ["fp32", "fp8", "int4"])
@pytest.mark.parametrize("in_place", [True, False], ids=["merged-in-place", "merge-kernel"])
def test_splits_merged_in_place_or_by_their_own_kernel_give_the_reference(name, in_place, monkeypatch):
    """In place, the last split of each (sequence, KV head) to arrive merges the group's splits
    and no merge kernel runs; its counter is zero again afterwards, so the next launch counts
    from zero. Apart, the merge kernel runs after each launch."""
    launched = []
    launch = kernels.triton_launch
    monkeypatch.setattr(kernels, "triton_launch", lambda kernel, grid, *args, **constexprs: (
        launched.append(kernel), launch(kernel, grid, *args, **constexprs)))
    config = dataclasses.replace(kernels.for_format(get_kv_format(name)), merge_in_place=in_place)
    for _ in range(2):
        _check_against_reference(name, 64, HEAD_DIM, config=config)
    merge = [] if in_place else [kernels._merge_splits_kernel]
    assert launched == ([kernels._paged_decode_kernel] + merge) * 2
    if in_place:
        _assert_counters_zero()


def _assert_counters_zero() -> None:
    """The device's merge counters exist and are all zero, as the next launch needs them."""
    counts = kernels._COUNTS.get(torch.empty(0, device=DEVICE).device)  # cuda:0, as the kernel's key
    assert counts is not None and not counts.any()


@pytest.mark.parametrize("in_place", [True, False], ids=["merged-in-place", "merge-kernel"])
def test_more_splits_than_one_merge_step_takes_give_the_reference(in_place):
    """A merge takes MERGE_WAY splits a step with a running max: 700 tokens in 64-token splits
    are 11 splits, two steps; 3 tokens leave all but one of the first step's splits empty. The
    last 100 tokens' keys are doubled, so the second step raises the running max and the first
    step's sums must be rescaled."""
    gen = torch.Generator().manual_seed(5)
    seq_lens = [700, 3]
    assert -(-max(seq_lens) // 64) > kernels.MERGE_WAY
    layer, tables = _filled_layer("fp32", seq_lens, gen, torch.float32)
    slots = torch.tensor(slots_for(tables[0].tolist(), 600, 700, BLOCK), device=DEVICE)
    write_kv_reference(layer, 6 * torch.randn(100, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE),
                       torch.randn(100, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE), slots)
    q = torch.randn(len(seq_lens), HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    lens = torch.tensor(seq_lens, device=DEVICE)
    config = dataclasses.replace(kernels.for_format(layer.format), tile=64, merge_in_place=in_place)
    got = paged_decode_attention(q, layer, tables, lens, HEAD_DIM ** -0.5, 64, config)
    expected = decode_reference(q, layer, tables, lens, HEAD_DIM ** -0.5)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["fp32", "fp8"])
@pytest.mark.parametrize("in_place,skip", [(True, True), (True, False), (False, False)],
                         ids=["in-place-skipping-empty-splits", "in-place", "merge-kernel"])
def test_tables_wider_than_the_sequences_give_the_reference(name, in_place, skip):
    """A graph's tables are max_model_len wide, so most splits of a short sequence hold no token.
    Skipping them, they leave at once and the live ones merge: 200 tokens in 64-token splits of
    512-token tables are 4 live splits of 8, 65 tokens 2, 64 tokens and 1 token one split
    (written without a merge), the padding row one split of zeros. Twice: each group's counter
    must be back at zero."""
    _check_wide_tables(name, 64, merge_in_place=in_place, skip_empty_splits=skip)


@pytest.mark.parametrize("name", ["fp32", "fp8"])
@pytest.mark.parametrize("sms", [4, 64])
def test_splits_sized_from_each_length_give_the_reference(monkeypatch, name, sms):
    """Split by length, 256-token splits of 512-token tables become the launch's wanted splits
    of 64-token tiles: with 64 SMs 200 tokens are 2 splits of 128 and 65 tokens 2 of 64; with 4
    SMs (one split wanted) each sequence is one split, however long. Twice, for the counters."""
    monkeypatch.setattr(kernels, "_num_sms", lambda device: sms)
    _check_wide_tables(name, 256, split_by_length=True)
    _assert_counters_zero()


def _check_wide_tables(name: str, partition: int, **config) -> None:
    """200, 65, 64 and 1 tokens and a padding row in 512-token tables, 64-token tiles, twice."""
    gen = torch.Generator().manual_seed(6)
    seq_lens = [200, 65, 64, 1, 0]
    layer, tables = _filled_layer(name, seq_lens, gen, torch.float32)
    wide = torch.cat([tables, tables[:, :1].expand(-1, 512 // BLOCK - tables.shape[1])], dim=1)
    q = torch.randn(len(seq_lens), HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    lens = torch.tensor(seq_lens, device=DEVICE)
    launch = dataclasses.replace(kernels.for_format(layer.format), tile=64, **config)
    expected = decode_reference(q[:-1], layer, tables[:-1], lens[:-1], HEAD_DIM ** -0.5)  # NaN for no token
    for _ in range(2):
        got = paged_decode_attention(q, layer, wide, lens, HEAD_DIM ** -0.5, partition, launch)
        torch.testing.assert_close(got[:-1], expected, atol=2e-5, rtol=1e-4)
        assert torch.equal(got[-1], torch.zeros_like(got[-1]))


@pytest.mark.parametrize("field", ["skip_empty_splits", "split_by_length"])
def test_a_sequence_longer_than_its_table_leaves_no_counter_waiting(field):
    """Skipping empty splits (or sizing them by length), a split counts only up to the grid's splits: a length past the
    table (a caller's bug) must not leave a merge waiting on splits never launched, with its
    counter stuck for every later launch."""
    gen = torch.Generator().manual_seed(7)
    layer, tables = _filled_layer("fp32", [128, 5], gen, torch.float32)  # 16 blocks of 8: 128 tokens
    q = torch.randn(2, HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    config = dataclasses.replace(kernels.for_format(layer.format), tile=64, **{field: True})
    paged_decode_attention(q, layer, tables, torch.tensor([200, 5], device=DEVICE), HEAD_DIM ** -0.5, 64, config)
    _assert_counters_zero()
    lens = torch.tensor([128, 5], device=DEVICE)
    got = paged_decode_attention(q, layer, tables, lens, HEAD_DIM ** -0.5, 64, config)
    torch.testing.assert_close(got, decode_reference(q, layer, tables, lens, HEAD_DIM ** -0.5), atol=2e-5, rtol=1e-4)


def test_more_groups_than_counters_merge_by_the_merge_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "MERGE_COUNTERS", 3)  # the test's 4 sequences x 2 KV heads are more
    merges = []
    launch = kernels.triton_launch
    monkeypatch.setattr(kernels, "triton_launch", lambda kernel, grid, *args, **constexprs: (
        merges.append(kernel is kernels._merge_splits_kernel), launch(kernel, grid, *args, **constexprs)))
    config = dataclasses.replace(kernels.EIGHT_BIT, merge_in_place=True)
    _check_against_reference("int8", 64, HEAD_DIM, config=config)
    assert merges == [False, True]


@pytest.mark.parametrize("name", ["fp32", "fp8"])
@pytest.mark.parametrize("rows", [4, 16])
def test_query_heads_padded_to_4_or_16_rows_give_the_same_attention(name, rows):
    """At 4 rows the group's 3 query heads pad to 4 and Triton pads the dot itself; 16 is what
    Triton 2 wanted."""
    config = dataclasses.replace(kernels.for_format(get_kv_format(name)), group_rows=rows)
    _check_against_reference(name, None, HEAD_DIM, config=config)


def _check_against_reference(name: str, partition: int | None, head_dim: int,
                             dtype: torch.dtype = torch.float32, tolerance: float = 2e-5,
                             config: DecodeConfig | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    seq_lens = [150, 1, 64, 97]  # several splits, one token, exactly one tile
    layer, tables = _filled_layer(name, seq_lens, gen, dtype, head_dim)
    q = torch.randn(len(seq_lens), HEADS, head_dim, generator=gen).to(DEVICE, dtype)
    lens = torch.tensor(seq_lens, device=DEVICE)
    expected = decode_reference(q, layer, tables, lens, head_dim ** -0.5)
    got = paged_decode_attention(q, layer, tables, lens, head_dim ** -0.5, partition, config)
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=5 * tolerance)


def test_fused_decode_attention_gives_zeros_for_empty_padding_rows():
    gen = torch.Generator().manual_seed(2)
    layer, tables = _filled_layer("int8", [40, 0], gen, torch.float32)
    q = torch.randn(2, HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    got = paged_decode_attention(q, layer, tables, torch.tensor([40, 0], device=DEVICE), 0.125, 64)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert got[0].abs().sum() > 0


def test_partition_spreads_short_batches_and_caps_long_ones():
    device = torch.device("cpu")
    one_seq = choose_partition(1, 2, 4096, device)
    assert 4096 // one_seq > 1  # one sequence still gets several programs
    assert choose_partition(512, 8, 1 << 16, device) == 1024
    assert choose_partition(512, 8, 1 << 16, device, DecodeConfig(max_partition=512)) == 512


COMPILE_FOR_HOPPER = r'''
import dataclasses, sys, torch
from hma import kernels, layer_kernels, matvec, quant_kernels
from hma.bench.sm90 import capture_launches, compile_for_hopper
from hma.kv_cache import LayerKV
from hma.kv_formats import get_kv_format
from hma.quant import MIN_SCALE, ROW_QMAX

def launch_all():
    for name in sys.argv[1:]:
        layer = LayerKV.empty(get_kv_format(name), 4, 16, 8, 128, "cpu")
        q = torch.zeros(3, 32, 128, dtype=torch.bfloat16)
        in_place = dataclasses.replace(kernels.for_format(layer.format), merge_in_place=True)
        kernels.paged_decode_attention(q, layer, torch.zeros(3, 300, dtype=torch.long), torch.ones(3, dtype=torch.long),
                                       0.1, config=in_place)
        if quant_kernels.can_write_kv(layer.format):
            kv = torch.zeros(3, 3, 8, 128, dtype=torch.bfloat16)
            quant_kernels.write_kv(layer, kv[:, 1], kv[:, 2], torch.zeros(3, dtype=torch.long))
    # the last format's splits merged by a kernel of their own, merged in place skipping empty splits, and sized by length
    for config in (dataclasses.replace(in_place, merge_in_place=False),
                   dataclasses.replace(in_place, skip_empty_splits=True),
                   dataclasses.replace(in_place, split_by_length=True)):
        kernels.paged_decode_attention(q, layer, torch.zeros(3, 300, dtype=torch.long), torch.ones(3, dtype=torch.long),
                                       0.1, config=config)
    for mode, qmax in ROW_QMAX.items():
        quant_kernels.quantize_rows(torch.zeros(3, 2560, dtype=torch.bfloat16), mode, qmax, MIN_SCALE)
    x, w = torch.zeros(1, 2560, dtype=torch.bfloat16), torch.zeros(64, 2560, dtype=torch.bfloat16)
    matvec.linear(x, w)
    matvec.gated_linear(x, w)
    layer_kernels.add_rms_norm(x, x, x[0], 1e-6)
    qkv = torch.zeros(3, 12, 128, dtype=torch.bfloat16)
    layer_kernels.norm_and_rotate(qkv[:, :8], qkv[:, 8:10], qkv[:, 0, None], qkv[:, 0, None], qkv[0, 0], qkv[0, 0], 1e-6)
    layer_kernels.silu_and_mul(torch.zeros(3, 512, dtype=torch.bfloat16))

launches = capture_launches(launch_all)
for kernel, args, constexprs in launches:
    for pdl in (False, True):  # as launched without programmatic dependent launch, and with it
        ptx = compile_for_hopper(kernel, args, constexprs, pdl).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl, kernel.__name__
print("compiled", len(launches))
'''


def test_kernels_compile_for_an_h100_without_one():
    """The interpreter does not type-check like the compiler: compile every format's kernels, the
    matrix-vector and the layer kernels for sm_90 (no GPU needed), so a kernel that only the GPU
    would reject fails here too; each also as launched with PDL, where it waits on its inputs, and
    with the alignments a launch specializes on, so loads vectorize and loops software-pipeline as
    on the GPU (without them the bf16 and quantized attention loops had no asynchronous copies)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, *KV_FORMATS], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    storable = sum(can_write_kv(f) for f in KV_FORMATS.values())
    # each format's attention (its splits merged in place), one merged apart (+ the merge kernel),
    # one skipping empty splits, one sizing splits by length, the K/V writes, matvec twice, row
    # quantization twice, the layer kernels thrice
    launches = len(KV_FORMATS) + 4 + storable + 2 + 2 + 3
    assert result.stdout.split() == ["compiled", str(launches)]


def _same_bytes(got: torch.Tensor, want: torch.Tensor) -> None:
    """Byte equality; on the CPU, float8 and bfloat16 payloads need only mostly match: Triton's
    interpreter converts to them in numpy, which gets the rounding wrong where it carries into
    the next power of two (31.9 -> 16 in float8), a few values in each test."""
    emulated = DEVICE == "cpu" and got.dtype in (torch.bfloat16, torch.float8_e4m3fn)
    got, want = got.cpu().view(torch.uint8), want.view(torch.uint8)
    if emulated:
        assert (got == want).float().mean() > 0.95
    else:
        assert torch.equal(got, want)


# The references run on the CPU: eager CUDA PyTorch divides by a Python number through its
# reciprocal, which rounds some scales the other way for half-precision inputs.
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32-input", "half-input"])
@pytest.mark.parametrize("name, head_dim, kv_heads", [("fp32", HEAD_DIM, KV_HEADS), ("fp16", HEAD_DIM, KV_HEADS),
                                                      ("bf16", HEAD_DIM, KV_HEADS), ("fp8", HEAD_DIM, KV_HEADS),
                                                      ("int8", HEAD_DIM, KV_HEADS), ("int4", HEAD_DIM, KV_HEADS),
                                                      ("int4", 96, 3)])  # padded head_dim and head count
def test_fused_kv_write_stores_exactly_what_the_cpu_reference_writes(name, head_dim, kv_heads, dtype):
    gen = torch.Generator().manual_seed(3)
    fused = LayerKV.empty(get_kv_format(name), 6, BLOCK, kv_heads, head_dim, DEVICE)
    reference = LayerKV.empty(get_kv_format(name), 6, BLOCK, kv_heads, head_dim, "cpu")
    qkv = torch.randn(9, 3, kv_heads, head_dim, generator=gen) * torch.logspace(-6, 3, 9)[:, None, None, None]
    qkv[4, 1] = 0  # an all-zero token keeps a positive scale
    qkv = qkv.to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]  # strided views, as the split projection gives
    slots = torch.tensor([3, 17, 5, 40, 0, 33, 8, 9, 47])
    quant_kernels.write_kv(fused, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    write_kv_reference(reference, k, v, slots)
    for got, want in zip(fused.tensors, reference.tensors):
        _same_bytes(got, want)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_row_quantization_kernel_gives_the_cpu_reference_bytes_and_scales(mode):
    from hma.quant import MIN_SCALE, ROW_QMAX, quantize_rows

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 120, generator=gen) * torch.logspace(-8, 4, 7)[:, None]
    x[2] = 0  # an all-zero row keeps a positive scale
    x = x[:, 3:103]  # a column slice: the row stride is not the row length
    got_q, got_scale = quant_kernels.quantize_rows(x.to(DEVICE), mode, ROW_QMAX[mode], MIN_SCALE)
    want_q, want_scale = quantize_rows(x, mode)
    assert torch.equal(got_scale.cpu(), want_scale)
    _same_bytes(got_q, want_q)


def test_decode_warm_up_meets_every_partition_split_or_not_and_leaves_the_cache_alone():
    gen = torch.Generator().manual_seed(2)
    layer, _ = _filled_layer("int8", [20], gen, torch.float32)
    before = [t.clone() for t in layer.tensors]
    # 8-bit payloads split at 512 tokens at most: partition 128, one split and two; 256 and 512, one each
    assert kernels.warm_up_decode(layer, HEADS, HEAD_DIM, 256, torch.float32) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, layer.tensors))
    bf16, _ = _filled_layer("bf16", [20], gen, torch.float32)
    assert kernels.warm_up_decode(bf16, HEADS, HEAD_DIM, 256, torch.float32) == 5  # and 1,024
    # the split count is unspecialized: two splits stand for all, however long max_len is
    assert kernels.warm_up_decode(bf16, HEADS, HEAD_DIM, 32768, torch.float32) == 8


def test_every_decode_launch_of_an_eager_step_was_made_by_the_warm_up(monkeypatch):
    """Constexprs pick a kernel variant (the varying integers and pointers are unspecialized):
    each launch that mixed steps make, whatever their rows, widths and lengths, must match one
    the warm-up made, or it would compile while serving."""
    launches = []
    launch = kernels.triton_launch
    monkeypatch.setattr(kernels, "triton_launch", lambda kernel, grid, *args, **constexprs: (
        launches.append((kernel, tuple(sorted(constexprs.items())))), launch(kernel, grid, *args, **constexprs)))
    gen = torch.Generator().manual_seed(4)
    layer, _ = _filled_layer("fp8", [300] * 4, gen, torch.float32)
    kernels.warm_up_decode(layer, HEADS, HEAD_DIM, 512, torch.float32)
    warmed, launches[:] = set(launches), []
    q = torch.randn(40, HEADS, HEAD_DIM, generator=gen).to(DEVICE)
    tables = torch.randint(0, layer.k.shape[0], (40, 64), generator=gen).to(DEVICE)
    lens = torch.randint(1, 512, (40,), generator=gen).to(DEVICE)
    for start, rows, width in [(0, 1, 3), (1, 5, 17), (3, 16, 32), (2, 7, 64), (5, 33, 9), (0, 40, 64)]:
        end = start + rows
        paged_decode_attention(q[start:end], layer, tables[start:end, :width],
                               lens[start:end].clamp(max=width * BLOCK), 0.125)
    assert launches and set(launches) <= warmed


def _compiled_variants() -> set:
    fns = (kernels._paged_decode_kernel, kernels._merge_splits_kernel)
    return {(i, str(key)) for i, fn in enumerate(fns) for entry in fn.device_caches.values() for key in entry[0]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled variants)")
def test_eager_decode_of_new_widths_and_row_offsets_compiles_nothing_after_the_warm_up():
    gen = torch.Generator().manual_seed(3)
    layer, _ = _filled_layer("bf16", [300] * 4, gen, torch.bfloat16)
    kernels.warm_up_decode(layer, HEADS, HEAD_DIM, 512, torch.bfloat16)
    compiled = _compiled_variants()
    q = torch.randn(40, HEADS, HEAD_DIM, generator=gen).to(DEVICE, torch.bfloat16)
    tables = torch.randint(0, layer.k.shape[0], (40, 64), generator=gen).to(DEVICE)
    lens = torch.randint(1, 512, (40,), generator=gen).to(DEVICE)
    # as mixed steps slice them: decode rows after a varying number of prefill rows
    for start, rows, width in [(0, 1, 3), (1, 5, 17), (3, 16, 32), (2, 7, 64), (5, 33, 9)]:
        end = start + rows
        paged_decode_attention(q[start:end], layer, tables[start:end, :width],
                               lens[start:end].clamp(max=width * BLOCK), 0.125)
    new = _compiled_variants() - compiled
    assert not new, f"compiled after the warm-up: {sorted(new)}"


@pytest.mark.parametrize("name", ["bf16", "fp8", "int8", "int4"])
def test_8_bit_payloads_launch_with_two_stages_and_fp8_as_its_bytes(monkeypatch, name):
    """8-bit KV launches with EIGHT_BIT's two pipeline stages and K converted in registers, the
    rest with three, none with a register cap; fp8 payloads reach the kernel as uint8 views of
    the same memory, so masked values can load as 0."""
    launches = []
    monkeypatch.setattr(kernels, "triton_launch", lambda kernel, grid, *args, **constexprs: launches.append(
        (kernel, args, constexprs)))
    layer = LayerKV.empty(get_kv_format(name), 4, BLOCK, KV_HEADS, HEAD_DIM, "cpu")
    paged_decode_attention(torch.zeros(1, HEADS, HEAD_DIM), layer, torch.zeros(1, 4, dtype=torch.long),
                           torch.ones(1, dtype=torch.long), 0.1)
    _, args, constexprs = launches[0]
    eight_bit = name in ("fp8", "int8")
    assert "maxnreg" not in constexprs
    assert constexprs["num_stages"] == (2 if eight_bit else 3)
    assert constexprs["K_IN_REGISTERS"] == eight_bit
    k, v = args[1], args[3]
    assert k.data_ptr() == layer.k.data_ptr() and v.data_ptr() == layer.v.data_ptr()
    assert k.dtype == (torch.uint8 if name == "fp8" else layer.k.dtype)


def test_launch_overrides_reach_every_formats_default_launch(monkeypatch):
    """bench speed --attention: fields parsed by their types, set in every format's default."""
    fields = kernels.parse_overrides("group_rows=4,merge_in_place=1,max_registers=none")
    assert fields == {"group_rows": 4, "merge_in_place": True, "max_registers": None}
    assert (DecodeConfig().group_rows, DecodeConfig().merge_in_place) == (4, True)  # the defaults
    monkeypatch.setattr(kernels, "LAUNCH_OVERRIDES", {"group_rows": 16, "merge_in_place": False})
    for name in ("bf16", "fp8"):
        got = kernels.for_format(get_kv_format(name))
        assert (got.group_rows, got.merge_in_place) == (16, False)
    assert kernels.for_format(get_kv_format("fp8")).num_stages == kernels.EIGHT_BIT.num_stages
    with pytest.raises(ValueError, match="no DecodeConfig field 'rows'"):
        kernels.parse_overrides("rows=4")
