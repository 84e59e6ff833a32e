"""Results on disk: atomic writes (temp file, then rename), JSON manifests with versions, and the one
stage cache (``cached`` and ``Stages``) that the study, importance and adapter runs share.

A cached computation returns a dict of named outputs: DataFrames (parquet), ``Arrays`` (npz) or
JSON-able objects. They are written atomically, the marker file (with the key) last, and then read
back: the first run and a resumed run return the same shapes, so callers never cast.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from layerviz import parallel, passes


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


def git_commit(where: str | Path = ".") -> str | None:
    """The commit checked out at ``where`` (with '+dirty' when tracked files changed), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


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


class Arrays(dict):
    """Named numpy arrays, stored as one .npz file by ``cached``."""


def _write_output(folder: Path, name: str, obj) -> str:
    if isinstance(obj, pd.DataFrame):
        write_parquet(folder / f"{name}.parquet", obj)
        return f"{name}.parquet"
    if isinstance(obj, Arrays):
        atomic_write(folder / f"{name}.npz", lambda tmp: np.savez(open(tmp, "wb"), **obj))
        return f"{name}.npz"
    write_json(folder / f"{name}.json", obj)
    return f"{name}.json"


def read_outputs(folder: str | Path, files: list[str]) -> dict:
    """The outputs a cached computation wrote, by name (file stem)."""
    out = {}
    for f in files:
        p = Path(folder) / f
        if p.suffix == ".parquet":
            out[p.stem] = pd.read_parquet(p)
        elif p.suffix == ".npz":
            with np.load(p) as z:
                out[p.stem] = Arrays({k: z[k] for k in z.files})
        else:
            out[p.stem] = json.loads(p.read_text())
    return out


def cached(folder: str | Path, key: str, compute: Callable[[Path], dict], use_cache: bool = True,
           marker: str = "done.json", meta: dict | None = None, main_only: bool = False,
           count_passes: bool = False) -> tuple[dict, bool]:
    """Run ``compute(folder)`` once per ``key`` -> (outputs read back from disk, whether they were cached).

    The marker file (``key``, files, seconds, versions and ``meta``) is written last, so a run killed
    mid-way leaves no marker and is recomputed. ``compute`` may also write files of its own into
    ``folder`` (a model, say) before it returns. ``count_passes`` records the model passes ``compute`` ran
    (``passes``; under torchrun those of every process) in the marker; nested computations then count
    towards it unless they record their own.
    """
    folder = Path(folder)
    done = folder / marker

    def finished() -> list[str] | None:
        if use_cache and done.exists():
            doc = json.loads(done.read_text())
            if doc.get("key") == key:
                return doc["files"]
        return None

    # under torchrun every process takes rank 0's path (and reads rank 0's folder: a nested stage of a
    # process other than 0 runs in a private folder)
    files, where = parallel.broadcast((finished(), str(folder)))
    if files is not None:
        return read_outputs(where, files), True
    if not parallel.is_main():
        if main_only:  # rank 0 computes alone; read what it wrote
            parallel.barrier()
            return read_outputs(where, json.loads((Path(where) / marker).read_text())["files"]), False
        with tempfile.TemporaryDirectory(prefix="layerviz-rank-") as private:  # the same computation (its
            with passes.recording() if count_passes else nullcontext({}) as counted:  # share of the users, the
                result = compute(Path(private))  # same collectives), thrown away after
            out = read_outputs(private, [_write_output(Path(private), n, o) for n, o in result.items()])
            if count_passes:
                parallel.gather([dict(counted)])
        parallel.barrier()
        return out, False
    t0 = time.perf_counter()
    with passes.recording() if count_passes else nullcontext({}) as counted:
        result = compute(folder)
    files = [_write_output(folder, name, obj) for name, obj in result.items()]
    seconds = time.perf_counter() - t0
    extra = {}
    if count_passes:
        extra["passes"] = passes.combine([dict(counted)] if main_only else parallel.gather([dict(counted)]))
    write_json(done, {"key": key, "files": files, "seconds": seconds, "versions": versions(), **extra,
                      **(meta or {})})
    parallel.barrier()
    return read_outputs(folder, files), False


def where_free(obj):
    """Key parts without ``results_dir``: where results live is not what they are."""
    if isinstance(obj, dict):
        return {k: where_free(v) for k, v in obj.items() if k != "results_dir"}
    if isinstance(obj, list | tuple):
        return [where_free(v) for v in obj]
    return obj


class StageMissing(LookupError):
    """A stage is not computed (or was computed with other settings) and the caller only reads."""

    def __init__(self, name: str, root: Path, how: str = ""):
        super().__init__(f"stage {name!r} is not computed in {root} (or was computed with other settings)"
                         + (f"; {how}" if how else ""))
        self.name, self.root = name, root


class Stages:
    """The study's named stages under one root: each computed once per key (``cached``), reported as it runs.
    With ``compute`` false they are only read: a missing one raises ``StageMissing``."""

    def __init__(self, root: str | Path, report=print, use_cache: bool = True, compute: bool = True):
        self.root, self.use_cache, self.compute = Path(root), use_cache, compute
        self.report = report if parallel.is_main() else None  # under torchrun: rank 0 reports
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def __call__(self, name: str, key_parts, compute: Callable[[Path], dict], main_only: bool = False) -> dict:
        key = config_hash(name, where_free(key_parts), versions()["layerviz"])

        def announced(folder):
            if not self.compute:
                raise StageMissing(name, self.root)
            if self.report:
                self.report(f"[{name}] running")
            return compute(folder)

        t0 = time.perf_counter()
        out, was_cached = cached(self.root / name, key, announced, self.use_cache, main_only=main_only,
                                 count_passes=True)
        (self.skipped if was_cached else self.ran).append(name)
        if self.report and not was_cached:
            self.report(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
        return out


def slug(s: str) -> str:
    """A model spec or dataset path as one folder name."""
    return s.replace("/", "_").replace("\\", "_").strip("._") or "x"
