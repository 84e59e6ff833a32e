"""Bundled dataset names (the synthetic demo data) and where their files live."""

from __future__ import annotations

import os
from pathlib import Path

from layerviz.data.demo import generate
from layerviz.models import cache_root

BUNDLED = {"demo": "electronics", "demo-electronics": "electronics", "demo-movies": "movies"}


def demo_dir() -> Path:
    """$LAYERVIZ_DEMO_DIR, else the repo's data/demo (in a checkout), else the user cache."""
    if os.environ.get("LAYERVIZ_DEMO_DIR"):
        return Path(os.environ["LAYERVIZ_DEMO_DIR"])
    repo_data = Path(__file__).resolve().parents[2] / "data"
    if (repo_data / "README.md").exists():
        return repo_data / "demo"

    return cache_root() / "demo"


def resolve(name_or_path: str) -> Path:
    """A bundled name -> its folder (generated on first use); anything else -> a Path."""
    if name_or_path in BUNDLED:
        return generate(demo_dir()) / BUNDLED[name_or_path]
    return Path(name_or_path)
