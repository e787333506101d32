import subprocess
import sys


def _hma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hma", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_demo_models_answer(demo_model_path):
    run = _hma("generate", "--model", str(demo_model_path), "--chat", "--prompt", "What is the capital of France?",
               "--max-tokens", "16", "--device", "cpu", "--kv-memory-gb", "0.05", "--kv-dtype", "int8")
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout and "finish_reason=stop" in run.stderr


def test_bad_flags_give_one_clear_line():
    run = _hma("generate", "--model", "demo", "--prompt", "x", "--kv-dtype", "fp5")
    assert run.returncode != 0
    assert "kv_dtype='fp5'" in run.stderr and "Traceback" not in run.stderr
