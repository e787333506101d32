"""KV formats: round-trip error bounds, the int4 wire packing, byte accounting, edge inputs."""

from __future__ import annotations

import pytest
import torch

from hma.errors import InvalidRequestError
from hma.kv_formats import KV_FORMATS, SCALE_DTYPE, Int4Format, get_kv_format

SHAPES = [(7, 4, 128), (5, 3, 64)]  # (num_tokens, num_kv_heads, head_dim)
OUTLIER_CHANNELS = [3, 17, 29]  # all in int4 group 0, so groups 1.. are outlier-free

# relative Frobenius error of quantize -> dequantize on randn, seed 0; measured worst of SHAPES:
# fp32 0, fp16 2.1e-4, bf16 1.7e-3, fp8 0.0256, int8 0.0069, int4 0.0793, bfp8 0.0075
RANDN_BOUND = {
    "fp32": 0.0, "fp16": 4e-4, "bf16": 3e-3, "fp8": 0.035, "int8": 0.01, "int4": 0.10, "bfp8": 0.01,
}
# the same with OUTLIER_CHANNELS scaled by 100; measured worst of SHAPES:
# fp32 0, fp16 1.9e-4, bf16 2.0e-3, fp8 0.013, int8 0.0215, int4 0.132, bfp8 0.0126
OUTLIER_BOUND = {
    "fp32": 0.0, "fp16": 4e-4, "bf16": 3e-3, "fp8": 0.02, "int8": 0.03, "int4": 0.17, "bfp8": 0.02,
}


def randn(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_outliers(shape: tuple[int, ...]) -> torch.Tensor:
    x = randn(shape)
    x[..., OUTLIER_CHANNELS] *= 100
    return x


def round_trip(name: str, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    fmt = get_kv_format(name)
    return fmt.dequantize(*fmt.quantize(x), dtype)


def relative_error(y: torch.Tensor, x: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(y.float() - x.float()) / torch.linalg.vector_norm(x.float())).item()


def test_registry_holds_every_format_under_its_name():
    assert list(KV_FORMATS) == ["fp32", "fp16", "bf16", "fp8", "int8", "int4", "bfp8"]
    assert all(fmt.name == name for name, fmt in KV_FORMATS.items())
    assert [n for n, f in KV_FORMATS.items() if not f.is_quantized] == ["fp32", "fp16", "bf16"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_quantize_gives_declared_shapes_and_dtypes(name, shape):
    fmt = get_kv_format(name)
    payload, scales = fmt.quantize(randn(shape))
    head_dim = shape[-1]
    assert payload.shape == (*shape[:-1], fmt.payload_dim(head_dim)) and payload.dtype == fmt.payload_dtype
    assert scales.shape == (*shape[:-1], fmt.num_scales(head_dim)) and scales.dtype == SCALE_DTYPE


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_round_trip_error_on_random_normal_within_bound(name, shape):
    x = randn(shape)
    assert relative_error(round_trip(name, x), x) <= RANDN_BOUND[name]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_round_trip_error_with_outlier_channels_within_bound(name, shape):
    x = with_outliers(shape)
    assert relative_error(round_trip(name, x), x) <= OUTLIER_BOUND[name]


@pytest.mark.parametrize("shape", SHAPES)
def test_int4_groups_protect_outlier_free_groups_better_than_one_scale_per_row(shape):
    # measured error on groups 1..: grouped 0.079 / 0.074, one group per row 2.99 / 4.73
    x = with_outliers(shape)
    per_row = Int4Format("int4-row", torch.uint8, group_size=shape[-1])
    grouped_error = relative_error(round_trip("int4", x)[..., 32:], x[..., 32:])
    per_row_y = per_row.dequantize(*per_row.quantize(x), torch.float32)
    per_row_error = relative_error(per_row_y[..., 32:], x[..., 32:])
    assert grouped_error <= RANDN_BOUND["int4"]
    assert per_row_error > 10 * grouped_error


def test_int4_round_trip_is_exact_for_representable_values():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (6, 2, 4, 32), generator=gen)  # (num_tokens, num_kv_heads, num_groups, 32)
    q[..., 0], q[..., 1] = 0, 15  # each group spans the full range, so min and scale are recovered
    # dyadic scales and minimums: exact in float16 and in every float32 step of quantize
    scale = torch.randint(1, 64, (6, 2, 4, 1), generator=gen) / 64
    low = torch.randint(-64, 64, (6, 2, 4, 1), generator=gen) / 16
    x = (q * scale + low).flatten(-2)  # (6, 2, 128)
    assert torch.equal(round_trip("int4", x), x)


def test_int4_packs_even_element_in_low_nibble():
    x = torch.zeros(1, 1, 32)
    x[..., 1] = 15.0  # group min 0, scale 1: q = x, so byte 0 holds element 0 (=0) low, element 1 (=15) high
    x[..., 2] = 3.0
    payload, scales = get_kv_format("int4").quantize(x)
    assert payload[0, 0, :2].tolist() == [0xF0, 0x03]
    assert scales[0, 0].tolist() == [1.0, 0.0]  # [scale_0, min_0]


def test_bfp8_steps_are_the_smallest_powers_of_two_that_fit():
    payload, scales = get_kv_format("bfp8").quantize(with_outliers((7, 4, 128)))
    mantissa, exponent = torch.frexp(scales.float())
    assert (mantissa == 0.5).all()  # every step is an exact power of two
    block_max = payload.float().abs().unflatten(-1, (-1, 16)).amax(-1)
    assert (block_max <= 127).all() and (block_max >= 64).all()  # half the step would overflow


@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(8, 128), (3, 64)])
@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_bytes_per_token_counts_payload_and_scales(name, num_kv_heads, head_dim):
    fmt = get_kv_format(name)
    payload, scales = fmt.quantize(randn((1, num_kv_heads, head_dim)))
    actual = payload.numel() * payload.element_size() + scales.numel() * scales.element_size()
    assert fmt.bytes_per_token(num_kv_heads, head_dim) == actual


@pytest.mark.parametrize("head_dim", [128, 64])
def test_quantized_formats_save_bytes_against_bf16(head_dim):
    def ratio(name: str) -> float:
        bf16_bytes = get_kv_format("bf16").bytes_per_token(8, head_dim)
        return get_kv_format(name).bytes_per_token(8, head_dim) / bf16_bytes

    assert ratio("fp8") <= 0.53 and ratio("int8") <= 0.53  # (head_dim + 2) / (2 * head_dim)
    assert ratio("bfp8") == pytest.approx(18 / 32)  # the block exponent is counted as its 2 float16 bytes
    assert ratio("int4") == pytest.approx(0.3125)  # (head_dim / 2 + 4 * head_dim / 32) / (2 * head_dim)


@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_zeros_round_trip_to_zeros(name):
    x = torch.zeros(3, 2, 64)
    x[0, 0, :32] = 1.0  # one nonzero group beside all-zero vectors and groups
    y = round_trip(name, x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1:], x[1:]) and torch.equal(y[0, 0, 32:], x[0, 0, 32:])


@pytest.mark.parametrize("magnitude", [1e-7, 1e4])
@pytest.mark.parametrize("name", ["fp8", "int8", "int4", "bfp8"])
def test_tiny_and_large_values_stay_finite(name, magnitude):
    y = round_trip(name, randn((3, 2, 64)) * magnitude)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_half_precision_input_round_trips_into_requested_dtype(name, in_dtype):
    x = randn((7, 4, 128)).to(in_dtype)
    y = round_trip(name, x, dtype=in_dtype)
    assert y.dtype == in_dtype and y.shape == x.shape
    # the output cast adds at most one bf16/fp16 rounding (3e-3) to the format's own error
    assert relative_error(y, x) <= RANDN_BOUND[name] + 3e-3


def test_unknown_name_raises_listing_the_known_ones():
    with pytest.raises(InvalidRequestError, match="fp8, int8, int4, bfp8"):
        get_kv_format("nf4")


@pytest.mark.parametrize(("name", "head_dim"), [("int4", 48), ("bfp8", 24)])
def test_head_dim_that_does_not_fill_groups_raises(name, head_dim):
    fmt = get_kv_format(name)
    with pytest.raises(InvalidRequestError, match="multiple of"):
        fmt.payload_dim(head_dim)
    with pytest.raises(InvalidRequestError, match="multiple of"):
        fmt.quantize(torch.ones(2, head_dim))
