"""Triton launches compiled for sm_90 (Hopper) on any machine, GPU or none: what hma's kernels
would compile to on an H100, for the compile test and `bench compiled`."""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hma import kernels

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
                 torch.int32: "*i32", torch.float8_e4m3fn: "*fp8e4nv", torch.int8: "*i8", torch.uint8: "*u8"}


def capture_launches(run) -> list[tuple]:
    """(kernel, args, constexprs) of every kernels.triton_launch that run() makes, none of them run."""
    launches, real = [], kernels.triton_launch
    kernels.triton_launch = lambda kernel, grid, *args, **constexprs: launches.append((kernel, args, constexprs))
    try:
        run()
    finally:
        kernels.triton_launch = real
    return launches


def compile_for_hopper(kernel, args: tuple, constexprs: dict, pdl: bool = True):
    """Triton's compile of one launch for sm_90, specialized as Triton's launcher specializes it:
    integers equal to 1 as constants, integers divisible by 16 and 16-byte aligned pointers marked
    so (the loads' vector width and the loops' software pipelining depend on it), but for the
    arguments the kernel leaves unspecialized. pdl: as launched with programmatic dependent launch."""
    constexprs = dict(constexprs)
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in constexprs}
    constexprs.pop("launch_pdl", None)
    names = kernel.arg_names
    if "PDL" in names:
        constexprs["PDL"] = pdl
    fixed = _as_names(names, kernel.do_not_specialize)
    unaligned = fixed | _as_names(names, kernel.do_not_specialize_on_alignment)
    constexprs.update({n: 1 for n, a in zip(names, args) if type(a) is int and a == 1 and n not in fixed})
    signature = {n: POINTER_TYPES[a.dtype] if isinstance(a, torch.Tensor) else ("fp32" if isinstance(a, float) else "i32")
                 for n, a in zip(names, args)}
    signature.update({n: "constexpr" for n in constexprs})
    divisible = [n for n, a in zip(names, args) if n not in constexprs and n not in unaligned and (
        (isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0) or (type(a) is int and a % 16 == 0))]
    source = ASTSource(fn=kernel, signature=signature, attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible},
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _as_names(names: list[str], args: list) -> set[str]:
    """A kernel's argument list (names, or indices in older Triton) as names."""
    return {a if isinstance(a, str) else names[a] for a in args}
