"""Checkpoint loading: safetensors layouts, error paths, model resolution, and the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hma.checkpoint as checkpoint
from hma.checkpoint import (
    DEMO_DIR_NAME,
    fetch_demo_model,
    iter_safetensors,
    load_config_dict,
    load_tokenizer,
    resolve_model_path,
)
from hma.errors import CheckpointError, ModelNotFoundError

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g, dtype=torch.float64),
        "model.norm.weight": torch.randn(4, generator=g),
        "positions": torch.arange(5),
    }


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_and_single_file_yield_identical_tensors(tmp_path):
    tensors = _tensors()
    (tmp_path / "single").mkdir()
    (tmp_path / "sharded").mkdir()
    save_file(tensors, tmp_path / "single" / "model.safetensors")
    _write_sharded(tmp_path / "sharded", tensors)

    single = dict(iter_safetensors(tmp_path / "single", progress=False))
    sharded = dict(iter_safetensors(tmp_path / "sharded", progress=False))

    assert single.keys() == sharded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(single[name], tensor) and torch.equal(sharded[name], tensor)


def test_dtype_converts_floating_tensors_only(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)

    loaded = dict(iter_safetensors(tmp_path, dtype=torch.bfloat16, progress=False))

    assert loaded["positions"].dtype == torch.int64
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensors[name].to(torch.bfloat16))


def test_folder_without_safetensors_raises_naming_its_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        list(iter_safetensors(tmp_path, progress=False))


def test_index_naming_a_missing_shard_raises(tmp_path):
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        list(iter_safetensors(tmp_path, progress=False))


def test_config_dict_is_read_and_missing_config_raises(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_config_dict(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert load_config_dict(tmp_path) == {"hidden_size": 8}


def test_resolve_model_path_returns_local_folder_and_rejects_missing_path(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(ModelNotFoundError):
        resolve_model_path(str(tmp_path / "no" / "such" / "folder"))


def test_unreachable_hub_id_raises_model_not_found():
    with pytest.raises(ModelNotFoundError, match="hma-tests/no-such-model"):
        resolve_model_path("hma-tests/no-such-model")


def test_demo_cache_trusts_only_folders_with_marker(tmp_path, monkeypatch):
    def refuse_download(tmp: Path, out: Path) -> Path:
        raise ModelNotFoundError("download attempted")

    monkeypatch.setattr(checkpoint, "_download_demo_gguf", refuse_download)
    monkeypatch.setenv("HMA_CACHE", str(tmp_path))
    (tmp_path / DEMO_DIR_NAME).mkdir()
    with pytest.raises(ModelNotFoundError, match="download attempted"):
        fetch_demo_model()  # a half-written folder must be rebuilt, not returned

    (tmp_path / DEMO_DIR_NAME / checkpoint.COMPLETE_MARKER).write_text("{}")
    assert fetch_demo_model() == tmp_path / DEMO_DIR_NAME


def test_demo_config_tokenizer_and_weight_names(demo_model_path):
    config = load_config_dict(demo_model_path)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert load_tokenizer(demo_model_path).chat_template

    names = {name for name, _ in iter_safetensors(demo_model_path, progress=False)}
    assert len(names) == 30 * 9 + 2  # tied embeddings: no lm_head.weight
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.29.self_attn.k_proj.weight"} <= names


@pytest.fixture(scope="module")
def demo_model(demo_model_path):
    return LlamaForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo_prompt_ids(demo_model_path):
    tokenizer = load_tokenizer(demo_model_path)
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_converted_demo_answers_paris(demo_model_path, demo_model, demo_prompt_ids):
    tokenizer = load_tokenizer(demo_model_path)
    with torch.no_grad():
        out = demo_model.generate(**demo_prompt_ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, demo_prompt_ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_converted_demo_logits_match_gguf(demo_model_path, demo_model, demo_prompt_ids):
    # Reference: transformers' own GGUF loader, so a Q/K permutation bug cannot hide.
    gguf_file = json.loads((demo_model_path / checkpoint.COMPLETE_MARKER).read_text())["gguf_file"]
    reference = AutoModelForCausalLM.from_pretrained(demo_model_path, gguf_file=gguf_file, dtype=torch.float32)
    with torch.no_grad():
        ours = demo_model(**demo_prompt_ids).logits
        theirs = reference.eval()(**demo_prompt_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)
