"""RecBole's atomic files: ``<name>.inter``, ``<name>.item`` and an optional ``<name>.user``.

Tab-separated UTF-8 with one header line of ``field:type``, type one of ``token``, ``token_seq``
(space-separated), ``float`` or ``float_seq``. The header carries each column's meaning, so nothing is
guessed: user, item, rating and timestamp are taken by RecBole's field names, the title from the first of
``TITLE_FIELDS`` present (or the field named by ``title_field``). An ``.inter`` without a rating field is
implicit feedback: every interaction is a positive.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from layerviz.data.formats import (
    DataFormatError,
    RawData,
    items_frame,
    open_binary,
    typed_interactions,
)

TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("title", "movie_title", "item_name", "name")
CATEGORY_FIELDS = ("genre", "class", "categories", "category", "tags")
IMPLICIT_RATING = 1.0
"""The rating an implicit interaction gets (``RawData.implicit`` tells the protocol they are all positive)."""


def read_header(path: Path) -> dict[str, str]:
    """{field: type} from an atomic file's header; a column without a known ``:type`` raises naming it."""
    with open_binary(path) as f:
        line = f.readline().decode("utf-8").rstrip("\r\n")
    if not line.strip():
        raise DataFormatError(f"{path}: empty file (an atomic file starts with a header of field:type columns).")
    out = {}
    for col in line.split("\t"):
        name, _, kind = col.rpartition(":")
        if not name or kind not in TYPES:
            raise DataFormatError(
                f"{path.name}: header column {col!r} has no type suffix; RecBole atomic headers are field:type "
                f"with type one of {', '.join(TYPES)} (e.g. user_id:token, rating:float). Add the suffixes, or "
                "use another format.")
        out[name] = kind
    return out


def _table(path: Path, header: dict[str, str], keep: list[str]) -> pd.DataFrame:
    """The ``keep`` columns of an atomic file, as strings (empty cells stay '')."""
    with open_binary(path) as f:
        try:
            df = pd.read_csv(f, sep="\t", header=0, names=list(header), usecols=keep, dtype=str,
                             quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8", engine="c")
        except pd.errors.ParserError as e:
            raise DataFormatError(f"{path}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}: not valid UTF-8 ({e.reason}); atomic files are UTF-8.") from None
    return df


def _present(header: dict[str, str]) -> str:
    """The header's fields as an error message lists them: 'user_id:token, item_id:token, ...'."""
    return ", ".join(f"{k}:{v}" for k, v in header.items())


def _need(path: Path, header: dict[str, str], field: str, what: str) -> None:
    if field not in header:
        raise DataFormatError(f"{path.name}: no {field} field ({what}); the fields present are {_present(header)}.")


def _files(folder: Path, inter: Path | None) -> tuple[Path, Path]:
    if inter is None:
        hits = sorted(folder.glob("*.inter"))
        if len(hits) != 1:
            found = ", ".join(p.name for p in hits) or "none"
            raise DataFormatError(f"{folder}: expected one <name>.inter file, found {found}; pass the .inter "
                                  "file itself as the dataset path.")
        inter = hits[0]
    item = inter.with_suffix(".item")
    if not item.exists():
        raise DataFormatError(f"{inter}: no {item.name} next to it. Titles come from the .item file and are "
                              "required: the LLM recommender reads titles, not ids.")
    return inter, item


def read_interactions(path: Path) -> tuple[pd.DataFrame, bool]:
    """The normalized interactions of an ``.inter`` file, and whether it is implicit (no rating field)."""
    header = read_header(path)
    for f, what in (("user_id", "who interacted"), ("item_id", "with what"),
                    ("timestamp", "needed for the chronological leave-one-out split")):
        _need(path, header, f, what)
    implicit = "rating" not in header
    df = _table(path, header, [f for f in ("user_id", "item_id", "rating", "timestamp") if f in header])
    if implicit:
        df["rating"] = str(IMPLICIT_RATING)
    # timestamps are float-typed in RecBole; whole seconds are kept
    df["timestamp"] = pd.to_numeric(df["timestamp"], errors="coerce").round()
    return typed_interactions(df, path, {}), implicit


def title_column(path: Path, header: dict[str, str], title_field: str | None) -> str:
    """The field titles are read from: ``title_field``, else the first of TITLE_FIELDS present."""
    if title_field is not None:
        _need(path, header, title_field, "named by title_field")
        name = title_field
    else:
        name = next((f for f in TITLE_FIELDS if f in header), None)
        if name is None:
            raise DataFormatError(
                f"{path.name}: no title field (looked for {', '.join(TITLE_FIELDS)}); the fields present are "
                f"{_present(header)}. Pass title_field= (--title-field) naming the field that holds the item titles.")
    if header[name].startswith("float"):
        raise DataFormatError(f"{path.name}: title field {name!r} is typed {header[name]}: a number is not a "
                              "title. Pass title_field= (--title-field) naming a text field.")
    return name


def read_items(path: Path, title_field: str | None = None, year_field: str | None = None) -> pd.DataFrame:
    """The normalized items of an ``.item`` file; ``year_field`` appends ' (year)' as MovieLens titles have."""
    header = read_header(path)
    _need(path, header, "item_id", "the id the .inter file refers to")
    title = title_column(path, header, title_field)
    cats = next((f for f in CATEGORY_FIELDS if f in header), None)
    keep = ["item_id", title] + [f for f in (cats, year_field) if f and f in header]
    df = _table(path, header, list(dict.fromkeys(keep)))
    texts = df[title].str.strip()
    numeric = pd.to_numeric(texts[texts != ""], errors="coerce").notna()
    if len(numeric) and numeric.mean() > 0.9:
        raise DataFormatError(f"{path.name}: title field {title!r} holds numbers (e.g. {texts.iloc[0]!r}), not "
                              "titles. Pass title_field= (--title-field) naming the field with the item names; "
                              f"fields present: {_present(header)}.")
    if year_field and year_field in header:
        year = pd.to_numeric(df[year_field], errors="coerce")
        has = year.notna() & (texts != "")
        texts = texts.where(~has, texts + " (" + year.fillna(0).astype(np.int64).astype(str) + ")")
    categories = df[cats].str.split().str.join("|") if cats else ""
    return items_frame(df["item_id"], texts, categories)


def read_recbole(folder: Path, inter: Path | None = None, title_field: str | None = None,
                 year_field: str | None = None, domain: str = "items") -> RawData:
    """An atomic dataset (folder with one ``.inter``, or the ``.inter`` file) in the normalized schema."""
    inter, item = _files(folder, inter)
    interactions, implicit = read_interactions(inter)
    items = read_items(item, title_field, year_field)
    files = [str(inter), str(item)]
    user = inter.with_suffix(".user")
    if user.exists():  # user features are not used; a broken header is still an error
        _need(user, read_header(user), "user_id", "whose features these are")
        files.append(str(user))
    return RawData(inter.stem, "recbole", domain, interactions, items, files, implicit=implicit)

