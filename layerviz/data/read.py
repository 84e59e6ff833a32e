"""``read_dataset``: any supported format by name or detected, dispatched to its reader (``formats`` for the
official Amazon and MovieLens files, ``atomic`` for RecBole's atomic files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from layerviz.data import formats
from layerviz.data.atomic import read_recbole
from layerviz.data.formats import DataFormatError, RawData


def read_dataset(path: str | Path, format: str = "auto", report: Callable[[str], None] | None = print,
                 title_field: str | None = None) -> RawData:
    """Read a dataset folder (or one reviews / .inter file in it) in any supported format.

    ``title_field`` names the RecBole ``.item`` field holding the titles (default: the first of
    title, movie_title, item_name, name)."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or folder. Give a dataset folder such as an "
                              "unpacked ml-100k/, a reviews file, or a dataset name (`layerviz data list`).")
    fmt = formats.detect_format(path) if format == "auto" else format
    if fmt not in formats.READERS and fmt != "recbole":
        raise DataFormatError(f"unknown format {fmt!r}; use one of: auto, {', '.join(formats.FORMATS)}.")
    if format == "auto" and report:
        report(f"{path}: detected format {fmt}")
    folder = path if path.is_dir() else path.parent
    if fmt == "recbole":
        return read_recbole(folder, path if path.is_file() else None, title_field)
    if title_field is not None:
        raise DataFormatError(f"title_field is for RecBole atomic files; {fmt} files have fixed title fields.")
    reader = formats.READERS[fmt]
    if fmt.startswith("amazon") and path.is_file():
        return reader(folder, reviews=path)
    return reader(folder)
