"""Benchmarks: scripts that print a table and write JSON (`python -m hma bench NAME --help`)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path | None, data: dict, indent: int | None = 2) -> None:
    """Writes a benchmark's results to path (its folders made as needed); nothing if path is None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=indent))
