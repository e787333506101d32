"""What the decode attention kernel compiles to on a Hopper GPU, on a machine with no GPU.

`python -m hma bench compiled --attention '' --attention split_by_length=1 --json compiled.json`
Each KV format's default launch (one layer: 8 KV heads, 32 query heads, head_dim 128, batch x
context tokens), with each `--attention` set of DecodeConfig fields in turn, is compiled by
Triton for sm_90, specialized as a GPU launch would be (hma/bench/sm90.py). It reports the
registers a thread takes, the bytes spilled to local memory, the shared memory, the SASS
instructions (and a digest of them: equal digests are the same machine code) and, from registers
and shared memory, how many programs an H100 SM can hold. A kernel change can be checked for
occupancy here before GPU time is spent on it; the times are only the GPU's to say.
The figures hold for this machine's Triton (recorded in the JSON), whose compiler may differ
from a GPU machine's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import triton

from hma import kernels
from hma.bench import write_json
from hma.bench.sm90 import capture_launches, compile_for_hopper
from hma.kv_cache import LayerKV
from hma.kv_formats import get_kv_format

# An H100 SM (CUDA's occupancy rules for compute capability 9.0): 64K 32-bit registers in four
# quarters, allotted to warps 256 at a time; 228 KiB of shared memory in 128-byte units, of which
# each program also reserves 1 KiB and may take 227 KiB; at most 32 programs and 2,048 threads.
SM_REGISTERS, REGISTER_UNIT, SM_SHARED, SHARED_UNIT, PROGRAM_RESERVED = 65536, 256, 228 * 1024, 128, 1024
PROGRAM_SHARED, SM_PROGRAMS, SM_THREADS = 227 * 1024, 32, 2048
H100_SMS = 132


def _cuda_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(compiled, workdir: Path) -> dict:
    """Registers a thread, spilled bytes, shared memory (bytes), SASS instructions and the programs
    an H100 SM holds, of a compiled kernel (its cubin read by Triton's own cuobjdump)."""
    cubin = workdir / f"{compiled.metadata.name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([_cuda_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([_cuda_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spilled = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    shared = compiled.metadata.shared + int(re.search(r"SHARED:(\d+)", usage).group(1))
    warps = compiled.metadata.num_warps
    instructions = [line.split("*/", 1)[1].strip() for line in sass.splitlines() if re.match(r"^\s+/\*[0-9a-f]{4,}\*/", line)]
    return {"registers": registers, "spilled_bytes": spilled, "shared_bytes": shared,
            "sass_instructions": len(instructions),
            # equal digests: the same machine code, so a change that should not touch a kernel can be checked
            "sass_digest": hashlib.sha256("\n".join(instructions).encode()).hexdigest()[:12],
            "num_warps": warps, "programs_per_sm": programs_per_sm(registers, shared, warps)}


def programs_per_sm(registers: int, shared: int, warps: int) -> int:
    """Programs of this many registers a thread, bytes of shared memory and warps an H100 SM
    holds: registers go to warps 256 at a time from each of the SM's four 16K-register quarters,
    shared memory 128 bytes at a time plus 1 KiB a program (227 KiB at most a program)."""
    warp_registers = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (SM_REGISTERS // 4 // warp_registers) * 4 // warps
    program_shared = -(-shared // SHARED_UNIT) * SHARED_UNIT + PROGRAM_RESERVED
    if shared > PROGRAM_SHARED:
        return 0
    return min(by_registers, SM_SHARED // program_shared, SM_PROGRAMS, SM_THREADS // (32 * warps))


def attention_launch(kv_dtype: str, batch: int, context: int) -> tuple:
    """The (kernel, args, constexprs) of a format's default decode attention launch on an H100
    (132 SMs, which choose_partition's split sizes depend on), not run."""
    layer = LayerKV.empty(get_kv_format(kv_dtype), 1, 16, 8, 128, "cpu")  # the pools' shapes, not their size, matter
    q = torch.zeros(batch, 32, 128, dtype=torch.bfloat16)
    tables = torch.zeros(batch, -(-context // 16), dtype=torch.long)
    seq_lens = torch.ones(batch, dtype=torch.long)
    num_sms, kernels._num_sms = kernels._num_sms, lambda device: H100_SMS
    try:
        return capture_launches(lambda: kernels.paged_decode_attention(q, layer, tables, seq_lens, 0.1))[0]
    finally:
        kernels._num_sms = num_sms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hma bench compiled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-dtypes", default="bf16,fp8,int8,int4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--attention", action="append", default=None,
                        help="DecodeConfig fields set in every format's launch, e.g. split_by_length=1; "
                             "repeat it to compare ('' for the defaults)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench compiled compiles what a GPU runs: unset TRITON_INTERPRET")
    out = {"target": "sm_90", "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
           "batch_size": args.batch_size, "context_len": args.context, "runs": []}
    with tempfile.TemporaryDirectory() as workdir:
        for overrides in args.attention or [""]:
            kernels.LAUNCH_OVERRIDES.clear()
            kernels.LAUNCH_OVERRIDES.update(kernels.parse_overrides(overrides))
            try:
                for kv_dtype in args.kv_dtypes.split(","):
                    kernel, launch_args, constexprs = attention_launch(kv_dtype, args.batch_size, args.context)
                    found = resources(compile_for_hopper(kernel, launch_args, constexprs), Path(workdir))
                    out["runs"].append({"attention": overrides, "kv_dtype": kv_dtype, **found})
            finally:
                kernels.LAUNCH_OVERRIDES.clear()
    print_table(out)
    write_json(args.json, out)
    return out


def print_table(out: dict) -> None:
    print(f"decode attention compiled for {out['target']} (Triton {out['triton']}), "
          f"{out['batch_size']} x {out['context_len']} tokens")
    print(f"{'attention':>28} {'KV':>5} {'registers':>9} {'spilled':>7} {'shared KiB':>10} {'SASS':>6} {'per SM':>6} "
          f"{'digest':>12}")
    for run in out["runs"]:
        print(f"{run['attention'] or 'defaults':>28} {run['kv_dtype']:>5} {run['registers']:>9} "
              f"{run['spilled_bytes']:>7} {run['shared_bytes'] / 1024:>10.1f} {run['sass_instructions']:>6} "
              f"{run['programs_per_sm']:>6} {run['sass_digest']:>12}")
