"""The study's tables, one function each, and one small function per hypothesis of the paper plan.

Every table reads a ``StudyResult`` and nothing else. Every threshold a verdict uses is a named
constant below; a verdict is decided by a 95% bootstrap CI, never by a point estimate alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from layerviz import metrics
from layerviz.depth import REGIONS, depth, depth_overlap, profile_on_grid, region
from layerviz.study.result import FINE_TUNED, ZERO_SHOT, StudyResult, cold_set

SPEEDUP_CLAIM = 4.0
"""The plan's claim: 8 of 32 layers (k = L/4) run 4x faster."""
SPEEDUP_TOLERANCE = 0.9
"""'4x' holds when the measured speedup is within 10% of it (>= 0.9 * 4 = 3.6x)."""
RETENTION_CLAIM = 0.9
"""The plan's 'about 90% of NDCG@10 kept' (and the bar for dropping the lower third)."""
RETENTION_FLOOR = 0.8
"""'About 90%' is supported only if the retention CI's lower end is at least this."""
MOVED_RHO = 0.5
"""'Fine-tuning moves which layers matter': supported when the Spearman CI between the zero-shot and the
fine-tuned profile lies below this (at most moderate agreement), contradicted when it lies above."""
N_BOOT = 2000
"""Bootstrap replicates of the CIs computed here (over layers)."""
QUALITY_METRICS = ("ndcg@5", "ndcg@10", "mrr", "hr@10", "precision@5")
"""Metrics of the fine-tuning table."""


def verdict(low: float, high: float, threshold: float = 0.0) -> str:
    """'supported' when the CI lies above the threshold, 'contradicted' below it, else 'inconclusive'."""
    if low > threshold:
        return "supported"
    if high < threshold:
        return "contradicted"
    return "inconclusive"


def relation(low: float, high: float) -> str:
    """How a paired difference's CI reads: 'better than', 'worse than' or 'not distinguishable from'."""
    return "better than" if low > 0 else "worse than" if high < 0 else "not distinguishable from"


def spearman_ci(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """Spearman rho with a bootstrap CI over paired points (replicates with a constant side are skipped)."""
    rho = float(spearmanr(a, b).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(a), len(a))
        if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
            boots.append(spearmanr(a[i], b[i]).statistic)
    return rho, float(np.nanquantile(boots, 0.025)), float(np.nanquantile(boots, 0.975))


def region_contrast(values: np.ndarray, seed: int) -> tuple[float, float, float, dict]:
    """Mean of the upper third minus the larger of the other two, with a bootstrap CI over layers."""
    n = len(values)
    reg = np.array([region(i, n) for i in range(n)])
    means = {r: float(values[reg == r].mean()) for r in REGIONS}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(N_BOOT):
        m = {r: values[reg == r][rng.integers(0, (reg == r).sum(), (reg == r).sum())].mean() for r in REGIONS}
        diffs.append(m["upper"] - max(m["lower"], m["middle"]))
    point = means["upper"] - max(means["lower"], means["middle"])
    return point, float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975)), means


def last_stage(res: StudyResult, model: str, dataset: str | None = None) -> pd.Series:
    """The adapters' final retention row (after the last training stage that ran)."""
    return res.rows("adapters", model, dataset).set_index("stage").iloc[-1]


def bench_row(res: StudyResult, model: str, k: int) -> pd.Series | None:
    """The bench row of the compact model with adapters at ``k`` kept layers (None if not measured)."""
    b = res.bench[res.bench.model == model]
    row = b[(b["k"] == k) & (b["adapters"])]
    return row.iloc[0] if len(row) else None


# ----------------------------------------------------------------------------- tables


def headline(res: StudyResult) -> pd.DataFrame:
    """model | L | k | compression | measured speedup (IQR) | FLOP bound | time bound | above_bound | memory
    ratio | NDCG@5/@10 retention [CI]. ``above_bound``: the speedup beat its time bound (``bench.time_bound``),
    a timing artefact that is not a result."""
    rows = []
    for m in res.models:
        s, ret = res.summary(m), last_stage(res, m)
        b = bench_row(res, m, s["k"])
        rows.append({"model": m, "L": s["n_layers"], "k": s["k"], "compression": s["n_layers"] / s["k"],
                     "speedup": b["speedup"] if b is not None else np.nan,
                     "speedup_iqr": b.get("speedup_iqr", np.nan) if b is not None else np.nan,
                     "bound": b["bound"] if b is not None else np.nan,
                     "time_bound": b.get("time_bound", np.nan) if b is not None else np.nan,
                     "above_bound": bool(b.get("above_bound", False)) if b is not None else False,
                     "memory_ratio": b["memory_ratio"] if b is not None else np.nan,
                     "ndcg5_retention": ret["retention@5"], "ndcg5_low": ret["retention@5_low"],
                     "ndcg5_high": ret["retention@5_high"], "ndcg10_retention": ret["retention"],
                     "ndcg10_low": ret["retention_low"], "ndcg10_high": ret["retention_high"]})
    return pd.DataFrame(rows)


def thirds_table(res: StudyResult) -> pd.DataFrame:
    """Share of selected layers in the lower, middle and upper thirds, per model and strategy (the main dataset)."""
    rows = []
    for m in res.models:
        for _, sel in res.rows("selections", m).iterrows():
            rows.append({"model": m, "strategy": sel["strategy"], "L": sel["n_layers"], "k": sel["k"],
                         **{f"{x}_share": sel[x] / max(1, sel["k"]) for x in REGIONS}, "layers": sel["layers"],
                         "depths": [round(float(d), 3) for d in depth(sel["layers"], sel["n_layers"])]})
    return pd.DataFrame(rows)


def variants_table(res: StudyResult, metric: str = "ndcg@10") -> pd.DataFrame:
    """Test ``metric`` of the full model, each plain-dropping variant, popularity and chance, per model.

    Retention = variant / full on the same users, with a paired bootstrap CI.
    """
    rows, seed = [], res.config.seed
    for m in res.models:
        full = res.values(m, "full", metric)
        for _, v in res.rows("variants", m).iterrows():
            x, layers = res.values(m, v["variant"], metric), list(v["layers"])
            mean, lo, hi = metrics.bootstrap_ci(x, seed=seed)
            ret, rlo, rhi = metrics.ratio_ci(x, full, seed=seed)
            rows.append({"model": m, "variant": v["variant"], "k": len(layers), "layers": layers, metric: mean,
                         "ci_low": lo, "ci_high": hi, "retention": ret, "retention_low": rlo, "retention_high": rhi})
        if res.has(m, "sasrec"):
            x = res.values(m, "sasrec", metric)
            mean, lo, hi = metrics.bootstrap_ci(x, seed=seed)
            ret, rlo, rhi = metrics.ratio_ci(x, full, seed=seed)
            rows.append({"model": m, "variant": "sasrec", "k": 0, "layers": [], metric: mean, "ci_low": lo,
                         "ci_high": hi, "retention": ret, "retention_low": rlo, "retention_high": rhi})
        c = res.chance(metric)
        rows.append({"model": m, "variant": "chance", "k": 0, "layers": [], metric: c, "ci_low": c, "ci_high": c,
                     "retention": c / full.mean(), "retention_low": np.nan, "retention_high": np.nan})
    return pd.DataFrame(rows)


def cross_model(res: StudyResult, grid_points: int = 21) -> pd.DataFrame:
    """Per model pair: rank correlation of fused importance on a common depth grid, and selection overlap."""
    grid = np.linspace(0, 1, grid_points)
    rows = []
    for i, a in enumerate(res.models):
        for b in res.models[i + 1:]:
            rho, lo, hi = spearman_ci(profile_on_grid(res.profile(a), grid), profile_on_grid(res.profile(b), grid),
                                      seed=res.config.seed)
            row = {"model_a": a, "model_b": b, "criterion": "fused", "spearman": rho, "ci_low": lo, "ci_high": hi}
            for s in res.config.strategies:
                sa, sb = res.selection(a, s), res.selection(b, s)
                row[f"overlap:{s}"] = depth_overlap(sa["layers"], sa["n_layers"], sb["layers"], sb["n_layers"])
            rows.append(row)
    return pd.DataFrame(rows)


def cross_domain(res: StudyResult) -> pd.DataFrame:
    """Transfer ratio: NDCG@10 on B with A's selection over NDCG@10 on B with B's own, plus baselines."""
    cfg, rows = res.config, []
    b, chance = cfg.transfer_dataset, res.chance()
    for m in res.models:
        if not res.has(m, "transfer:plain", b):
            continue
        last = last_stage(res, m, b).name
        pop, full = res.values(m, "popularity", dataset=b), res.values(m, "full", dataset=b)
        for name, num, den in (("adapters", "transfer:adapters", f"adapters:{last}"),
                               ("plain", "transfer:plain", "adapters:drop")):
            num, den = res.values(m, num, dataset=b), res.values(m, den, dataset=b)
            ratio, lo, hi = metrics.ratio_ci(num, den, seed=cfg.seed)
            rows.append({"model": m, "dataset": cfg.dataset, "transfer_dataset": b, "variant": name,
                         "a_layers": res.selection(m)["layers"], "b_layers": res.selection(m, dataset=b)["layers"],
                         "ndcg10_b_with_a": float(np.mean(num)), "ndcg10_b_with_b": float(np.mean(den)),
                         "transfer_ratio": ratio, "ci_low": lo, "ci_high": hi, "full_b": float(np.mean(full)),
                         "popularity_b": float(pop.mean()), "chance_b": chance,
                         "sasrec_b": float(res.values(m, "sasrec", dataset=b).mean()),
                         "gap_over_popularity": float(np.mean(num) - pop.mean()),
                         "gap_over_chance": float(np.mean(num)) - chance})
    return pd.DataFrame(rows)


def finetune_table(res: StudyResult) -> pd.DataFrame:
    """Zero-shot, fine-tuned, popularity and chance per model and dataset (test users, 95% CIs), plus the
    paired differences fine-tuned - zero-shot and fine-tuned - popularity. One row per (model, dataset,
    system, metric); ``calibration`` is the one each LLM scored with (calibration 'auto': chosen on validation users for
    the zero-shot model, none for the fine-tuned one, as it was trained)."""
    rows, seed, cal = [], res.config.seed, res.calibration
    for m in res.models:
        for d in dict.fromkeys([res.config.dataset, res.config.transfer_dataset]):
            if not res.has(m, "zeroshot", d):
                continue
            choice = {base: cal[(cal.model == m) & (cal.dataset == d) & (cal.base == base)]["choice"].iloc[0]
                      for base in (ZERO_SHOT, FINE_TUNED)}
            systems = {"zero-shot": ("zeroshot", choice[ZERO_SHOT]), "fine-tuned": ("full", choice[FINE_TUNED]),
                       "popularity": ("popularity", None)}
            if res.has(m, "sasrec", d):
                systems["sasrec"] = ("sasrec", None)
            base = {"model": m, "dataset": d, "n_users": len(res.values(m, "zeroshot", dataset=d))}
            for metric in QUALITY_METRICS:
                for system, (variant, c) in systems.items():
                    mean, lo, hi = metrics.bootstrap_ci(res.values(m, variant, metric, d), seed=seed)
                    rows.append({**base, "system": system, "metric": metric, "mean": mean, "ci_low": lo,
                                 "ci_high": hi, "calibration": c})
                ch = res.chance(metric)
                rows.append({**base, "system": "chance", "metric": metric, "mean": ch, "ci_low": ch, "ci_high": ch,
                             "calibration": None})
                for other in [o for o in ("zero-shot", "popularity", "sasrec") if o in systems]:
                    c = metrics.paired_comparison(res.values(m, "full", metric, d),
                                                  res.values(m, systems[other][0], metric, d), seed=seed)
                    rows.append({**base, "system": f"fine-tuned - {other}", "metric": metric, "mean": c["diff"],
                                 "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p_value": c["p_value"],
                                 "calibration": None})
    return pd.DataFrame(rows)


SLICE_SYSTEMS = {"full": None, "zeroshot": ZERO_SHOT, "compact:plain": "compact (no adapters)",
                 "compact:adapters": "compact (adapters)", "sasrec": "sasrec", "popularity": "popularity"}
"""Variants compared by slice and on the cold-start set (``full`` is the analysed recommender: fine-tuned or
zero-shot)."""


def _system_rows(res: StudyResult, m: str, dataset: str, masks: dict[str, np.ndarray], metric: str) -> list[dict]:
    """Mean and 95% CI of ``metric`` per system and user group (``masks``: group -> boolean mask over users)."""
    rows = []
    for variant, system in SLICE_SYSTEMS.items():
        x = res.values(m, variant, metric, dataset).to_numpy()
        for group, keep in masks.items():
            if len(x) and keep.any():
                mean, lo, hi = metrics.bootstrap_ci(x[keep[:len(x)]], seed=res.config.seed)
                rows.append({"model": m, "dataset": dataset, "system": system or res.base, "slice": group,
                             metric: mean, "ci_low": lo, "ci_high": hi, "users": int(keep[:len(x)].sum())})
    return rows


def slices_table(res: StudyResult, metric: str = "ndcg@10") -> pd.DataFrame:
    """``metric`` on each dataset's test users split by the positive's training popularity (head, torso, tail
    thirds of the items; cold: held out), per model and system, with 95% CIs and group sizes."""
    rows = []
    for m in res.models:
        for d, u in res.users.groupby("dataset", sort=False):
            where = u.sort_values("user")["slice"].to_numpy()
            masks = {g: where == g for g in ("head", "torso", "tail", "cold", "all")}
            masks["all"] = np.ones(len(where), bool)
            rows += _system_rows(res, m, d, masks, metric)
    return pd.DataFrame(rows, columns=["model", "dataset", "system", "slice", metric, "ci_low", "ci_high", "users"])


def cold_table(res: StudyResult, metric: str = "ndcg@10") -> pd.DataFrame:
    """``metric`` of every system on the main dataset's cold-start test set (users whose positive never was trained on)."""
    d, rows = cold_set(res.config.dataset), []
    for m in res.models:
        n = len(res.values(m, "full", metric, d))
        rows += _system_rows(res, m, d, {"cold start": np.ones(n, bool)}, metric)
    return pd.DataFrame(rows, columns=["model", "dataset", "system", "slice", metric, "ci_low", "ci_high", "users"])


def importance_shift(res: StudyResult, criteria=("fused", "ablation_loss")) -> pd.DataFrame:
    """Spearman between each model's zero-shot and fine-tuned importance profile, per criterion (CI over layers)."""
    rows = []
    for m in res.models if res.base == FINE_TUNED else []:
        for crit in criteria:
            a, b = res.profile(m, crit, ZERO_SHOT), res.profile(m, crit, FINE_TUNED)
            if len(a) < 3 or len(a) != len(b):
                continue
            rho, lo, hi = spearman_ci(a, b, seed=res.config.seed)
            rows.append({"model": m, "criterion": crit, "spearman": rho, "ci_low": lo, "ci_high": hi,
                         "layers": len(a)})
    return pd.DataFrame(rows, columns=["model", "criterion", "spearman", "ci_low", "ci_high", "layers"])


