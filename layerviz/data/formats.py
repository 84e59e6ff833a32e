"""Readers for the official Amazon (2014/2018/2023) and MovieLens (100K/1M/latest) files, and the
dispatch to RecBole's atomic files (``layerviz.data.atomic``).

Every reader returns the same normalized schema:
  interactions: user_id (str), item_id (str), rating (float32), timestamp (int64, Unix seconds)
  items:        item_id (str), title (str), categories (str, '|'-separated; hierarchy with ' > ')

Files are streamed line by line (``.gz`` transparently) and only the needed fields
are kept, so a multi-GB Amazon file never sits in memory twice.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title", "categories"]

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]

FORMATS = ["amazon2014", "amazon2018", "amazon2023", "ml-100k", "ml-1m", "ml-latest", "recbole"]


class DataFormatError(ValueError):
    """A data file is missing, malformed, or in another format; the message names the fix."""


class DataWarning(UserWarning):
    """Rows were skipped or repaired while reading; the message counts them."""


@dataclass
class RawData:
    """One dataset in the normalized schema, as read from its files."""

    name: str
    format: str
    domain: str  # the item noun of the prompts ("products", "movies", "items", ...)
    interactions: pd.DataFrame
    items: pd.DataFrame
    files: list[str] = field(default_factory=list)
    implicit: bool = False  # no ratings in the files: every interaction is a positive


# ----------------------------------------------------------------------------- low level


def open_binary(path: Path):
    if not path.exists():
        raise DataFormatError(f"{path}: file not found. Check the path, or run `layerviz data download`.")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def iter_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-empty line; invalid bytes raise naming the line."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    f"{path}:{lineno}: bytes {raw[e.start:e.end]!r} are not valid {encoding}. "
                    "MovieLens 100K/1M files are latin-1: pass encoding='latin-1' (or the right "
                    "format=) if this file is one of them; otherwise the file is corrupt."
                ) from None
            if line.strip():
                yield lineno, line


def sniff(path: Path, encoding: str = "utf-8") -> str:
    """Guess what kind of lines a file holds: json, pyliteral, tsv4, dcolon, csv:<header>, csv4."""
    for _, line in iter_lines(path, "latin-1" if encoding == "latin-1" else "utf-8"):
        s = line.strip()
        if s.startswith("{"):
            try:
                json.loads(s)
                return "json"
            except json.JSONDecodeError:
                try:
                    ast.literal_eval(s)
                    return "pyliteral"
                except (ValueError, SyntaxError):
                    return "broken-json"
        if "::" in s:
            return "dcolon"
        if "\t" in s and len(s.split("\t")) == 4:
            return "tsv4"
        if "|" in s and len(s.split("|")) >= 5:
            return "pipe"
        if "," in s:
            first = s.split(",")
            if any(re.fullmatch(r"[A-Za-z_]+", c) for c in first) and not any(
                re.fullmatch(r"[\d.]+", c) for c in first[2:]
            ):
                return "csv:" + s
            return "csv4" if len(first) == 4 else "csv"
        return "unknown"
    raise DataFormatError(f"{path}: file is empty.")


_KIND_HINT = {
    "pyliteral": "Amazon 2014 meta (Python literals); pass format='amazon2014'",
    "json": "strict JSON lines (Amazon 2014 reviews, 2018, or 2023 .jsonl)",
    "dcolon": "MovieLens 1M ('::'-separated); pass format='ml-1m'",
    "tsv4": "MovieLens 100K u.data (tab-separated); pass format='ml-100k'",
    "csv4": "a headerless ratings CSV item,user,rating,timestamp (Amazon 2018); pass format='amazon2018'",
}


def _kind_hint(kind: str) -> str:
    if kind.startswith("csv:"):
        header = kind[4:]
        if header.startswith("userId"):
            return "MovieLens latest/25M CSV; pass format='ml-latest'"
        if "parent_asin" in header:
            return "an Amazon 2023 benchmark CSV; pass format='amazon2023'"
        return f"a CSV with header {header!r}"
    return _KIND_HINT.get(kind, "an unrecognized layout")


def _expect(path: Path, kinds: tuple[str, ...], fmt: str, encoding: str = "utf-8") -> None:
    kind = sniff(path, encoding)
    if not any(kind == k or (k.endswith(":") and kind.startswith(k)) for k in kinds):
        raise DataFormatError(
            f"{path.name} does not look like {fmt}: it looks like {_kind_hint(kind)}."
        )


class _Skips:
    """Counts skipped rows per file and warns once, with the first offending line."""

    def __init__(self, path: Path):
        self.path, self.count, self.first, self.why = path, 0, None, ""

    def add(self, lineno: int, why: str) -> None:
        self.count += 1
        if self.first is None:
            self.first, self.why = lineno, why

    def report(self) -> None:
        if self.count:
            warnings.warn(
                f"{self.path.name}: skipped {self.count} row(s) with missing or bad fields "
                f"(first at line {self.first}: {self.why}). Check the file if this is unexpected.",
                DataWarning, stacklevel=3,
            )


def _read_records(
    path: Path, parse: Callable[[str], dict], fields: tuple[str, ...], fmt: str
) -> Iterator[tuple[int, dict]]:
    """Parse each line into a dict holding ``fields``; rows missing any are counted and skipped."""
    skips = _Skips(path)
    for lineno, line in iter_lines(path):
        try:
            rec = parse(line)
        except (ValueError, SyntaxError) as e:
            kind = sniff(path)
            raise DataFormatError(
                f"{path}:{lineno}: cannot parse as {fmt} ({type(e).__name__}); the file looks "
                f"like {_kind_hint(kind)}."
            ) from None
        missing = [f for f in fields if rec.get(f) in (None, "")]
        if missing:
            skips.add(lineno, f"missing {', '.join(missing)}")
            continue
        yield lineno, rec
    skips.report()


def _interactions(users, items, ratings, times) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": pd.array(users, dtype=str), "item_id": pd.array(items, dtype=str),
        "rating": np.asarray(ratings, dtype=np.float32), "timestamp": np.asarray(times, dtype=np.int64),
    })


def items_frame(ids, titles, cats) -> pd.DataFrame:
    df = pd.DataFrame({"item_id": pd.array(ids, dtype=str), "title": titles, "categories": cats})
    df["title"] = df["title"].astype(str).str.strip()
    return df.drop_duplicates("item_id", keep="first").reset_index(drop=True)


def _json_reviews(path: Path, user: str, item: str, rating: str, ts: str, fmt: str,
                  ts_scale: int = 1) -> pd.DataFrame:
    _expect(path, ("json",), fmt)
    u, i, r, t = [], [], [], []
    for lineno, rec in _read_records(path, json.loads, (user, item, rating, ts), fmt):
        try:
            rv, tv = float(rec[rating]), int(rec[ts]) // ts_scale
        except (TypeError, ValueError):
            raise DataFormatError(
                f"{path}:{lineno}: {rating}={rec[rating]!r} / {ts}={rec[ts]!r} are not numbers."
            ) from None
        u.append(rec[user]), i.append(rec[item]), r.append(rv), t.append(tv)
    return _interactions(u, i, r, t)


def _join_categories(value) -> str:
    if not value:
        return ""
    if isinstance(value, str):
        return value
    if all(isinstance(v, list | tuple) for v in value):  # Amazon 2014: list of paths
        return "|".join(" > ".join(map(str, v)) for v in value)
    return " > ".join(map(str, value))


def _meta(path: Path, parse, item: str, cat_fields: tuple[str, ...], fmt: str, keep: set | None,
          expect: str) -> pd.DataFrame:
    _expect(path, (expect,), fmt)
    ids, titles, cats = [], [], []
    for _, rec in _read_records(path, parse, (item,), fmt):
        if keep is not None and rec[item] not in keep:
            continue
        ids.append(rec[item])
        titles.append(rec.get("title") or "")
        cats.append(next((_join_categories(rec[c]) for c in cat_fields if rec.get(c)), ""))
    return items_frame(ids, titles, cats)


def _csv(path: Path, names: list[str] | None, usecols, sep=",", encoding="utf-8") -> pd.DataFrame:
    with open_binary(path) as f:
        try:
            return pd.read_csv(f, sep=sep, names=names, header=0 if names is None else None,
                               usecols=usecols, encoding=encoding, dtype=str, engine="c",
                               keep_default_na=False)
        except UnicodeDecodeError:
            for _ in iter_lines(path, encoding):  # raises naming the line
                pass
            raise
        except pd.errors.ParserError as e:
            raise DataFormatError(f"{path}: {e}") from None


def typed_interactions(df: pd.DataFrame, path: Path, cols: dict[str, str], ts_scale: int = 1) -> pd.DataFrame:
    """Rename to the normalized schema; drop (and count) rows with empty/non-numeric fields."""
    df = df.rename(columns=cols)[INTERACTION_COLUMNS]
    rating = pd.to_numeric(df["rating"], errors="coerce")
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    bad = rating.isna() | ts.isna() | (df["user_id"] == "") | (df["item_id"] == "")
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0]) + 1
        warnings.warn(f"{path.name}: skipped {int(bad.sum())} row(s) with missing or bad fields "
                      f"(first at data row {first}).", DataWarning, stacklevel=3)
    df = df[~bad]
    return _interactions(df["user_id"], df["item_id"], rating[~bad], ts[~bad].astype(np.int64) // ts_scale)


# ----------------------------------------------------------------------------- formats


def _one(folder: Path, patterns: list[str], what: str, exclude: str | None = None) -> Path:
    hits = sorted({p for pat in patterns for p in folder.glob(pat)
                   if not (exclude and p.name.startswith(exclude))})
    if not hits:
        raise DataFormatError(f"{folder}: no {what} file (looked for {', '.join(patterns)}).")
    if len(hits) > 1:
        raise DataFormatError(
            f"{folder}: several {what} files ({', '.join(p.name for p in hits)}); "
            "pass the one you want as the dataset path."
        )
    return hits[0]


def _reviews_kind(path: Path) -> str | None:
    """'amazon2014'/'amazon2018'/'amazon2023' when ``path`` holds Amazon review lines, else None."""
    try:
        for _, line in iter_lines(path):
            rec = json.loads(line)
            if "reviewerID" in rec and "asin" in rec:
                return "amazon2014" if path.name.startswith("reviews_") else "amazon2018"
            if "user_id" in rec and "parent_asin" in rec:
                return "amazon2023"
            return None
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return None


META_NAMES = {"amazon2014": "meta_{cat}.json.gz (Python literals)", "amazon2018": "meta_{cat}.json.gz",
              "amazon2023": "meta_{cat}.jsonl(.gz)"}


def _missing_meta(reviews: Path, fmt: str) -> DataFormatError:
    cat = re.sub(r"^reviews_", "", reviews.name.split(".")[0])
    cat = re.sub(r"_5$", "", cat) or "<Cat>"
    meta = META_NAMES[fmt].format(cat=cat)
    return DataFormatError(
        f"{reviews}: recognised as {fmt} reviews, but the item metadata file is missing: put {meta} from the "
        f"same release next to it. Item titles come from the metadata and are required: the LLM recommender "
        "reads titles, not ids."
    )


def read_amazon2014(folder: Path, reviews: Path | None = None) -> RawData:
    reviews = reviews or _one(folder, ["reviews_*.json", "reviews_*.json.gz"], "reviews_<Cat>_5.json")
    inter = _json_reviews(reviews, "reviewerID", "asin", "overall", "unixReviewTime", "Amazon 2014 reviews")
    if not any(folder.glob("meta_*.json*")):
        raise _missing_meta(reviews, "amazon2014")
    meta = _one(folder, ["meta_*.json", "meta_*.json.gz"], "meta_<Cat>.json")
    items = _meta(meta, ast.literal_eval, "asin", ("categories",), "Amazon 2014 meta (Python literals)",
                  set(inter["item_id"]), "pyliteral")
    return RawData(reviews.name, "amazon2014", "products", inter, items, [str(reviews), str(meta)])


def read_amazon2018(folder: Path, reviews: Path | None = None) -> RawData:
    if reviews is None:
        csvs = sorted(p for p in folder.glob("*.csv*"))
        jsons = sorted(p for p in [*folder.glob("*.json"), *folder.glob("*.json.gz")]
                       if not p.name.startswith("meta_"))
        reviews = (jsons or csvs or [None])[0]
        if reviews is None:
            raise DataFormatError(f"{folder}: no <Cat>_5.json(.gz) reviews or ratings CSV found.")
    if ".csv" in reviews.name:
        _expect(reviews, ("csv4",), "an Amazon 2018 ratings CSV (item,user,rating,timestamp, no header)")
        df = _csv(reviews, ["item", "user", "rating", "timestamp"], None)
        inter = typed_interactions(df, reviews, {"user": "user_id", "item": "item_id"})
    else:
        inter = _json_reviews(reviews, "reviewerID", "asin", "overall", "unixReviewTime", "Amazon 2018 reviews")
    if not any(folder.glob("meta_*.json*")):
        raise _missing_meta(reviews, "amazon2018")
    meta = _one(folder, ["meta_*.json", "meta_*.json.gz"], "meta_<Cat>.json.gz")
    items = _meta(meta, json.loads, "asin", ("category", "main_cat"), "Amazon 2018 meta (strict JSON)",
                  set(inter["item_id"]), "json")
    return RawData(reviews.name, "amazon2018", "products", inter, items, [str(reviews), str(meta)])


def read_amazon2023(folder: Path, reviews: Path | None = None) -> RawData:
    if reviews is None:
        cands = sorted(p for pat in ("*.jsonl", "*.jsonl.gz", "*.csv", "*.csv.gz")
                       for p in folder.glob(pat) if not p.name.startswith("meta_"))
        if not cands:
            raise DataFormatError(f"{folder}: no <Cat>.jsonl reviews or benchmark CSV found.")
        reviews = cands[0]
    if ".csv" in reviews.name:
        _expect(reviews, ("csv:",), "an Amazon 2023 benchmark CSV")
        df = _csv(reviews, None, None)
        need = {"user_id", "parent_asin", "rating", "timestamp"}
        if not need <= set(df.columns):
            raise DataFormatError(f"{reviews}: missing columns {sorted(need - set(df.columns))}; "
                                  "expected header user_id,parent_asin,rating,timestamp.")
        inter = typed_interactions(df, reviews, {"parent_asin": "item_id"}, ts_scale=1000)
    else:
        inter = _json_reviews(reviews, "user_id", "parent_asin", "rating", "timestamp",
                              "Amazon 2023 reviews", ts_scale=1000)
    if not any(folder.glob("meta_*.jsonl*")):
        raise _missing_meta(reviews, "amazon2023")
    meta = _one(folder, ["meta_*.jsonl", "meta_*.jsonl.gz"], "meta_<Cat>.jsonl")
    items = _meta(meta, json.loads, "parent_asin", ("categories", "main_category"),
                  "Amazon 2023 meta", set(inter["item_id"]), "json")
    return RawData(reviews.name, "amazon2023", "products", inter, items, [str(reviews), str(meta)])


def read_ml100k(folder: Path) -> RawData:
    data, item = folder / "u.data", folder / "u.item"
    _expect(data, ("tsv4",), "MovieLens 100K u.data (user<TAB>item<TAB>rating<TAB>timestamp)")
    df = _csv(data, ["user", "item", "rating", "timestamp"], None, sep="\t")
    inter = typed_interactions(df, data, {"user": "user_id", "item": "item_id"})
    genres = ML100K_GENRES
    if (folder / "u.genre").exists():
        genres = [line.split("|")[0] for _, line in iter_lines(folder / "u.genre", "latin-1")]
    ids, titles, cats = [], [], []
    skips = _Skips(item)
    for lineno, line in iter_lines(item, "latin-1"):
        parts = line.split("|")
        if len(parts) != 5 + len(genres):
            skips.add(lineno, f"{len(parts)} fields, expected {5 + len(genres)}")
            continue
        flags = parts[5:]
        ids.append(parts[0]), titles.append(parts[1])
        cats.append("|".join(g for g, f in zip(genres, flags, strict=True) if f == "1"))
    skips.report()
    return RawData("ml-100k", "ml-100k", "movies", inter, items_frame(ids, titles, cats), [str(data), str(item)])


def read_ml1m(folder: Path) -> RawData:
    ratings, movies = folder / "ratings.dat", folder / "movies.dat"
    _expect(ratings, ("dcolon",), "MovieLens 1M ratings.dat (UserID::MovieID::Rating::Timestamp)", "latin-1")
    u, i, r, t = [], [], [], []
    skips = _Skips(ratings)
    for lineno, line in iter_lines(ratings, "latin-1"):
        parts = line.split("::")
        if len(parts) != 4 or not all(parts):
            skips.add(lineno, f"{len(parts)} fields, expected 4")
            continue
        try:
            rv, tv = float(parts[2]), int(parts[3])
        except ValueError:
            skips.add(lineno, f"non-numeric rating/timestamp {parts[2]!r}/{parts[3]!r}")
            continue
        u.append(parts[0]), i.append(parts[1]), r.append(rv), t.append(tv)
    skips.report()
    ids, titles, cats = [], [], []
    for _, line in iter_lines(movies, "latin-1"):
        mid, title, genres = line.split("::", 2)
        ids.append(mid), titles.append(title), cats.append(genres)
    return RawData("ml-1m", "ml-1m", "movies", _interactions(u, i, r, t), items_frame(ids, titles, cats),
                   [str(ratings), str(movies)])


def read_mllatest(folder: Path) -> RawData:
    ratings, movies = folder / "ratings.csv", folder / "movies.csv"
    _expect(ratings, ("csv:",), "MovieLens latest ratings.csv (userId,movieId,rating,timestamp)")
    df = _csv(ratings, None, None)
    need = {"userId", "movieId", "rating", "timestamp"}
    if not need <= set(df.columns):
        raise DataFormatError(f"{ratings}: missing columns {sorted(need - set(df.columns))}.")
    inter = typed_interactions(df, ratings, {"userId": "user_id", "movieId": "item_id"})
    m = _csv(movies, None, None)
    items = items_frame(m["movieId"], m["title"], m["genres"].replace("(no genres listed)", ""))
    return RawData(folder.name, "ml-latest", "movies", inter, items, [str(ratings), str(movies)])


def detect_format(path: Path) -> str:
    """Name the format of a dataset folder (or of the folder around a file)."""
    folder = path if path.is_dir() else path.parent
    names = {p.name for p in folder.iterdir()}
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    if {"u.data", "u.item"} <= names:
        return "ml-100k"
    if {"ratings.dat", "movies.dat"} <= names:
        return "ml-1m"
    if {"ratings.csv", "movies.csv"} <= names:
        return "ml-latest"
    if any(n.startswith("meta_") and ".jsonl" in n for n in names):
        return "amazon2023"
    if any(n.startswith("reviews_") for n in names):
        return "amazon2014"
    meta = [folder / n for n in sorted(names) if n.startswith("meta_") and ".json" in n]
    if meta:
        return "amazon2014" if sniff(meta[0]) == "pyliteral" else "amazon2018"
    files = [path] if path.is_file() else [folder / n for n in sorted(names)]
    for f in files:
        if ".json" in f.name and (kind := _reviews_kind(f)):
            raise _missing_meta(f, kind)
    raise DataFormatError(
        f"{folder}: cannot detect the dataset format from its files ({', '.join(sorted(names)) or 'empty'}). "
        f"Expected the official files of one of: {', '.join(FORMATS)}; or pass format=."
    )


READERS = {
    "amazon2014": read_amazon2014, "amazon2018": read_amazon2018, "amazon2023": read_amazon2023,
    "ml-100k": read_ml100k, "ml-1m": read_ml1m, "ml-latest": read_mllatest,
}
