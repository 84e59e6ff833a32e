"""The paper plan's claims, one small function each, tested against what the study measured.

Each rule returns rows of the hypotheses table (model, claim, evidence, value, ci_low, ci_high,
verdict, detail). Thresholds are the named constants of ``tables``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from layerviz import metrics
from layerviz.study.result import StudyResult
from layerviz.study.tables import (
    MOVED_RHO,
    RETENTION_CLAIM,
    RETENTION_FLOOR,
    SPEEDUP_CLAIM,
    SPEEDUP_TOLERANCE,
    bench_row,
    cross_model,
    importance_shift,
    last_stage,
    region_contrast,
    verdict,
)

UPPER = "upper layers are the most important"


def _row(model, claim, evidence, value, low, high, v, detail) -> dict:
    return {"model": model, "claim": claim, "evidence": evidence, "value": value, "ci_low": low, "ci_high": high,
            "verdict": v, "detail": detail}


def upper_by_importance(res: StudyResult, m: str) -> list[dict]:
    """H1 from the profiles: upper-third mean minus the larger other-third mean (ablation loss and fused)."""
    rows = []
    for crit in ("ablation_loss", "fused"):
        vals = res.profile(m, crit)
        if len(vals) == 0:
            continue
        d, lo, hi, means = region_contrast(vals, res.config.seed)
        rows.append(_row(m, UPPER, crit, d, lo, hi, verdict(lo, hi), "upper-third mean minus the larger other-third "
                         "mean; means " + ", ".join(f"{k} {v:.3g}" for k, v in means.items())))
    return rows


def upper_by_selection(res: StudyResult, m: str) -> list[dict]:
    """H1 from selections: last_k and the mapped reference list against the primary selection (test NDCG@10)."""
    rows, primary = [], f"select:{res.config.primary}"
    for variant in ("select:last_k", "reference_mapped"):
        if res.has(m, variant) and res.has(m, primary):
            x = res.values(m, variant)
            c = metrics.paired_comparison(x, res.values(m, primary), seed=res.config.seed)
            rows.append(_row(m, UPPER, f"{variant} minus {res.config.primary} (test NDCG@10, no adapters)",
                             c["diff"], c["ci_low"], c["ci_high"], verdict(c["ci_low"], c["ci_high"]),
                             f"{variant} NDCG@10 {x.mean():.3f}"))
    return rows


def lower_droppable(res: StudyResult, m: str) -> list[dict]:
    """H2: the model without its lower third keeps >= RETENTION_CLAIM of the full model's NDCG@10."""
    drop, full = res.values(m, "drop_lower_third"), res.values(m, "full")
    ratio, lo, hi = metrics.ratio_ci(drop, full, seed=res.config.seed)
    return [_row(m, "lower layers can be dropped",
                 f"NDCG@10 retention without the lower third (threshold {RETENTION_CLAIM:g})", ratio, lo, hi,
                 verdict(lo, hi, RETENTION_CLAIM), f"full {full.mean():.3f}, without lower third {drop.mean():.3f}")]


def adapters_help(res: StudyResult, m: str) -> list[dict]:
    """H3: the trained adapters beat plain dropping of the same (non-contiguous) selection."""
    last = last_stage(res, m).name
    c = metrics.paired_comparison(res.values(m, f"adapters:{last}"), res.values(m, "adapters:drop"),
                                  seed=res.config.seed)
    return [_row(m, "non-contiguous selections work with adapters",
                 f"NDCG@10 with adapters ({last}) minus plain dropping, {res.config.primary} selection", c["diff"],
                 c["ci_low"], c["ci_high"], verdict(c["ci_low"], c["ci_high"]),
                 f"layers {list(res.summary(m)['layers'])}")]


def adapter_cost(res: StudyResult, m: str) -> list[dict]:
    """The plan's cost claims for the adapters: parameters +<1%, compute +<5% (measured prefill time against plain
    dropping), training time 10-20% of the original's (adapter training and healing over the fine-tuning time)."""
    s, ft = res.summary(m), res.finetune_seconds(m)
    if "params_pct_of_base" not in s:  # a result without adapter costs
        return []
    params = 0.0 if s.get("exportable", False) else s["params_pct_of_base"]
    rows = [_row(m, "adapters add <1% parameters", "added parameters, % of the base model"
                 + (" (folded into down_proj: none)" if s.get("exportable", False) else ""), params, np.nan, np.nan,
                 "supported" if params < 1 else "contradicted", f"{int(s['adapter_params']):,} in memory, "
                 f"{s['params_pct_of_base']:.3f}% of the base"),
            _row(m, "adapters add <5% compute", "prefill time added by the adapters, % (median of interleaved runs)",
                 s.get("prefill_time_added_pct", np.nan), np.nan, np.nan,
                 "not tested" if np.isnan(s.get("prefill_time_added_pct", np.nan)) else
                 "supported" if s["prefill_time_added_pct"] < 5 else "contradicted",
                 f"FLOPs +{s['flops_pct']:.2f}% per token")]
    share = 100 * (s["train_seconds"] + s.get("heal_seconds", 0.0)) / ft if ft else np.nan
    rows.append(_row(m, "adapter training takes 10-20% of the original's time",
                     "adapter training + healing time, % of the recommender's fine-tuning time", share, np.nan, np.nan,
                     "not tested" if np.isnan(share) else "supported" if 10 <= share <= 20 else "contradicted",
                     f"{s['train_seconds']:.0f} s + {s.get('heal_seconds', 0.0):.0f} s healing"
                     + (f" against {ft:.0f} s fine-tuning" if ft else "; no fine-tuning in this study")))
    return rows


def speed_verdict(speedup: float, retention_low: float, retention_high: float) -> str:
    """'4x with ~90% kept': supported when the speedup is within 10% of 4x and the retention CI lies in
    [RETENTION_FLOOR, ...] while reaching RETENTION_CLAIM; contradicted when the speedup falls short or the
    whole CI lies below RETENTION_CLAIM; inconclusive otherwise (fast, but the CI starts below the floor)."""
    fast = speedup >= SPEEDUP_TOLERANCE * SPEEDUP_CLAIM
    kept = retention_high >= RETENTION_CLAIM
    if fast and retention_low >= RETENTION_FLOOR and kept:
        return "supported"
    return "contradicted" if (not fast or not kept) else "inconclusive"


def speed_and_retention(res: StudyResult, m: str) -> list[dict]:
    """H5: k = L/4 of L layers give 4x prefill speed with about 90% of NDCG@10 kept (with adapters)."""
    s, ret = res.summary(m), last_stage(res, m)
    b = bench_row(res, m, s["k"])
    speed = float(b["speedup"]) if b is not None else np.nan
    bound = float(b["bound"]) if b is not None else np.nan
    verdict = speed_verdict(speed, ret["retention_low"], ret["retention_high"])
    detail = f"speedup {speed:.2f}x (FLOP bound {bound:.2f}x), retention {ret['retention']:.2f}"
    if b is not None and bool(b.get("above_bound", False)):  # a timing artefact: the bound is what it can be
        cap = float(b.get("time_bound", bound))
        detail += f"; the speedup is above its time bound {cap:.2f}x: a timing artefact"
        fast_possible = cap >= SPEEDUP_TOLERANCE * SPEEDUP_CLAIM
        verdict = "inconclusive" if fast_possible else speed_verdict(cap, ret["retention_low"], ret["retention_high"])
    return [_row(m, f"{s['k']} of {s['n_layers']} layers: 4x speed with ~90% NDCG retained",
                 "measured prefill speedup; NDCG@10 retention with adapters", speed, ret["retention_low"],
                 ret["retention_high"], verdict, detail)]


def moved_verdict(low: float, high: float) -> str:
    """Fine-tuning moved the layer ranking when the Spearman CI lies below MOVED_RHO, kept it when above."""
    return "supported" if high < MOVED_RHO else "contradicted" if low > MOVED_RHO else "inconclusive"


def finetuning_moves(res: StudyResult) -> list[dict]:
    """Fine-tuning moves which layers matter: zero-shot against fine-tuned importance of the same model. Not
    tested where validation kept the zero-shot weights (best step 0): the two models are then one model."""
    kept = set(res.finetune.loc[res.finetune["best_step"] == 0, "model"]) if "best_step" in res.finetune else set()
    return [_row(c["model"], "fine-tuning moves which layers matter",
                 f"Spearman of {c['criterion']} importance, zero-shot vs fine-tuned (moved if the CI lies below "
                 f"{MOVED_RHO})", c["spearman"], c["ci_low"], c["ci_high"],
                 "not tested" if c["model"] in kept else moved_verdict(c["ci_low"], c["ci_high"]),
                 "validation kept the zero-shot weights (best step 0)" if c["model"] in kept
                 else f"{c['layers']} layers; bootstrap over layers") for _, c in importance_shift(res).iterrows()]


def generalizes(res: StudyResult) -> list[dict]:
    """H4: the fused profiles of every model pair agree on a common depth grid (Spearman CI above 0)."""
    return [_row(f"{c['model_a']} vs {c['model_b']}", "the pattern generalizes across models",
                 "Spearman of fused importance on a common depth grid", c["spearman"], c["ci_low"], c["ci_high"],
                 verdict(c["ci_low"], c["ci_high"]),
                 ", ".join(f"{k} {v:.2f}" for k, v in c.items() if str(k).startswith("overlap:")))
            for _, c in cross_model(res).iterrows()]


PER_MODEL = (upper_by_importance, upper_by_selection, lower_droppable, adapters_help, speed_and_retention,
             adapter_cost)
"""The per-model rules, in the table's order."""


def hypotheses(res: StudyResult) -> pd.DataFrame:
    """One row per claim of the paper plan, with measured evidence and a verdict computed from CIs."""
    rows = [row for m in res.models for rule in PER_MODEL for row in rule(res, m)]
    rows += finetuning_moves(res) + generalizes(res)
    return pd.DataFrame(rows)
