"""RQ3's comparison of adapter variants (objectives and healing): its table and what it says."""

from __future__ import annotations

import numpy as np
import pandas as pd

from layerviz import metrics
from layerviz.study.result import StudyResult

RQ3_GOAL = 0.85
"""The goal for the best healed compact model at k = L/4: this share of the control's NDCG@10."""


def _paired(res: StudyResult, a: np.ndarray, b: np.ndarray, name: str) -> dict:
    c = metrics.paired_comparison(a, b, seed=res.config.seed)
    return {name: c["diff"], f"{name}_low": c["ci_low"], f"{name}_high": c["ci_high"]}


def rq3_table(res: StudyResult) -> pd.DataFrame:
    """RQ3: per model, selection and k, plain dropping and each adapter variant's final step: test NDCG@10 and its
    retention against the full model and against the control (the full model trained for as long), agreement with
    the full model (top-1, Kendall's tau), the validation NDCG@10 that picks a variant (``chosen``: the best one at
    that selection and k), and the paired differences against plain dropping and against ``mse`` adapters."""
    hv, pu = res.heal_variants, res.heal_variants_per_user
    if not len(hv):
        return pd.DataFrame()
    keep = ["ndcg@10", "ndcg@10_low", "ndcg@10_high", "retention", "retention_low", "retention_high", "top1",
            "kendall_tau", "val_mse"] + [c for c in hv.columns if c.startswith("retention_control")]
    rows = []
    for (m, sel, k), g in hv.groupby(["model", "selection", "k"], sort=False):
        u = pu[(pu.model == m) & (pu.selection == sel) & (pu.k == k)]

        def values(variant, stage, u=u):
            return u[(u.variant == variant) & (u.stage == stage)].sort_values("user")["ndcg@10"].to_numpy()

        first = g.variant.iloc[0]
        drop_row = g[(g.variant == first) & (g.stage == "drop")].iloc[0]
        rows.append({"model": m, "selection": sel, "k": k, "layers": list(drop_row["layers"]), "variant": "drop",
                     "objective": "none", "heal_mode": "none", **drop_row[keep].to_dict(), "valid_ndcg@10": np.nan})
        finals = {v: x.iloc[-1] for v, x in g.groupby("variant", sort=False)}
        best = max(finals, key=lambda v: finals[v]["valid_ndcg@10"])
        for variant, f in finals.items():
            row = {"model": m, "selection": sel, "k": k, "layers": list(f["layers"]), "variant": variant,
                   "objective": f["objective"], "heal_mode": f["heal_mode"], **f[keep].to_dict(),
                   "valid_ndcg@10": f["valid_ndcg@10"], "chosen": variant == best}
            row.update(_paired(res, values(variant, f["stage"]), values(first, "drop"), "vs_drop"))
            if "mse" in finals:
                row.update(_paired(res, values(variant, f["stage"]), values("mse", finals["mse"]["stage"]), "vs_mse"))
            rows.append(row)
    return pd.DataFrame(rows)


def rq3_sentence(table: pd.DataFrame, goal: float = RQ3_GOAL) -> str:
    """What one model's RQ3 table says: the variant the validation users chose at each selection and k, its retention
    against the control (or the full model), whether it reaches ``goal``, and its difference from mse adapters."""
    out = []
    for (sel, k), g in table.groupby(["selection", "k"], sort=False):
        if "chosen" not in g or not g["chosen"].fillna(False).astype(bool).any():
            continue
        c = g[g["chosen"].fillna(False).astype(bool)].iloc[0]
        col = "retention_control" if pd.notna(c.get("retention_control", np.nan)) else "retention"
        ref = "the control (the full model trained as long)" if col == "retention_control" else "the full model"
        said = (f"{sel}, k={k}: validation picks {c['variant']} ({c['objective']}, heal {c['heal_mode']}); it keeps "
                f"{c[col]:.2f} [{c[col + '_low']:.2f}, {c[col + '_high']:.2f}] of {ref}'s test NDCG@10, "
                f"{'reaching' if c[col + '_low'] >= goal else 'not shown to reach' if c[col] >= goal else 'below'} "
                f"the {goal:g} goal")
        if pd.notna(c.get("vs_mse", np.nan)) and c["variant"] != "mse":
            said += f"; minus mse adapters {c['vs_mse']:+.3f} [{c['vs_mse_low']:+.3f}, {c['vs_mse_high']:+.3f}]"
        out.append(said + ".")
    return "\n".join(out)
