"""Results on disk: atomic writes (temp file, then rename) and JSON manifests with versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


def write_parquet(path: str | Path, df) -> Path:
    """Atomically write a DataFrame as parquet."""
    return atomic_write(Path(path), lambda tmp: df.to_parquet(tmp, index=False))


def _jsonable(o):
    if is_dataclass(o):
        return asdict(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("layerviz", "torch", "transformers", "numpy", "pandas"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def config_hash(*parts) -> str:
    """Short stable hash of JSON-able parts (configs, fingerprints): a cache key."""
    blob = json.dumps(parts, sort_keys=True, default=_jsonable)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def manifest(config, seed: int, **extra) -> dict:
    """What produced a result: config, seed, versions, time, plus fingerprints given as extras."""
    return {
        "config": asdict(config) if is_dataclass(config) else config,
        "seed": seed,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
