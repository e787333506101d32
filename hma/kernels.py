"""Triton kernels for the GPU hot path, each held by a test to its PyTorch reference.

paged_decode_attention: one query token per sequence attends over that sequence's blocks read
in place from the paged pools, dequantizing payload and scales in registers (deferred
dequantization: no dequantized copy is ever written to memory). Reference: attention.decode_reference.
Flash-decoding split: program (seq, kv_head, split) covers `partition` tokens for all the query
heads sharing that KV head, keeping a running max, sum and weighted V; the last split of a
(seq, kv_head) to finish merges them (or, where it cannot count arrivals, a second kernel does).
Sequences of length 0 (padding rows of a CUDA graph) come out as zeros.
The kernels that quantize into storage (K/V into cache slots, prefill activations) are in
quant_kernels.py. With TRITON_INTERPRET=1 the same kernels run on CPU tensors, which is how the CPU tests run them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hma.kv_cache import LayerKV
from hma.kv_formats import AbsmaxFormat, BlockFloatFormat, CastFormat, Int4Format, KVFormat

# How a kernel quantizes or dequantizes a payload element d of a (token, head), by format
# family (tl.constexpr, so the kernels may read them).
CAST, ABSMAX, INT4, BLOCK_SCALED = (tl.constexpr(i) for i in range(4))
MIN_GROUP_ROWS = 4         # the query heads of a group padded to this many rows (DecodeConfig.group_rows)
MAX_PARTITION = 1024       # tokens per split at most (the default), so long sequences spread over the GPU
MERGE_COUNTERS = 1 << 16   # (sequence, KV head) groups a launch can merge in place (_arrival_counts)
# Splits a merge step loads at once (_merge_group): a (rows, 8, head_dim) float32 tile is 32
# registers a thread at 4 rows of 128 with 4 warps; batch 1 over 1,024-token tables is 8 splits.
MERGE_WAY = tl.constexpr(8)
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """The attention kernel's launch: tokens per loop iteration, warps, software-pipeline stages,
    a cap on registers per thread (None: the compiler's choice), the most tokens one program
    takes of a sequence (choose_partition), whether 8-bit K converts in registers (_load_tile),
    the least rows of q a dot takes, where the splits merge, and whether splits holding no
    tokens leave early.
    The defaults won a sweep on an H100 and stay within 1-3% of the best for bf16 and int4 on an
    H200 (`python -m hma bench attention`); 8-bit payloads take `EIGHT_BIT` (for_format)."""

    tile: int = 128
    num_warps: int = 4
    num_stages: int = 3
    max_registers: int | None = None
    max_partition: int = MAX_PARTITION
    k_in_registers: bool = False
    # Rows of q a program's dots take at least (its group's query heads, padded). Triton 2 wanted
    # 16; Triton 3 pads a smaller dot to the tensor cores' 16 rows itself, and the softmax then
    # works on 4 rows, not 16: 1.8% faster for fp8 at 64 x 4,096 tokens, same output bits at
    # 128-token tiles (H100, one layer, README sixteenth run).
    group_rows: int = MIN_GROUP_ROWS
    # The last split of a (sequence, KV head) to finish merges the group's splits, counted by an
    # atomic: one launch a layer instead of two. With 4 rows, a qwen3-4b step at batch 1 took
    # 3.92 ms on the GPU against 4.26 with the merge kernel and 16 rows (H100, README sixteenth
    # run). False launches the merge kernel after the splits.
    merge_in_place: bool = True
    # Merging in place, splits past a sequence's tokens leave at once, the merge waits only for
    # the others, and a sequence of one split is written unmerged. A graph's tables are
    # max_model_len wide: at 1,024 tokens in 4,096-token tables, 24 of batch 1's 32 splits and
    # 3 of 4 (bf16) or 6 of 8 (fp8) at batch 64 hold none, yet store partials the merge reads.
    # Implied by split_by_length; alone, it leaves the splits sized from the table.
    skip_empty_splits: bool = False
    # Merging in place, each sequence's split size comes from its own length on the device, not
    # from the table's width: whole tiles, as many splits as choose_partition wants for the
    # launch (at most the grid's). Past splits leave as with skip_empty_splits, which this implies.
    # At max_model_len 32,768, batch 1 is given 1,024-token splits, so a 1,024-token sequence ran
    # as one program per KV head (8 for 132 SMs); sized from its length it is 8 splits of 128.
    # qwen3-4b's step on the GPU, at 1,024 tokens in 32,768-token tables, batch 1: 3.99 -> 3.50 ms
    # bf16, 3.84 -> 3.55 fp8; in 4,096-token tables at batch 64: 7.55 -> 7.36 bf16, 6.54 -> 6.29
    # fp8; at 4,096 tokens within 0.6% (H100, README nineteenth run). Off: the split target is a
    # constant, so each batch bucket compiled its own kernel and the GPU tests' eager steps compiled
    # after the warm-up; it must become a runtime argument before it can be the default.
    split_by_length: bool = False


# 8-bit payloads: K converts in registers and V in inline assembly (_load_tile), two pipeline
# stages, sequences split at 512 tokens (an 8-bit tile is half a bf16 one, so twice the programs
# keep as many bytes in flight). With its scales prefetched (below) a one-off Nsight Compute run
# found the fp8 kernel bound by shared memory (L1 77% busy, DRAM 46%); converting K in registers
# saves K's float16 round trip through shared memory. One layer at 64 x 4,096 tokens, H200
# (`python -m hma bench attention`): fp8 212 us, int8 232, against 260 with K converted in
# assembly and bf16's 277.
EIGHT_BIT = DecodeConfig(num_stages=2, max_partition=512, k_in_registers=True)


# Fields replaced in every format's default launch (`bench speed --attention`), to time a launch
# inside whole steps without editing the defaults.
LAUNCH_OVERRIDES: dict[str, object] = {}


def for_format(fmt: KVFormat) -> DecodeConfig:
    """The default launch for a KV format's payload."""
    return dataclasses.replace(EIGHT_BIT if isinstance(fmt, AbsmaxFormat) else DecodeConfig(), **LAUNCH_OVERRIDES)


def parse_overrides(text: str) -> dict[str, object]:
    """'group_rows=4,merge_in_place=1' -> DecodeConfig fields and values ('none' for no cap)."""
    types = {f.name: f.type for f in dataclasses.fields(DecodeConfig)}
    fields = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in types:
            raise ValueError(f"no DecodeConfig field {name!r}; fields: {', '.join(types)}")
        if types[name] == "bool":
            fields[name] = value.lower() in ("1", "true", "yes")
        else:
            fields[name] = None if value.lower() == "none" else int(value)
    return fields


def family(fmt: KVFormat) -> tuple[int, int]:
    """(kind, values sharing one scale) of a KV format."""
    if isinstance(fmt, CastFormat):
        return CAST.value, 1
    if isinstance(fmt, AbsmaxFormat):
        return ABSMAX.value, 1
    if isinstance(fmt, Int4Format):
        return INT4.value, fmt.group_size
    if isinstance(fmt, BlockFloatFormat):
        return BLOCK_SCALED.value, fmt.block_size
    raise NotImplementedError(f"no fused decode attention for kv_format={fmt.name}")


@triton.jit
def _load_tile(payload_ptr, scales_ptr, rows, valid, d, dot_dtype: tl.constexpr, KIND: tl.constexpr,
               HEAD_DIM: tl.constexpr, PAYLOAD_DIM: tl.constexpr, NUM_SCALES: tl.constexpr,
               GROUP: tl.constexpr, TILE: tl.constexpr, DIM_ROWS: tl.constexpr,
               IN_REGISTERS: tl.constexpr):
    """(tokens, head_dim) values of the (token, head) rows in dot_dtype; ABSMAX rows stay unscaled
    (their one scale per token is applied to scores and probabilities instead)."""
    mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    if KIND == INT4:
        # Byte j holds values 2j (low nibble) and 2j + 1 (high): load each byte once, then
        # interleave the two halves back into value order.
        half = tl.arange(0, DIM_ROWS // 2)
        byte = tl.load(payload_ptr + rows[:, None] * PAYLOAD_DIM + half[None, :],
                       mask=valid[:, None] & (half < PAYLOAD_DIM)[None, :], other=0)
        x = tl.reshape(tl.join(byte & 0x0F, byte >> 4), (TILE, DIM_ROWS)).to(tl.float32)
        step = _group_scales(scales_ptr, rows, valid, 0, TILE, DIM_ROWS, NUM_SCALES, NUM_SCALES // 2, GROUP)
        low = _group_scales(scales_ptr, rows, valid, NUM_SCALES // 2, TILE, DIM_ROWS, NUM_SCALES, NUM_SCALES // 2,
                            GROUP)
        return tl.reshape(tl.reshape(x, (TILE, DIM_ROWS // GROUP, GROUP)) * step + low,
                          (TILE, DIM_ROWS)).to(dot_dtype)
    # One conversion per value, straight to the dot's type (fp8 and int8 are exact in float16).
    # Masked values load as 0 (`other=`): zeroing them after the load (tl.where) made the bf16
    # kernel 20% slower at 64 x 4,096 tokens (H200).
    x = tl.load(payload_ptr + rows[:, None] * PAYLOAD_DIM + d[None, :], mask=mask, other=0)
    if payload_ptr.dtype.element_ty == tl.uint8 or payload_ptr.dtype.element_ty == tl.int8:
        # fp8 passes as its bytes (uint8); int4 returned above. K's bytes run along head_dim, the
        # dot's contraction axis, so a plain cast lets the compiler read them from shared memory
        # in the tensor cores' operand layout, 8 bytes a load, and convert in registers. V's
        # contraction axis is the tokens, across rows: a plain cast reads it a byte at a time, so
        # V converts in assembly and reaches the dot as a float16 tile through shared memory.
        if IN_REGISTERS:
            x = _cast_to_half(x)
        else:
            x = _bytes_to_half(x)
    x = x.to(dot_dtype)
    if KIND == BLOCK_SCALED:
        step = _group_scales(scales_ptr, rows, valid, 0, TILE, DIM_ROWS, NUM_SCALES, NUM_SCALES, GROUP)
        x = tl.reshape(tl.reshape(x.to(tl.float32), (TILE, DIM_ROWS // GROUP, GROUP)) * step,
                       (TILE, DIM_ROWS)).to(dot_dtype)
    return x


@triton.jit
def _cast_to_half(x):
    """fp8 (e4m3, passed as uint8 bytes) or int8 values in float16, by a plain cast."""
    if x.dtype == tl.uint8:
        x = x.to(tl.float8e4nv, bitcast=True)
    return x.to(tl.float16)


@triton.jit
def _bytes_to_half(x):
    """fp8 (e4m3, passed as uint8 bytes) or int8 values in float16, four at a time in inline
    assembly: fp8 by Hopper's cvt instruction, int8 by byte permutes into 1024 + (x + 128) and one
    subtraction (exact: float16 holds every integer up to 2048). As assembly the compiler converts
    where the values are loaded, and the float16 tile reaches the tensor cores through ldmatrix
    as a bf16 one does; a plain cast it moves past the shared-memory stage, where V's 8-bit values
    are read a byte at a time (128 LDS.U8 per thread in the kernel's sm_90 SASS, none this way).
    K takes the plain cast (_load_tile says why)."""
    if _INTERPRETED:  # the interpreter runs no PTX
        return _cast_to_half(x)
    if x.dtype == tl.uint8:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 u, a, b, c; xor.b32 u, $2, 0x80808080; prmt.b32 a, u, 0x64646464, 0x4140; "
        "prmt.b32 b, u, 0x64646464, 0x4342; mov.b32 c, 0x64806480; sub.f16x2 $0, a, c; sub.f16x2 $1, b, c; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _group_scales(scales_ptr, rows, valid, first, TILE: tl.constexpr, DIM_ROWS: tl.constexpr,
                  NUM_SCALES: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """(TILE, groups, 1) float32: scales[first + group] of each row, one load per group (groups
    past NUM_GROUPS, which only a padded head_dim has, read nothing)."""
    groups = tl.arange(0, DIM_ROWS // GROUP)
    at = rows[:, None] * NUM_SCALES + first + groups[None, :]
    return tl.load(scales_ptr + at, mask=valid[:, None] & (groups < NUM_GROUPS)[None, :], other=0
                   ).to(tl.float32)[:, :, None]


@triton.jit
def _tile_rows(tile_start, end, tables_ptr, seq, kv_head, table_stride, NUM_KV_HEADS: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
    """Pool rows of tokens [tile_start, tile_start + TILE) of the sequence, and which are valid."""
    t = tile_start + tl.arange(0, TILE)
    valid = t < end
    block = tl.load(tables_ptr + seq * table_stride + t // BLOCK_SIZE, mask=valid, other=0)
    return ((block * BLOCK_SIZE + t % BLOCK_SIZE) * NUM_KV_HEADS + kv_head).to(tl.int64), valid


@triton.jit
def _tile_scales(tile_start, end, tables_ptr, k_scales_ptr, v_scales_ptr, seq, kv_head, table_stride,
                 NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, KIND: tl.constexpr, TILE: tl.constexpr):
    """The K and V scales (float32) of a tile's tokens for ABSMAX formats; ones otherwise."""
    if KIND == ABSMAX:
        rows, valid = _tile_rows(tile_start, end, tables_ptr, seq, kv_head, table_stride, NUM_KV_HEADS,
                                 BLOCK_SIZE, TILE)
        return (tl.load(k_scales_ptr + rows, mask=valid, other=0).to(tl.float32),
                tl.load(v_scales_ptr + rows, mask=valid, other=0).to(tl.float32))
    ones = tl.full((TILE,), 1.0, tl.float32)
    return ones, ones


@triton.jit
def _attend_tile(tile_start, end, k_scale, v_scale, q, running_max, running_sum, acc, k_ptr, k_scales_ptr,
                 v_ptr, v_scales_ptr, tables_ptr, seq, kv_head, table_stride, d,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAYLOAD_DIM: tl.constexpr,
                 NUM_SCALES: tl.constexpr, BLOCK_SIZE: tl.constexpr, KIND: tl.constexpr,
                 GROUP: tl.constexpr, TILE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 K_IN_REGISTERS: tl.constexpr):
    """One online-softmax step over tokens [tile_start, tile_start + TILE) of the sequence
    (k_scale, v_scale: _tile_scales of the same tokens)."""
    rows, valid = _tile_rows(tile_start, end, tables_ptr, seq, kv_head, table_stride, NUM_KV_HEADS,
                             BLOCK_SIZE, TILE)
    k = _load_tile(k_ptr, k_scales_ptr, rows, valid, d, q.dtype, KIND, HEAD_DIM, PAYLOAD_DIM, NUM_SCALES,
                   GROUP, TILE, d.shape[0], K_IN_REGISTERS)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (GROUP_ROWS, TILE), q carries the scale
    if KIND == ABSMAX:
        scores = scores * k_scale[None, :]
    scores = tl.where(valid[None, :], scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    rescale = tl.exp(running_max - new_max)
    p = tl.exp(scores - new_max[:, None])
    running_sum = running_sum * rescale + tl.sum(p, axis=1)
    v = _load_tile(v_ptr, v_scales_ptr, rows, valid, d, q.dtype, KIND, HEAD_DIM, PAYLOAD_DIM, NUM_SCALES,
                   GROUP, TILE, d.shape[0], False)
    if KIND == ABSMAX:
        # p * s_t would underflow float16 for small scales: scale by s_t / (the tile's largest s),
        # which stays in [0, 1], and multiply that largest s back into the sum.
        tile_scale = tl.maximum(tl.max(v_scale, axis=0), 1e-30)
        pv = tl.dot((p * (v_scale / tile_scale)[None, :]).to(q.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * rescale[:, None] + pv * tile_scale
    else:
        acc = acc * rescale[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
    return new_max, running_sum, acc


# Triton compiles a kernel again for every new pattern of its integer arguments (== 1, divisible
# by 16) and pointer alignments. Eager decode steps (mixed with prefills) meet new table widths,
# split counts and row offsets all the time, and each new variant stalled a step for about a
# second on the H200 (measured); these arguments stay unspecialized, so only constexprs pick a
# variant, and warm_up_decode compiles all of those up front.
_VARYING = dict(do_not_specialize=["table_stride", "num_splits"],
                do_not_specialize_on_alignment=["tables_ptr", "seq_lens_ptr"])


@triton.jit(**_VARYING)
def _paged_decode_kernel(
        q_ptr, k_ptr, k_scales_ptr, v_ptr, v_scales_ptr, tables_ptr, seq_lens_ptr,
        out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, counts_ptr, scale, table_stride, num_splits,
        NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAYLOAD_DIM: tl.constexpr, NUM_SCALES: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        KIND: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, DIM_ROWS: tl.constexpr,
        TILE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        PARTITION: tl.constexpr, IS_SPLIT: tl.constexpr, INTERPRETED: tl.constexpr,
        K_IN_REGISTERS: tl.constexpr, MERGE_IN_PLACE: tl.constexpr, SKIP_EMPTY: tl.constexpr,
        SPLIT_TARGET: tl.constexpr, PDL: tl.constexpr = False):
    await_inputs(PDL)
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    live = num_splits  # the splits a merge waits for
    partition = PARTITION
    if SPLIT_TARGET > 0:
        # Sized from this sequence's length: SPLIT_TARGET splits (at most the grid's) of whole
        # tiles, no longer than the grid's, so the tokens covered are never more than the table's.
        per_split = tl.cdiv(seq_len, tl.minimum(num_splits, SPLIT_TARGET))
        partition = tl.minimum(tl.maximum(tl.cdiv(per_split, TILE), 1) * TILE, PARTITION)
    if SKIP_EMPTY:
        # The splits holding tokens (a padding row's first split writes its zeros), at most the
        # grid's: a seq_len past its table must not leave the merge waiting for splits never
        # launched. A graph's tables are max_model_len wide, so most splits of a short sequence
        # hold none: they leave at once, and neither store partials nor count toward the merge.
        live = tl.minimum(tl.maximum(tl.cdiv(seq_len, partition), 1), num_splits)
        if split >= live:
            return
    g = tl.arange(0, GROUP_ROWS)
    d = tl.arange(0, DIM_ROWS)  # head_dim padded to a power of two
    heads = kv_head * QUERIES_PER_KV + g  # the query heads sharing this KV head
    q_rows = seq * NUM_KV_HEADS * QUERIES_PER_KV + heads
    q_mask = (g < QUERIES_PER_KV)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0).to(tl.float32)
    # The softmax scale goes into q once; 8-bit payloads meet q in float16, which holds them exactly
    # and converts from them in one instruction (bfloat16 does not).
    q = (q * scale).to(DOT_DTYPE)

    running_max = tl.full((GROUP_ROWS,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_ROWS,), tl.float32)
    acc = tl.zeros((GROUP_ROWS, DIM_ROWS), tl.float32)
    start = split * partition
    end = tl.minimum(start + partition, seq_len)
    # Each tile's ABSMAX scales load one tile ahead, while the tile before computes: the compiler's
    # pipelining prefetches the payload tiles (they feed the dots) but not these small loads, whose
    # latency every tile waited for. The rows stay computed inside the step, so bf16 compiles as
    # before: prefetching them too was 3% faster for fp8 but changed bf16's pipelining and lost
    # up to 8% there (H200, one-off sweep).
    k_scale, v_scale = _tile_scales(start, end, tables_ptr, k_scales_ptr, v_scales_ptr, seq, kv_head,
                                    table_stride, NUM_KV_HEADS, BLOCK_SIZE, KIND, TILE)
    if INTERPRETED:  # Triton 3.6's interpreter cannot range() over tensor bounds
        tile_start = start
        while tile_start < end:
            k_next, v_next = _tile_scales(tile_start + TILE, end, tables_ptr, k_scales_ptr, v_scales_ptr, seq,
                                          kv_head, table_stride, NUM_KV_HEADS, BLOCK_SIZE, KIND, TILE)
            running_max, running_sum, acc = _attend_tile(
                tile_start, end, k_scale, v_scale, q, running_max, running_sum, acc, k_ptr, k_scales_ptr,
                v_ptr, v_scales_ptr, tables_ptr, seq, kv_head, table_stride, d, NUM_KV_HEADS, HEAD_DIM,
                PAYLOAD_DIM, NUM_SCALES, BLOCK_SIZE, KIND, GROUP, TILE, DOT_PRECISION, K_IN_REGISTERS)
            k_scale, v_scale = k_next, v_next
            tile_start += TILE
    else:  # a for loop, which the compiler software-pipelines: the next tile loads during this one
        for tile_start in range(start, end, TILE):
            k_next, v_next = _tile_scales(tile_start + TILE, end, tables_ptr, k_scales_ptr, v_scales_ptr, seq,
                                          kv_head, table_stride, NUM_KV_HEADS, BLOCK_SIZE, KIND, TILE)
            running_max, running_sum, acc = _attend_tile(
                tile_start, end, k_scale, v_scale, q, running_max, running_sum, acc, k_ptr, k_scales_ptr,
                v_ptr, v_scales_ptr, tables_ptr, seq, kv_head, table_stride, d, NUM_KV_HEADS, HEAD_DIM,
                PAYLOAD_DIM, NUM_SCALES, BLOCK_SIZE, KIND, GROUP, TILE, DOT_PRECISION, K_IN_REGISTERS)
            k_scale, v_scale = k_next, v_next

    if not IS_SPLIT or (SKIP_EMPTY and live == 1):  # the sequence's one split: nothing to merge
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=q_mask)
    else:
        part = q_rows * num_splits + split  # partials laid out (num_seqs, heads, splits)
        head_ok = g < QUERIES_PER_KV
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
        tl.store(part_max_ptr + part, running_max, mask=head_ok)
        tl.store(part_sum_ptr + part, running_sum, mask=head_ok)
        if MERGE_IN_PLACE:
            # Every thread's partials are stored before the count says so (the barrier; the
            # atomic releases them GPU-wide), and the group's last live split to arrive merges.
            tl.debug_barrier()
            group = seq * NUM_KV_HEADS + kv_head
            if tl.atomic_add(counts_ptr + group, 1, sem="acq_rel") == live - 1:
                _merge_group(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, q_rows, head_ok, d, num_splits,
                             live, HEAD_DIM)
                tl.store(counts_ptr + group, 0)  # zero again for the next launch


@triton.jit
def _merge_group(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, rows, rows_ok, d, num_splits, live,
                 HEAD_DIM: tl.constexpr):
    """out[row] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s for each of the rows (query
    heads) over the first `live` of its num_splits splits, MERGE_WAY splits a step with a
    running M: each step's maxes, sums and accumulators load together, so a merge waits on L2 once
    a step, not at every split (a qwen3-4b step at batch 1 took 7% less GPU time than with the
    splits walked one by one; H100, README eighteenth run). The partials are read from L2 (.cg),
    where the programs of this launch left them."""
    s = tl.arange(0, MERGE_WAY)
    d_ok = d < HEAD_DIM
    top = tl.full(rows.shape, float("-inf"), tl.float32)
    total = tl.zeros(rows.shape, tl.float32)
    acc = tl.zeros((rows.shape[0], d.shape[0]), tl.float32)
    # Steps past `live` load nothing. Bounded by `live` itself, the loop cost bf16's kernel 44 more
    # registers under Triton 3.9 (152 to 196: two programs an SM, not three; `bench compiled` of
    # that draft, not kept).
    for first in range(0, num_splits, MERGE_WAY):
        part = rows[:, None] * num_splits + first + s[None, :]  # (rows, MERGE_WAY)
        ok = rows_ok[:, None] & (first + s < live)[None, :]
        m = tl.load(part_max_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_sum_ptr + part, mask=ok, other=0, cache_modifier=".cg")
        a = tl.load(part_acc_ptr + part[:, :, None] * HEAD_DIM + d[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0, cache_modifier=".cg")
        new_top = tl.maximum(top, tl.max(m, axis=1))
        base = tl.where(new_top == float("-inf"), 0.0, new_top)  # an empty sequence: every weight is 0
        rescale = tl.exp(top - base)
        weight = tl.exp(m - base[:, None])
        total = total * rescale + tl.sum(weight * l, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weight[:, :, None] * a, axis=1)
        top = new_top
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rows_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_splits,
                         QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_ROWS: tl.constexpr,
                         DIM_ROWS: tl.constexpr, PDL: tl.constexpr = False):
    """The splits of one (sequence, KV head) group merged, for launches that do not merge in place."""
    await_inputs(PDL)
    g = tl.arange(0, GROUP_ROWS)
    rows = tl.program_id(0) * QUERIES_PER_KV + g  # program (seq, kv_head): its query heads' rows
    _merge_group(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, rows, g < QUERIES_PER_KV, tl.arange(0, DIM_ROWS),
                 num_splits, num_splits, HEAD_DIM)


def _dot_dtype(dtype: torch.dtype, kind: int):
    """What attention's dots run in: float32 models in float32 (the tests' reference runs),
    8-bit payloads in float16, the rest in the model's dtype."""
    if dtype == torch.float32:
        return tl.float32
    return tl.float16 if kind == ABSMAX.value else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter runs programs one by one: few splits keep CPU tests quick
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_partition(num_seqs: int, num_kv_heads: int, max_len: int, device: torch.device,
                     config: DecodeConfig | None = None) -> int:
    """Tokens per split: enough splits for about two programs per SM, tiles whole, at most
    config.max_partition. Depends on shapes only (no sync), so a CUDA graph can fix it at capture."""
    config = config or DecodeConfig()
    partition = triton.next_power_of_2(max(1, -(-max_len // _wanted_splits(num_seqs, num_kv_heads, device))))
    return min(config.max_partition, max(config.tile, partition))


def _wanted_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits a sequence for about two programs per SM."""
    return -(-2 * _num_sms(device) // (num_seqs * num_kv_heads))


def paged_decode_attention(q: torch.Tensor, cache: LayerKV, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, partition: int | None = None,
                           config: DecodeConfig | None = None) -> torch.Tensor:
    """q (num_seqs, heads, head_dim) -> like q; block_tables (num_seqs, max_blocks), seq_lens
    (num_seqs,) on q's device. The grid covers max_blocks * block_size tokens; splits past a
    sequence's length store empty partials, or with config.skip_empty_splits (merging in place)
    exit at once; config.split_by_length sizes each sequence's splits from its length. config:
    the launch (default: for_format of the cache's)."""
    config = config or for_format(cache.format)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, payload_dim = cache.k.shape
    kind, group = family(cache.format)
    max_len = block_tables.shape[1] * block_size
    partition = partition or choose_partition(num_seqs, num_kv_heads, max_len, q.device, config)
    num_splits = -(-max_len // partition)
    dim_rows = max(16, triton.next_power_of_2(head_dim))  # tl.dot wants power-of-two sides of 16+
    q = q.contiguous()
    out = torch.empty_like(q)
    part_acc = q.new_empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32)
    part_max = q.new_empty(num_seqs, num_heads, num_splits, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    tables = block_tables.contiguous()
    k, v = cache.k, cache.v
    if k.dtype == torch.float8_e4m3fn:
        # as bytes, bitcast in the kernel: a constant `other=` cannot be cast to float8
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    group_rows = max(config.group_rows, triton.next_power_of_2(num_heads // num_kv_heads))
    counts = _arrival_counts(q.device, num_seqs * num_kv_heads) if config.merge_in_place else None
    in_place = num_splits > 1 and counts is not None
    triton_launch(
        _paged_decode_kernel, (num_seqs, num_kv_heads, num_splits),
        q, k, cache.k_scales, v, cache.v_scales, tables, seq_lens,
        # without merging in place the counters' argument is any pointer: the kernel does not read it
        out, part_acc, part_max, part_sum, counts if in_place else seq_lens, scale, tables.stride(0), num_splits,
        NUM_KV_HEADS=num_kv_heads, QUERIES_PER_KV=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        PAYLOAD_DIM=payload_dim, NUM_SCALES=cache.k_scales.shape[-1], BLOCK_SIZE=block_size,
        KIND=kind, GROUP=group,
        GROUP_ROWS=group_rows,
        # the split count is a runtime argument: as sequences grow the kernel is not recompiled
        DIM_ROWS=dim_rows, TILE=config.tile, PARTITION=partition, IS_SPLIT=num_splits > 1,
        # float32 models (the tests' reference runs) get full-precision dots, not TF32
        DOT_DTYPE=_dot_dtype(q.dtype, kind), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", K_IN_REGISTERS=config.k_in_registers,
        MERGE_IN_PLACE=in_place, SKIP_EMPTY=in_place and (config.skip_empty_splits or config.split_by_length),
        # a constant, 0 when off: on, each batch bucket compiles its own kernel
        SPLIT_TARGET=_wanted_splits(num_seqs, num_kv_heads, q.device) if in_place and config.split_by_length else 0,
        num_warps=config.num_warps,
        num_stages=config.num_stages, **({"maxnreg": config.max_registers} if config.max_registers else {}))
    if num_splits > 1 and not in_place:
        triton_launch(
            _merge_splits_kernel, (num_seqs * num_kv_heads,), out, part_acc, part_max, part_sum, num_splits,
            QUERIES_PER_KV=num_heads // num_kv_heads, HEAD_DIM=head_dim, GROUP_ROWS=group_rows, DIM_ROWS=dim_rows)
    return out


_COUNTS: dict[torch.device, torch.Tensor] = {}


def _arrival_counts(device: torch.device, groups: int) -> torch.Tensor | None:
    """The device's int32 counters of splits arrived per (sequence, KV head), zero between
    launches (the merging program zeroes its own). None where a launch cannot have them: more
    groups than MERGE_COUNTERS, or the first need of them comes inside a CUDA graph capture (a
    buffer made there would belong to the graph's pool). One stream at a time may use them."""
    if groups > MERGE_COUNTERS:
        return None
    if device not in _COUNTS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTS[device] = torch.zeros(MERGE_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTS[device]


def warm_up_decode(cache: LayerKV, num_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
    """Runs decode attention once per variant a step can meet (each partition, one split and
    several where max_len needs several), so that none compiles while serving. The split count
    is unspecialized (_VARYING), so two splits stand for any number. Reads block 0 only, writes
    nothing of the cache. Returns the number of launches."""
    device, block_size = cache.k.device, cache.k.shape[1]
    q = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    seq_lens = torch.ones(1, dtype=torch.long, device=device)
    config = for_format(cache.format)
    launches, partition = 0, config.tile
    while partition <= config.max_partition:
        for splits in (1, 2) if partition < max_len else (1,):
            tables = torch.zeros(1, -(-splits * partition // block_size), dtype=torch.long, device=device)
            paged_decode_attention(q, cache, tables, seq_lens, 1.0, partition=partition)
            launches += 1
        partition *= 2
    return launches


def triton_launch(kernel, grid: tuple[int, ...], *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs); one seam for every kernel of hma (quant_kernels.py's
    too), so a test can compile the exact launches for a GPU it does not have. Kernels that take
    a PDL constexpr launch with programmatic dependent launch where the GPU has it (await_inputs)."""
    if "PDL" in kernel.arg_names and _pdl(next(a.device for a in args if isinstance(a, torch.Tensor))):
        constexprs = {**constexprs, "PDL": True, "launch_pdl": True}
    kernel[grid](*args, **constexprs)


@functools.cache
def _pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later, not in the interpreter, HMA_PDL=0 turns it off."""
    return (device.type == "cuda" and not _INTERPRETED.value and os.environ.get("HMA_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """A decode step is a few hundred short kernels in a row, and each one's launch and ramp-up
    waited for the one before it to end. Launched with programmatic dependent launch (PDL), a
    kernel's programs may start while the kernel before it still runs: here they wait until that
    kernel has finished and its writes are visible, then let the next kernel's programs start
    launching in turn. Nothing before this call may read what an earlier kernel writes or write
    what it reads. On an H100 a qwen3-4b decode step at batch 1, context 1,024, took 3.58 and
    3.61 ms this way against 3.96 and 3.82 without (alternating runs of `bench speed`); batch 64,
    whose matrix products are cuBLAS's, moved within the runs' spread. Asking L2 for the
    matrix-vector kernel's weights before the wait made the step slower (4.22 ms, c601ba8)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
