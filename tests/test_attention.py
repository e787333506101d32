import pytest
import torch

from hma.attention import causal_attention, gather_kv, paged_attention, prefill_bucket, warm_up_prefill, write_kv
from hma.batch import Batch, SeqChunk, slots_for
from hma.kv_cache import LayerKV
from hma.kv_formats import KV_FORMATS, get_kv_format

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 4


def _layer(name: str, num_blocks: int = 16) -> LayerKV:
    return LayerKV.empty(get_kv_format(name), num_blocks, BLOCK, KV_HEADS, HEAD_DIM, "cpu")


@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_cache_keeps_the_raw_payload_and_dequantizes_only_when_read(name):
    fmt = get_kv_format(name)
    layer = _layer(name)
    k, v = torch.randn(2, 6, KV_HEADS, HEAD_DIM).unbind(0)
    slots = torch.tensor([9, 10, 11, 12, 13, 2])  # crosses from block 2 into 3, then block 0
    write_kv(layer, k, v, slots)
    payload, scales = fmt.quantize(k)
    assert torch.equal(layer.k.flatten(0, 1)[slots].view(torch.uint8), payload.view(torch.uint8))
    assert torch.equal(layer.k_scales.flatten(0, 1)[slots], scales)
    keys, values = gather_kv(layer, torch.tensor([[2, 3, 0]]), torch.float32)
    torch.testing.assert_close(keys[0, 1:6], fmt.dequantize(payload, scales, torch.float32)[:5])
    torch.testing.assert_close(values[0, 2 * BLOCK + 2], fmt.dequantize(*fmt.quantize(v[5]), torch.float32))


@pytest.mark.parametrize("name, bound", [("bf16", 0.01), ("fp8", 0.05), ("int8", 0.015),
                                         ("int4", 0.12), ("bfp8", 0.015)])
def test_decode_attention_over_quantized_blocks_stays_close_to_float(name, bound):
    gen = torch.Generator().manual_seed(0)
    lens = [13, 5, 9]
    tables = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    outs = {}
    for fmt in ("fp32", name):
        layer = _layer(fmt)
        gen.manual_seed(0)
        chunks = []
        for n, table in zip(lens, tables):
            k, v = torch.randn(2, n - 1, KV_HEADS, HEAD_DIM, generator=gen).unbind(0)
            slots = torch.tensor(slots_for(table, 0, n - 1, BLOCK))
            write_kv(layer, k, v, slots)
            chunks.append(SeqChunk([0], n - 1, table))
        batch = Batch.build([], chunks, BLOCK, "cpu")
        q, k, v = (torch.randn(3, h, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
        outs[fmt] = paged_attention(q, k, v, layer, batch, HEAD_DIM ** -0.5)
    error = (outs[name] - outs["fp32"]).norm() / outs["fp32"].norm()
    assert 0 < error < bound


def test_prefill_buckets_cover_every_length_with_little_padding():
    buckets = [prefill_bucket(n) for n in range(1, 16_385)]
    assert all(b >= n and b % 128 == 0 for n, b in enumerate(buckets, start=1))
    assert buckets == sorted(buckets)
    assert all(b <= n * 1.0625 for n, b in enumerate(buckets, start=1) if n > 2048)
    assert len(set(buckets)) == 64  # 16 up to 2,048, then 16 per doubling


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_padding_a_prompt_to_its_bucket_leaves_its_attention_unchanged(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(300, n, HEAD_DIM, generator=gen).to(device, dtype) for n in (HEADS, KV_HEADS, KV_HEADS))
    padded = causal_attention(q, k, v, 0.125, bucket=True)
    plain = causal_attention(q, k, v, 0.125, bucket=False)
    assert padded.shape == q.shape
    torch.testing.assert_close(padded, plain, atol=1e-5 if device == "cpu" else 1e-2, rtol=1e-4 if device == "cpu" else 1e-2)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_rows_past_a_prompt_pad_its_attention_as_zeros_would(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(400, n, HEAD_DIM, generator=gen).to(device, dtype) for n in (HEADS, KV_HEADS, KV_HEADS))
    # 300 real rows, then another prompt's (or a stale buffer's) rows up to and past the 384 bucket
    held = causal_attention(q, k, v, 0.125, bucket=True, length=300)
    copied = causal_attention(q[:300], k[:300], v[:300], 0.125, bucket=True)
    assert held.shape == (300, HEADS, HEAD_DIM)
    torch.testing.assert_close(held, copied, atol=1e-6 if device == "cpu" else 1e-3, rtol=1e-5 if device == "cpu" else 1e-3)


def test_prefill_warm_up_runs_nothing_off_cuda():
    assert warm_up_prefill(HEADS, KV_HEADS, HEAD_DIM, 4096, torch.float32, torch.device("cpu")) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_warm_up_runs_every_bucket_on_cuda():
    assert warm_up_prefill(HEADS, KV_HEADS, HEAD_DIM, 4096, torch.bfloat16, torch.device("cuda")) == 32
