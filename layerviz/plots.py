"""Static paper figures (matplotlib/seaborn). Every function returns a Figure and never shows it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

PALETTE = "colorblind"
CMAP = "cividis"  # perceptually uniform and colour-blind safe
CRITERIA_ORDER = ["fisher_sum", "fisher_mean", "attn_entropy", "attn_item_mass", "block_influence",
                  "angular_distance", "norm_ratio", "kurtosis", "fused", "ablation_loss", "ablation_ndcg"]


@contextmanager
def paper_style():
    """Readable fonts and a colour-blind-safe palette for every figure drawn inside."""
    import seaborn as sns

    with plt.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                         "xtick.labelsize": 8, "ytick.labelsize": 9, "figure.dpi": 110, "savefig.dpi": 200,
                         "savefig.bbox": "tight", "axes.spines.top": False, "axes.spines.right": False}):
        with sns.color_palette(PALETTE):
            yield


def save(fig, name: str, figures_dir: str | Path = "figures") -> list[Path]:
    """Write ``name``.pdf and ``name``.png into ``figures_dir``; returns both paths."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:
        fig.savefig(p)
    return paths


def importance_heatmap(table: pd.DataFrame, title: str = "", criteria: list[str] | None = None):
    """Criteria x layers heatmap of normalized importance (1 = most important layer)."""
    wide = table.pivot(index="criterion", columns="layer", values="normalized")
    order = [c for c in (criteria or CRITERIA_ORDER) if c in wide.index]
    wide = wide.loc[order]
    with paper_style():
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * wide.shape[1] + 2), 0.42 * len(order) + 1.4))
        im = ax.imshow(wide.to_numpy(), aspect="auto", cmap=CMAP, vmin=0, vmax=1)
        ax.set_yticks(range(len(order)), order)
        step = max(1, wide.shape[1] // 16)
        ax.set_xticks(range(0, wide.shape[1], step), wide.columns[::step])
        ax.set_xlabel("layer")
        ax.set_ylabel("criterion")
        ax.set_title(title or "Per-layer importance (normalized)")
        fig.colorbar(im, ax=ax, label="normalized importance")
        fig.tight_layout()
    return fig


def validity_bars(validity: pd.DataFrame, title: str = ""):
    """Spearman correlation of each criterion with each ablation ground truth, with 95% CIs."""
    truths = sorted(validity["ground_truth"].unique())
    crits = [c for c in CRITERIA_ORDER if c in set(validity["criterion"])]
    with paper_style():
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(crits) + 1.5))
        h = 0.8 / max(1, len(truths))
        for j, g in enumerate(truths):
            v = validity[validity["ground_truth"] == g].set_index("criterion").reindex(crits)
            y = np.arange(len(crits)) + (j - (len(truths) - 1) / 2) * h
            err = np.vstack([v["spearman"] - v["ci_low"], v["ci_high"] - v["spearman"]]).clip(min=0)
            ax.barh(y, v["spearman"], height=h, xerr=err, capsize=2, label=g.replace("_", " "))
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(crits)), crits)
        ax.set_xlim(-1, 1)
        ax.set_xlabel("Spearman correlation with the ablation ground truth")
        ax.set_title(title or "How far each criterion can be trusted")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="ground truth")
        fig.tight_layout()
    return fig


def ablation_curve(table: pd.DataFrame, title: str = ""):
    """Per-layer effect of skipping that one layer: NDCG@10 drop and calibration-loss rise."""
    with paper_style():
        fig, ax1 = plt.subplots(figsize=(7, 3.2))
        lines = []
        for crit, ax, style in (("ablation_ndcg", ax1, "-o"), ("ablation_loss", ax1.twinx(), "--s")):
            rows = table[table["criterion"] == crit].sort_values("layer")
            if rows.empty:
                continue
            color = f"C{len(lines)}"
            lines += ax.plot(rows["layer"], rows["value"], style, ms=3, color=color,
                             label=crit.replace("ablation_", "skip layer: ").replace("ndcg", "NDCG@10 drop")
                             .replace("loss", "loss rise"))
            ax.set_ylabel("NDCG@10 drop" if crit == "ablation_ndcg" else "loss rise (nats)", color=color)
        ax1.axhline(0, color="grey", lw=0.6)
        ax1.set_xlabel("skipped layer")
        ax1.set_title(title or "Single-layer ablation")
        ax1.legend(handles=lines, loc="upper center", fontsize=8)
        fig.tight_layout()
    return fig
