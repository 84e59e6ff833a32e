"""The protocol shared by every model: positives, dedup, k-core, chronological leave-one-out."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from layerviz.data.formats import DataFormatError, DataWarning, RawData


@dataclass
class PrepConfig:
    """How raw interactions become train/validation/test sequences."""

    positive_threshold: float = 4.0
    """An interaction with rating >= this is a positive (the sequence keeps positives only)."""
    kcore: int = 5
    """Iteratively drop users and items with fewer than this many positives."""
    history_len: int = 20
    """Number of most recent items shown as the user's history."""
    item_noun: str | None = None
    """What the prompts call the items ('movies', 'products', 'games', ...; 'game/games' gives the singular
    too). None: the dataset's default (movies for MovieLens, products for Amazon, items for RecBole files)."""
    title_field: str | None = None
    """RecBole atomic files: the .item field holding titles (None: title, movie_title, item_name or name)."""
    cold_items: float = 0.0
    """Item cold start: this seeded fraction of the items (0 < f <= 0.5) is removed from training entirely,
    only their titles remain; test users whose positive is such an item form the cold-start test set. 0: off."""
    seed: int = 0
    """Fixes which items are cold (with cold_items)."""

    def validate(self) -> None:
        if self.kcore < 1:
            raise ValueError(f"kcore must be >= 1, not {self.kcore}")
        if self.cold_items != 0 and not 0 < self.cold_items <= 0.5:
            raise ValueError(f"cold_items={self.cold_items!r}: give a fraction of the items in (0, 0.5], or 0 "
                             "for no cold start")


@dataclass
class Prepared:
    """A dataset after the protocol: one chronological positive sequence per user, split leave-one-out."""

    name: str
    domain: str
    config: PrepConfig
    events: pd.DataFrame  # user_id, item_id, timestamp, split in {train, valid, test}; chronological
    items: pd.DataFrame  # item_id, title, categories, popularity (train positives)
    seen: pd.DataFrame  # user_id, item_id: every raw interaction (any rating) with a kept item
    stats: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per step
    fingerprint: str = ""
    cold: frozenset = frozenset()  # item ids held out of training (PrepConfig.cold_items)

    def cold_users(self) -> np.ndarray:
        """Users whose test positive is a cold item (the cold-start test set), sorted."""
        t = self.targets("test")
        return np.sort(t.index[t.isin(self.cold)].to_numpy())

    def item_slices(self) -> pd.Series:
        """item_id -> 'head', 'torso' or 'tail': thirds of the items ranked by training positives (ties by id)."""
        order = self.items.sort_values(["popularity", "item_id"], ascending=[False, True])["item_id"].to_numpy()
        third = np.minimum(np.arange(len(order)) * 3 // max(1, len(order)), 2)
        return pd.Series(np.array(SLICES)[third], index=order).sort_index()

    @property
    def users(self) -> np.ndarray:
        """All user ids, sorted."""
        return np.sort(self.events["user_id"].unique())

    def targets(self, split: str) -> pd.Series:
        """user_id -> held-out item for split 'valid' or 'test'."""
        _check_split(split)
        ev = self.events[self.events["split"] == split]
        return pd.Series(ev["item_id"].to_numpy(), index=ev["user_id"].to_numpy()).sort_index()

    def histories(self, split: str, n: int | None = None) -> dict[str, list[str]]:
        """user_id -> the last ``n`` item ids before the split's target, oldest first."""
        _check_split(split)
        n = n or self.config.history_len
        allowed = ("train",) if split == "valid" else ("train", "valid")
        ev = self.events[self.events["split"].isin(allowed)]
        return {u: list(g.to_numpy()[-n:]) for u, g in ev.groupby("user_id", sort=True)["item_id"]}

    def titles(self) -> dict[str, str]:
        """item_id -> title."""
        return dict(zip(self.items["item_id"], self.items["title"], strict=True))

    def seen_by_user(self) -> dict[str, set[str]]:
        """user_id -> every item the user interacted with (never a negative)."""
        return {u: set(g) for u, g in self.seen.groupby("user_id", sort=True)["item_id"]}


SLICES = ("head", "torso", "tail")


def _check_split(split: str) -> None:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', not {split!r}")


def _stats(step: str, df: pd.DataFrame) -> dict:
    u, i, n = df["user_id"].nunique(), df["item_id"].nunique(), len(df)
    return {"step": step, "users": u, "items": i, "interactions": n,
            "density": n / (u * i) if u and i else 0.0}


def kcore(df: pd.DataFrame, k: int, k_user: int | None = None) -> pd.DataFrame:
    """Iterative k-core: repeat until every item has >= k and every user >= k_user (default k) rows."""
    k_user = k if k_user is None else k_user
    while max(k, k_user) > 1 and len(df):
        uc = df["user_id"].map(df["user_id"].value_counts())
        ic = df["item_id"].map(df["item_id"].value_counts())
        keep = (uc >= k_user) & (ic >= k)
        if keep.all():
            break
        df = df[keep]
    return df


def fingerprint_frames(*frames: pd.DataFrame, extra: dict | None = None) -> str:
    """Stable content hash of data frames (values and column names) plus a JSON-able dict."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for df in frames:
        h.update(",".join(map(str, df.columns)).encode())
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _positives(raw: RawData, cfg: PrepConfig, step, report) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Deduplicated positives of titled items -> (positives, every (user, item) seen, the titled items)."""
    df = raw.interactions
    step("raw", df)
    # earliest interaction wins; ties on time broken by the row order of the file
    df = df.sort_values(["timestamp"], kind="stable").drop_duplicates(["user_id", "item_id"], keep="first")
    step("dedup (user, item)", df)
    all_seen = df[["user_id", "item_id"]]
    if raw.implicit:  # no ratings in the files
        step("positives (implicit: every interaction)", df)
    else:
        df = df[df["rating"] >= cfg.positive_threshold]
        step(f"positives (rating >= {cfg.positive_threshold:g})", df)
    titled = raw.items[raw.items["title"].fillna("").str.strip() != ""]
    missing = ~df["item_id"].isin(titled["item_id"])
    dropped = df.loc[missing, "item_id"].nunique()
    df = df[~missing]
    step(f"drop untitled items ({dropped:,})", df)
    if dropped and report:
        report(f"  note: dropped {dropped:,} item(s) with no title in the metadata "
               f"({int(missing.sum()):,} interactions)")
    return df, all_seen, titled


def _core(df: pd.DataFrame, name: str, cfg: PrepConfig, step) -> pd.DataFrame:
    """The k-core, then users with fewer than 3 positives dropped (leave-one-out needs train, valid, test)."""
    before = df
    df = kcore(df, cfg.kcore)
    step(f"{cfg.kcore}-core", df)
    if df.empty:
        raise DataFormatError(
            f"{name}: no users left after {cfg.kcore}-core filtering (before it: "
            f"{before['user_id'].nunique():,} users, {before['item_id'].nunique():,} items, "
            f"{len(before):,} positives). Lower kcore (e.g. --kcore 2) or positive_threshold."
        )
    short = int((df["user_id"].value_counts() < 3).sum())
    if short:  # leave-one-out needs train, valid and test items: users need >= 3, still k-core
        warnings.warn(f"{name}: dropping {short:,} user(s) with fewer than 3 positives "
                      "(leave-one-out needs train, valid and test items).", DataWarning, stacklevel=3)
        df = kcore(df, cfg.kcore, k_user=3)
        step(f"{cfg.kcore}-core, users >= 3", df)
        if df.empty:
            raise DataFormatError(f"{name}: no user has 3 or more positives in a {cfg.kcore}-core; "
                                  "lower positive_threshold or use more data.")
    return df


def prepare(raw: RawData, config: PrepConfig | None = None,
            report: Callable[[str], None] | None = print) -> Prepared:
    """Apply the protocol to raw data, printing users/items/interactions/density after each step."""
    cfg = config or PrepConfig()
    cfg.validate()
    rows = []

    def step(name: str, df: pd.DataFrame) -> None:
        rows.append(_stats(name, df))
        if report:
            r = rows[-1]
            report(f"  {name:<28} users={r['users']:>8,} items={r['items']:>8,} "
                   f"interactions={r['interactions']:>10,} density={r['density']:.5f}")

    if report:
        report(f"{raw.name} ({raw.format}):")
    df, all_seen, titled = _positives(raw, cfg, step, report)
    df = _core(df, raw.name, cfg, step)
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    pos_from_end = df.groupby("user_id").cumcount(ascending=False)
    df["split"] = np.where(pos_from_end == 0, "test", np.where(pos_from_end == 1, "valid", "train"))
    step("leave-one-out split", df)
    df, cold = _hold_out(df, cfg, step)

    items = titled[titled["item_id"].isin(df["item_id"])].copy()
    pop = df[df["split"] == "train"]["item_id"].value_counts()
    items["popularity"] = items["item_id"].map(pop).fillna(0).astype(np.int64)
    items = items.sort_values("item_id").reset_index(drop=True)
    seen = all_seen[all_seen["user_id"].isin(df["user_id"]) & all_seen["item_id"].isin(items["item_id"])]
    seen = seen.sort_values(["user_id", "item_id"]).reset_index(drop=True)
    events = df[["user_id", "item_id", "timestamp", "split"]]
    fp = fingerprint_frames(events, items, seen, extra={"config": asdict(cfg), "name": raw.name})
    return Prepared(raw.name, cfg.item_noun or raw.domain, cfg, events, items, seen, pd.DataFrame(rows), fp,
                    cold)


def _hold_out(df: pd.DataFrame, cfg: PrepConfig, step) -> tuple[pd.DataFrame, frozenset]:
    """Item cold start: a seeded fraction of the items leaves training and validation entirely (it stays a test
    positive and a candidate); users left without a training item are dropped."""
    if not cfg.cold_items:
        return df, frozenset()
    items = np.sort(df["item_id"].unique())
    rng = np.random.default_rng(cfg.seed)
    cold = frozenset(rng.choice(items, size=max(1, round(cfg.cold_items * len(items))), replace=False).tolist())
    df = df[~(df["item_id"].isin(cold) & (df["split"] != "test"))]
    df = df[df["user_id"].isin(df.loc[df["split"] == "train", "user_id"])].reset_index(drop=True)
    step(f"cold items held out ({len(cold):,})", df)
    return df, cold
