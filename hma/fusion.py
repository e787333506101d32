"""Chains of small elementwise ops run as one GPU kernel each, and plain PyTorch elsewhere.

A decode step of one token per sequence is a few hundred tiny kernels; their count, not their
bytes, sets its time. Both decorators run fn plain (eager) unless its first argument is on a
CUDA device, so the eager function is the reference the GPU one is held to (fn.reference):
`gpu_kernel(name)` runs the hand-written Triton kernel hma.layer_kernels.<name> instead (the
decoder layer's chains, called hundreds of times a prefill, where torch.compile's per-call host
cost showed), `gpu_fused(fn)` runs fn compiled by torch.compile (the rarer chains). Shapes are
dynamic: one compilation serves every batch size above one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def gpu_kernel(name: str) -> Callable[[Callable], Callable]:
    """fn, run as hma.layer_kernels.<name> (same arguments) when called on CUDA tensors."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(x: torch.Tensor, *args, **kwargs):
            if not x.is_cuda:
                return fn(x, *args, **kwargs)
            from hma import layer_kernels  # Triton ships with CUDA builds of torch, not CPU ones

            return getattr(layer_kernels, name)(x, *args, **kwargs)

        run.reference = fn
        return run

    return wrap


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
