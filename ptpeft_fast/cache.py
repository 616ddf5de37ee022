"""Where ptpeft_fast caches what it builds once: the compiled extension, the converted SmolLM2
weights, the pre-trained tiny-blip2 (below both the library and the training application).

``$PTPEFT_FAST_CACHE``, else ``$XDG_CACHE_HOME/ptpeft_fast``, else ``~/.cache/ptpeft_fast``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache root (created if missing)."""
    root = os.environ.get("PTPEFT_FAST_CACHE")
    if root:
        path = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "ptpeft_fast"
    path.mkdir(parents=True, exist_ok=True)
    return path
