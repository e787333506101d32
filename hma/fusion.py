"""Chains of small elementwise ops compiled into one GPU kernel each (torch.compile emits Triton).

A decode step of one token per sequence is a few hundred tiny kernels; their count, not their
bytes, sets its time. `gpu_fused(fn)` runs fn compiled when its first argument is on a CUDA
device and plain (eager) everywhere else, so the eager function is the reference the compiled
one is held to. Shapes are dynamic: one compilation serves every batch size above one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def gpu_fused(fn: Callable) -> Callable:
    """fn, compiled into fused kernels when called on CUDA tensors."""
    compiled = None

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args, **kwargs):
        nonlocal compiled
        if not x.is_cuda:
            return fn(x, *args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(x, *args, **kwargs)

    run.reference = fn
    return run
