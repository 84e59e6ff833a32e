"""Fixed, seeded candidate lists: 1 positive + N negatives per user, persisted with a fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from layerviz.data.formats import DataFormatError
from layerviz.data.prepare import Prepared
from layerviz.store import atomic_write


@dataclass
class CandidateConfig:
    """Which candidate lists to score."""

    negatives: int = 99
    """Negatives per user (99 -> 1+99 lists, 19 -> 1+19)."""
    sampler: str = "uniform"
    """'uniform' over items the user never interacted with, or 'popularity' (train counts)."""
    users: int | None = 200
    """Evaluate this many users, drawn with the seed (None: all users)."""
    split: str = "test"
    """'test' (last item) or 'valid' (second to last)."""
    seed: int = 0
    """Fixes the user sample, the negatives and the shuffle."""
    cold: bool = False
    """Draw users from the cold-start test set only (test users whose positive is a cold item)."""


COLD_MIN_USERS = 20
"""A cold-start test set smaller than this is refused: its NDCG would mean little."""


def _users(prep: Prepared, cfg: CandidateConfig, targets: pd.Series) -> np.ndarray:
    if not cfg.cold:
        return targets.index.to_numpy()
    if not prep.cold:
        raise DataFormatError("cold=True needs a protocol with cold items: set cold_items (e.g. 0.2)")
    if cfg.split != "test":
        raise ValueError("the cold-start test set is made of test users: use split='test' with cold=True")
    users = prep.cold_users()
    if len(users) < COLD_MIN_USERS:
        raise DataFormatError(f"the cold-start test set has {len(users)} users, fewer than {COLD_MIN_USERS}: raise "
                              "cold_items or use a larger dataset")
    return users


def build_candidates(prep: Prepared, cfg: CandidateConfig | None = None) -> pd.DataFrame:
    """One row per user: user_id, positive, candidates (shuffled item ids), pos_index."""
    cfg = cfg or CandidateConfig()
    if cfg.negatives < 1:
        raise ValueError(f"negatives must be >= 1, not {cfg.negatives}")
    if cfg.sampler not in ("uniform", "popularity"):
        raise ValueError(f"unknown sampler {cfg.sampler!r}; use 'uniform' or 'popularity'")
    rng = np.random.default_rng(cfg.seed)
    targets = prep.targets(cfg.split)
    users = _users(prep, cfg, targets)
    if cfg.users is not None and cfg.users < len(users):
        users = np.sort(rng.choice(users, size=cfg.users, replace=False))
    item_ids = prep.items["item_id"].to_numpy()
    code = {it: i for i, it in enumerate(item_ids)}
    if cfg.sampler == "popularity":
        p = prep.items["popularity"].to_numpy(dtype=np.float64) + 1.0  # +1: every item can be drawn
        p /= p.sum()
    else:
        p = None
    seen = prep.seen_by_user()
    rows = []
    for u in users:
        excluded = {code[i] for i in seen.get(u, ()) if i in code} | {code[targets[u]]}
        free = len(item_ids) - len(excluded)
        if free < cfg.negatives:
            raise DataFormatError(
                f"user {u} has only {free} items left to draw {cfg.negatives} negatives from; "
                "lower negatives or use a larger dataset."
            )
        negs: list[int] = []
        taken = set(excluded)
        while len(negs) < cfg.negatives:
            draw = rng.choice(len(item_ids), size=2 * (cfg.negatives - len(negs)) + 8, p=p)
            for d in draw.tolist():
                if d not in taken:
                    taken.add(d)
                    negs.append(d)
                    if len(negs) == cfg.negatives:
                        break
        cands = np.array([code[targets[u]], *negs])[rng.permutation(cfg.negatives + 1)]
        pos_index = int(np.flatnonzero(cands == code[targets[u]])[0])
        rows.append((u, targets[u], item_ids[cands].tolist(), pos_index))
    return pd.DataFrame(rows, columns=["user_id", "positive", "candidates", "pos_index"])


def candidates_key(prep: Prepared, cfg: CandidateConfig) -> str:
    """Fingerprint of the data plus the candidate config: what a candidate file was built for."""
    blob = json.dumps({"data": prep.fingerprint, "candidates": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_candidates(df: pd.DataFrame, path: str | Path, key: str) -> Path:
    """Write candidates as parquet (atomically), with the fingerprint in the file's metadata."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({b"layerviz_candidates_key": key.encode()})
    return atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def load_candidates(path: str | Path, key: str) -> pd.DataFrame:
    """Read a candidate file, refusing one built for other data or another config."""
    path = Path(path)
    meta = pq.read_schema(path).metadata or {}
    found = meta.get(b"layerviz_candidates_key", b"").decode()
    if found != key:
        raise DataFormatError(
            f"{path}: these candidate lists were built for other data or settings "
            f"(fingerprint {found[:12] or 'missing'}, expected {key[:12]}). Delete the file to "
            "rebuild it, or point at the candidates that match this dataset."
        )
    return pq.read_table(path).to_pandas()


def candidates_for(prep: Prepared, cfg: CandidateConfig, folder: str | Path) -> tuple[pd.DataFrame, Path]:
    """Load the persisted lists for (data, config) from ``folder``, building them the first time."""
    key = candidates_key(prep, cfg)
    split = f"{cfg.split}-cold" if cfg.cold else cfg.split
    path = Path(folder) / f"candidates-{split}-{cfg.negatives}{cfg.sampler[0]}-{key[:16]}.parquet"
    if path.exists():
        return load_candidates(path, key), path
    df = build_candidates(prep, cfg)
    save_candidates(df, path, key)
    return df, path
