"""Progress bars that show in a terminal or notebook and stay quiet in CI."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def enabled() -> bool:
    """False when LAYERVIZ_PROGRESS=0 or under CI (CI=true); True otherwise."""
    flag = os.environ.get("LAYERVIZ_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "False", "")
    return os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def progress(iterable=None, **kwargs):
    """tqdm (notebook-aware) over ``iterable``; disabled in CI."""
    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
