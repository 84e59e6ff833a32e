"""Ranking metrics for one relevant item per user, with bootstrap confidence intervals.

rank = 1 + #negatives scoring >= the positive: pessimistic about ties, so a model
that gives every candidate the same score gets the worst rank, not a lucky one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_KS = (5, 10)


def metric_names(ks=DEFAULT_KS) -> list[str]:
    """Column names in the order they are reported."""
    return [f"ndcg@{k}" for k in ks] + ["mrr"] + [f"hr@{k}" for k in ks] + [f"precision@{k}" for k in ks]


def pessimistic_ranks(scores: np.ndarray, pos_index: np.ndarray) -> np.ndarray:
    """(users, candidates) scores + the positive's column -> 1-based ranks (ties count against it)."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = scores[np.arange(len(scores)), np.asarray(pos_index)]
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; the scorer failed on some candidates")
    return (scores >= pos[:, None]).sum(axis=1)  # counts the positive itself: 1 + #negatives >= it


def per_user(ranks: np.ndarray, ks=DEFAULT_KS) -> pd.DataFrame:
    """One row per user: NDCG@K, MRR, HR@K, Precision@K from the positive's rank."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        out[f"ndcg@{k}"] = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    out["mrr"] = 1.0 / r
    for k in ks:
        out[f"hr@{k}"] = (r <= k).astype(np.float64)
    for k in ks:
        out[f"precision@{k}"] = (r <= k) / k
    return pd.DataFrame(out)[metric_names(ks)]


def chance(n_candidates: int, ks=DEFAULT_KS) -> dict[str, float]:
    """Expected metrics of a random ranking: the positive's rank is uniform on 1..n."""
    r = np.arange(1, n_candidates + 1)
    return per_user(r, ks).mean().to_dict()


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """(mean, low, high): percentile bootstrap over users.

    ``scipy.stats.bootstrap(method="percentile")`` with the same generator draws the same resamples; its
    intervals differ from these only in the last bit (it averages in another order), and the study's tables
    are kept byte-identical, so the resampling stays written out (tests/test_metrics.py compares the two).
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def summarize(per_user_df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per metric: mean, ci_low, ci_high, n (users)."""
    rows = []
    for m in per_user_df.columns:
        mean, lo, hi = bootstrap_ci(per_user_df[m].to_numpy(), n_boot, seed)
        rows.append({"metric": m, "mean": mean, "ci_low": lo, "ci_high": hi, "n": len(per_user_df)})
    return pd.DataFrame(rows)


def paired_comparison(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare two systems on the same users: mean(a - b) with a bootstrap CI and two-sided p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same users: {a.shape} vs {b.shape}")
    d = a - b
    mean, lo, hi = bootstrap_ci(d, n_boot, seed)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    p = 2 * min((boot <= 0).mean(), (boot >= 0).mean()) if d.any() else 1.0
    return {"diff": mean, "ci_low": lo, "ci_high": hi, "p_value": float(min(1.0, p)), "n": len(d)}


def ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """(ratio, low, high): mean(num) / mean(den) with a paired percentile bootstrap over users (retention)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or len(num) == 0:
        raise ValueError(f"ratio_ci needs the same, non-empty users: {num.shape} vs {den.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = num[idx].mean(1) / den[idx].mean(1)
        ratio = num.mean() / den.mean()
    boot[~np.isfinite(boot)] = np.nan  # resamples whose denominator is 0
    a = (1 - level) / 2
    return float(ratio), float(np.nanquantile(boot, a)), float(np.nanquantile(boot, 1 - a))


def agreement(reference: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Per user, how a model's candidate scores agree with a reference model's on the same candidates:
    ``top1`` (1 when both put the same candidate first) and ``kendall_tau`` (tau-b of the two score vectors)."""
    from scipy.stats import kendalltau  # loaded when needed

    ref, got = np.asarray(reference, dtype=float), np.asarray(scores, dtype=float)
    if ref.shape != got.shape or ref.ndim != 2:
        raise ValueError(f"agreement needs two (users, candidates) score arrays of one shape, got {ref.shape} and "
                         f"{got.shape}")
    taus = [kendalltau(a, b).statistic for a, b in zip(ref, got, strict=True)]
    return pd.DataFrame({"top1": (ref.argmax(1) == got.argmax(1)).astype(float),
                         "kendall_tau": np.nan_to_num(np.asarray(taus, dtype=float))})
