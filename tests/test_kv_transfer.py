import dataclasses

import pytest
import torch

from hma.batch import Batch, SeqChunk
from hma.errors import ProtocolError
from hma.kv_cache import KVCache
from hma.kv_formats import get_kv_format
from hma.kv_transfer import put_layer_kv, take_layer_kv, token_slots
from hma.wire import FrameDecoder, encode_bytes
from tests.helpers import hma_model_from_hf, tiny_hf_model

PROMPT = list(range(3, 40, 2))  # 19 tokens


@pytest.fixture(scope="module")
def model():
    return hma_model_from_hf(tiny_hf_model("Qwen3ForCausalLM"))


def _prefill_and_ship(model, fmt: str) -> list:
    """Prefill on a 4-token-block cache, taking each layer's KV the moment the layer finishes."""
    cache = KVCache(model.config, 16, 4, get_kv_format(fmt), "cpu")
    blocks = [9, 2, 14, 5, 7]  # scattered, as a busy allocator hands them out
    sent, order = [], []

    def on_layer(i: int) -> None:
        order.append(i)
        msg = take_layer_kv(cache, i, "r1", token_slots(cache, blocks, 0, len(PROMPT)), 0)
        sent.append(FrameDecoder().feed(encode_bytes(msg))[0])  # through the wire format

    logits = model(Batch.build([SeqChunk(PROMPT, 0, blocks)], [], 4, "cpu"), cache, on_layer)
    assert order == list(range(model.config.num_hidden_layers))
    return sent, int(logits.argmax())


def _decode_logits(model, cache: KVCache, blocks: list[int], token: int) -> torch.Tensor:
    return model(Batch.build([], [SeqChunk([token], len(PROMPT), blocks)], cache.block_size, "cpu"), cache)


@pytest.mark.parametrize("fmt", ["fp32", "fp8", "int8"])  # the tiny model has head_dim 24
def test_kv_shipped_per_layer_decodes_exactly_as_colocated(model, fmt):
    sent, first = _prefill_and_ship(model, fmt)
    # The decode host: another block size, other block ids, same format.
    remote = KVCache(model.config, 8, 16, get_kv_format(fmt), "cpu")
    for msg in sent:
        put_layer_kv(remote, [6, 3], msg, get_kv_format(fmt))
    local = KVCache(model.config, 16, 4, get_kv_format(fmt), "cpu")
    model(Batch.build([SeqChunk(PROMPT, 0, [0, 1, 2, 3, 4, 5])], [], 4, "cpu"), local)
    expected = _decode_logits(model, local, [0, 1, 2, 3, 4, 5], first)
    torch.testing.assert_close(_decode_logits(model, remote, [6, 3], first), expected, atol=0, rtol=0)


def test_a_different_local_format_is_transcoded_on_arrival(model):
    sent, first = _prefill_and_ship(model, "fp8")
    remote = KVCache(model.config, 8, 16, get_kv_format("int8"), "cpu")
    for msg in sent:
        put_layer_kv(remote, [1, 0], msg, get_kv_format("fp8"))
    assert remote.layers[0].k.dtype == torch.int8
    reference = KVCache(model.config, 8, 16, get_kv_format("fp32"), "cpu")
    model(Batch.build([SeqChunk(PROMPT, 0, [1, 0])], [], 16, "cpu"), reference)
    got, want = _decode_logits(model, remote, [1, 0], first), _decode_logits(model, reference, [1, 0], first)
    assert ((got - want).norm() / want.norm()) < 0.05


def test_kv_that_does_not_fit_the_model_is_refused(model):
    sent, _ = _prefill_and_ship(model, "int8")
    remote = KVCache(model.config, 8, 16, get_kv_format("int8"), "cpu")
    with pytest.raises(ProtocolError, match="fp8 KV"):
        put_layer_kv(remote, [0, 1], sent[0], get_kv_format("fp8"))  # mislabelled format
    bad = dataclasses.replace(sent[0], layer=99)
    with pytest.raises(ProtocolError, match="layer 99"):
        put_layer_kv(remote, [0, 1], bad, get_kv_format("int8"))
