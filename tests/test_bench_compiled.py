"""`bench compiled`: the decode attention compiled for sm_90 on a machine without a GPU."""

import json
import os
import subprocess
import sys

import pytest

from hma.bench import compiled


def test_an_sm_holds_programs_by_registers_shared_memory_and_warps():
    assert compiled.programs_per_sm(152, 68 * 1024, 4) == 3  # 19,456 registers and 69 KiB a program
    assert compiled.programs_per_sm(196, 68 * 1024, 4) == 2  # 25,600 registers: two fit in 64K
    assert compiled.programs_per_sm(192, 0, 2) == 4  # two 6,144-register warps a 16K quarter, not 10 an SM
    assert compiled.programs_per_sm(64, 100 * 1024, 4) == 2  # shared memory binds
    assert compiled.programs_per_sm(16, 45670, 4) == 4  # 45,696 in 128-byte units, + 1 KiB: five need <= 46,694
    assert compiled.programs_per_sm(16, 0, 4) == 16  # 2,048 threads an SM (registers would allow 32)
    assert compiled.programs_per_sm(16, 0, 1) == 32  # 32 programs an SM
    assert compiled.programs_per_sm(16, 228 * 1024, 4) == 0  # more than a program may take


def test_each_attention_set_is_compiled_for_each_format(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    result = subprocess.run([sys.executable, "-m", "hma", "bench", "compiled", "--kv-dtypes", "bf16,fp8",
                             "--batch-size", "1", "--context", "4096", "--attention", "",
                             "--attention", "split_by_length=1", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["attention"], r["kv_dtype"]) for r in runs] == [
        ("", "bf16"), ("", "fp8"), ("split_by_length=1", "bf16"), ("split_by_length=1", "fp8")]
    for run in runs:
        assert 32 <= run["registers"] <= 255 and run["shared_bytes"] > 0 and run["programs_per_sm"] >= 1
    # batch 1 over 4,096 tokens is split: sizing splits by length (and skipping empty ones) is more code
    assert runs[2]["sass_instructions"] > runs[0]["sass_instructions"]
    assert runs[2]["sass_digest"] != runs[0]["sass_digest"] and len(runs[0]["sass_digest"]) == 12
    assert "split_by_length=1" in result.stdout


def test_it_refuses_to_compile_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        compiled.main([])
