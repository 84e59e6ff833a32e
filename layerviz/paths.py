"""Where layerviz keeps files outside the repository (no torch, no pandas: importable by everything)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """User cache folder: $LAYERVIZ_CACHE, else $XDG_CACHE_HOME/layerviz, else ~/.cache/layerviz."""
    if os.environ.get("LAYERVIZ_CACHE"):
        return Path(os.environ["LAYERVIZ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layerviz"
