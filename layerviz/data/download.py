"""Fetch real datasets (for machines with internet): verified checksums, never a partial file."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from layerviz.progress import progress


@dataclass(frozen=True)
class Source:
    """One downloadable file and how to check it."""

    url: str
    checksum: str | None  # "md5:<hex>" or "sha256:<hex>" as published; None if nothing is published
    unpack: bool = False  # unzip into the destination


SOURCES: dict[str, list[Source]] = {
    # GroupLens publishes these md5 sums next to the archives
    "ml-100k": [Source("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                       "md5:0e33842e24a9c977be4e0107933c0723", unpack=True)],
    "ml-1m": [Source("https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                     "md5:c4d9eecfca2ab87c1945afe126590906", unpack=True)],
    # Amazon Reviews 2023 (McAuley lab) publishes no checksums: the sha256 is recorded instead
    "amazon2023-electronics": [
        Source("https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/review_categories/Electronics.jsonl.gz", None),
        Source("https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/meta_categories/meta_Electronics.jsonl.gz", None),
    ],
}


class DownloadError(RuntimeError):
    """A download failed or did not match its checksum; nothing partial was kept."""


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch(source: Source, dest: Path, timeout: float = 60) -> Path:
    """Download one file into ``dest`` via a temp file; verify; rename. Returns the final path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = source.url.rstrip("/").rsplit("/", 1)[-1]
    final = dest / name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out, urllib.request.urlopen(source.url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress(total=total, unit="B", unit_scale=True, desc=name) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        if source.checksum:
            algo, want = source.checksum.split(":", 1)
            got = _digest(tmp, algo)
            if got != want:
                raise DownloadError(f"{name}: {algo} is {got}, expected {want}; the download is corrupt "
                                    "or the file changed upstream. Nothing was kept; try again.")
        tmp.replace(final)
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - any network/IO failure: clean up and explain
        raise DownloadError(f"could not download {source.url}: {e}. Nothing partial was kept. Without "
                            f"internet, fetch it elsewhere and put it in {dest}.") from e
    finally:
        tmp.unlink(missing_ok=True)
    if source.unpack:
        _unzip(final, dest)
    return final


def _unzip(archive: Path, dest: Path) -> None:
    """Extract into a temp folder, then move the top-level entries into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".unzip.", dir=dest))
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise DownloadError(f"{archive.name}: unsafe path {member!r} in archive")
            z.extractall(tmp)
        for entry in tmp.iterdir():
            target = dest / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            entry.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, dest: str | Path = "data/raw", sources: dict[str, list[Source]] | None = None) -> list[Path]:
    """Download a named dataset's files into ``dest``; returns the files written."""
    table = sources or SOURCES
    if name not in table:
        raise ValueError(f"unknown dataset {name!r}; downloadable: {', '.join(table)}")
    return [fetch(s, Path(dest)) for s in table[name]]
