"""Static paper figures (matplotlib/seaborn). Every function returns a Figure and never shows it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from layerviz.depth import THIRD_EDGES, depth, profile_on_grid
from layerviz.serving.loadtest import failed

PALETTE = "colorblind"
CMAP = "cividis"  # perceptually uniform and colour-blind safe
CRITERIA_ORDER = ["fisher_sum", "fisher_mean", "attn_entropy", "attn_item_mass", "block_influence",
                  "angular_distance", "norm_ratio", "kurtosis", "fused", "ablation_loss", "ablation_ndcg"]


@contextmanager
def paper_style():
    """Readable fonts and a colour-blind-safe palette for every figure drawn inside."""
    import seaborn as sns  # heavy import, needed only for the paper style

    with plt.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                         "xtick.labelsize": 8, "ytick.labelsize": 9, "figure.dpi": 110,
                         "axes.spines.top": False, "axes.spines.right": False}):
        with sns.color_palette(PALETTE):
            yield


def criteria_matrix(table: pd.DataFrame, values: str = "normalized", criteria: list[str] | None = None) -> pd.DataFrame:
    """Criteria (rows, in ``CRITERIA_ORDER`` or the given order) x layers of one column of an importance table."""
    wide = table.pivot(index="criterion", columns="layer", values=values)
    return wide.loc[[c for c in (criteria or CRITERIA_ORDER) if c in wide.index]]


def save(fig, name: str, figures_dir: str | Path = "figures") -> list[Path]:
    """Write ``name``.pdf and ``name``.png into ``figures_dir``; returns both paths."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:  # tight: legends placed outside the axes are kept, nothing is clipped
        fig.savefig(p, dpi=200, bbox_inches="tight")
    return paths


SCALES = ("rank", "minmax")


def importance_heatmap(table: pd.DataFrame, title: str = "", criteria: list[str] | None = None,
                       scale: str = "rank"):
    """Criteria x layers heatmap of importance (1 = most important layer).

    ``scale='rank'`` colours each criterion by the layers' rank (0 = least, 1 = most important), so one
    extreme layer (often layer 0) cannot flatten all others into one colour; ``'minmax'`` shows the
    min-max normalized values themselves.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    wide = criteria_matrix(table, criteria=criteria)
    if scale == "rank":
        wide = (wide.rank(axis=1, method="average") - 1).div((wide.shape[1] - 1) or 1)
    order = list(wide.index)
    with paper_style():
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * wide.shape[1] + 2), 0.42 * len(order) + 1.4))
        im = ax.imshow(wide.to_numpy(), aspect="auto", cmap=CMAP, vmin=0, vmax=1)
        ax.set_yticks(range(len(order)), order)
        step = max(1, wide.shape[1] // 16)
        ax.set_xticks(range(0, wide.shape[1], step), wide.columns[::step])
        ax.set_xlabel("layer")
        ax.set_ylabel("criterion")
        ax.set_title(title or f"Per-layer importance ({'rank within criterion' if scale == 'rank' else 'min-max'})")
        fig.colorbar(im, ax=ax, label="importance rank (1 = most)" if scale == "rank" else "normalized importance")
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
    """Per-layer effect of skipping that one layer: NDCG@10 drop and probe-loss rise."""
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


KIND_COLORS = {"identity": "#bbbbbb", "linear": "C0", "residual": "C1", "mlp": "C2"}


def adapter_placement(placement: pd.DataFrame, n_layers: int, title: str = ""):
    """Which adapter type sits in which gap of a selection: kept layers as dark cells, gaps coloured by kind."""
    kept = sorted(set(placement["next"]) - {n_layers})
    with paper_style():
        fig, ax = plt.subplots(figsize=(max(6.5, 0.26 * (n_layers + 2) + 1.5), 2.3))
        for i in range(n_layers):
            ax.add_patch(plt.Rectangle((i - 0.45, 0.1), 0.9, 0.8, color="#222222" if i in kept else "#eeeeee",
                                       ec="#999999", lw=0.5))
        for end, name in ((-1, "emb"), (n_layers, "norm")):
            ax.add_patch(plt.Rectangle((end - 0.45, 0.1), 0.9, 0.8, color="white", ec="#555555", lw=0.8))
            ax.text(end, 0.5, name, ha="center", va="center", fontsize=7, rotation=90)
        for _, g in placement.iterrows():
            if g["kind"] == "identity":
                continue
            x0, x1 = g["prev"] + 0.5, g["next"] - 0.5
            ax.annotate("", xy=(x1, 1.15), xytext=(x0, 1.15),
                        arrowprops=dict(arrowstyle="-|>", color=KIND_COLORS[g["kind"]], lw=2))
            rank = "" if pd.isna(g["rank"]) else f" r{int(g['rank'])}"
            ax.text((x0 + x1) / 2, 1.3, f"{g['kind']}{rank}", ha="center", va="bottom", fontsize=7,
                    color=KIND_COLORS[g["kind"]])
        handles = [plt.Rectangle((0, 0), 1, 1, color="#222222"), plt.Rectangle((0, 0), 1, 1, color="#eeeeee", ec="#999999")]
        handles += [plt.Line2D([], [], color=KIND_COLORS[k], lw=2) for k in ("linear", "residual", "mlp")]
        ax.legend(handles, ["kept layer", "skipped layer", "linear adapter", "residual adapter", "MLP adapter"],
                  loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=5, frameon=False)
        for f in THIRD_EDGES:  # region boundaries: depth i / (L-1) crosses a third
            ax.axvline((n_layers - 1) * f, color="#888888", lw=0.6, ls=":")
        ax.set_xlim(-1.6, n_layers + 0.6)
        ax.set_ylim(0, 1.75)
        ax.set_yticks([])
        step = max(1, n_layers // 15)
        ax.set_xticks(range(0, n_layers, step))
        ax.set_xlabel("layer (dotted: thirds of the depth)")
        ax.spines["left"].set_visible(False)
        ax.set_title(title or f"Adapter placement: {len(kept)} of {n_layers} layers kept")
        fig.tight_layout()
    return fig


def training_curves(curve: pd.DataFrame, title: str = ""):
    """Validation MSE per epoch: stage 1 (one line per gap, local) and stage 2 (end to end)."""
    stages = [s for s in ("stage1", "stage2") if (curve["stage"] == s).any()]
    with paper_style():
        fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4.2 * max(1, len(stages)), 3.2), squeeze=False)
        for ax, stage in zip(axes[0], stages, strict=False):
            rows = curve[curve["stage"] == stage]
            for gap, g in rows.groupby("gap", sort=False):
                ax.plot(g["epoch"], g["val_mse"], "-o", ms=2.5, label=str(gap))
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel("validation MSE")
            ax.set_title("stage 1: each adapter vs teacher state" if stage == "stage1"
                         else "stage 2: final hidden state (pre-norm)")
            ax.legend(title="gap" if stage == "stage1" else None, fontsize=7, ncol=2 if rows["gap"].nunique() > 5 else 1)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def retention_vs_k(table: pd.DataFrame, goal: float | None = 0.85, against: str = "retention", title: str = ""):
    """RQ3: NDCG@10 retention (with its 95% CI) against k for plain dropping and each adapter variant, one panel per
    selection; ``against``: 'retention' (the full model) or 'retention_control' (the full model trained as long)."""
    sels = list(dict.fromkeys(table["selection"]))
    if against not in table:  # no variant healed: nothing to show against the control
        table = table.assign(**{against: np.nan, f"{against}_low": np.nan, f"{against}_high": np.nan})
    with paper_style():
        fig, axes = plt.subplots(1, len(sels), figsize=(4.4 * len(sels), 3.4), squeeze=False, sharey=True)
        for ax, sel in zip(axes[0], sels, strict=True):
            for j, (variant, g) in enumerate(table[table["selection"] == sel].groupby("variant", sort=False)):
                g = g.dropna(subset=[against]).sort_values("k")
                if not len(g):  # no value against this reference (no healing: no control)
                    continue
                err = [g[against] - g[f"{against}_low"], g[f"{against}_high"] - g[against]]
                ax.errorbar(g["k"] + 0.08 * (j - 2), g[against], yerr=err, fmt="-o", ms=3.5, capsize=2,
                            label=variant, color="#888888" if variant == "drop" else None)
            if goal is not None:
                ax.axhline(goal, color="#d62728", lw=0.8, ls="--")
            ax.axhline(1.0, color="#444444", lw=0.6, ls=":")
            ax.set_xlabel("k (kept layers)")
            ax.set_xticks(sorted(table.loc[table["selection"] == sel, "k"].unique()))
            ax.set_title(f"{sel} selection")
        axes[0][0].set_ylabel("NDCG@10 retention" + (" vs control" if against == "retention_control" else ""))
        axes[0][-1].legend(fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def retention_bars(retention: pd.DataFrame, full: float, chance: float, title: str = ""):
    """NDCG@10 of the compact model before training, after stage 1 and after stage 2 (95% CIs)."""
    names = {"drop": "layer dropping\n(no training)", "stage1": "adapters,\nstage 1", "stage2": "adapters,\nstage 2"}
    with paper_style():
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        x = np.arange(len(retention))
        err = np.vstack([retention["ndcg@10"] - retention["ndcg@10_low"],
                         retention["ndcg@10_high"] - retention["ndcg@10"]]).clip(min=0)
        ax.bar(x, retention["ndcg@10"], yerr=err, capsize=3, color=[f"C{i}" for i in range(len(x))])
        for xi, (_, r) in zip(x, retention.iterrows(), strict=True):
            ax.text(xi, r["ndcg@10_high"] + 0.005, f"{100 * r['retention']:.0f}%", ha="center", va="bottom", fontsize=8)
        ax.axhline(full, color="black", lw=1, label=f"full model ({full:.3f})")
        ax.axhline(chance, color="grey", lw=1, ls="--", label=f"chance ({chance:.3f})")
        ax.set_xticks(x, [names.get(s, s) for s in retention["stage"]])
        ax.set_ylabel("NDCG@10 (test users)")
        ax.set_ylim(0, max(full, retention["ndcg@10_high"].max()) * 1.2)
        ax.set_title(title or "Retention of the compact model")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
    return fig


def depth_heatmap(profiles: dict[str, np.ndarray], selections: dict[str, list[int]] | None = None,
                  grid_points: int = 41, title: str = ""):
    """Models x normalized depth: colour = importance (per-model min-max), markers = selected layers.

    ``profiles`` maps a model name to its per-layer importance (layer order); layer counts may
    differ, so each profile is interpolated onto a common depth grid in [0, 1].
    """
    grid = np.linspace(0, 1, grid_points)
    names = list(profiles)
    rows = []
    for n in names:
        v = np.asarray(profiles[n], dtype=float)
        v = (v - v.min()) / (np.ptp(v) or 1.0)
        rows.append(profile_on_grid(v, grid))
    with paper_style():
        fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(names) + 1.6))
        im = ax.imshow(np.array(rows), aspect="auto", cmap=CMAP, vmin=0, vmax=1, extent=(0, 1, len(names) - 0.5, -0.5))
        for r, n in enumerate(names):
            sel = (selections or {}).get(n)
            if sel:
                L = len(profiles[n])
                ax.scatter(depth(sel, L), [r] * len(sel), marker="v", s=36, color="#d55e00",
                           edgecolor="white", linewidth=0.6, zorder=3, clip_on=False,
                           label="selected layer" if r == 0 else None)
        ax.set_yticks(range(len(names)), [f"{n} (L={len(profiles[n])})" for n in names])
        for f in THIRD_EDGES:
            ax.axvline(f, color="white", lw=0.8, ls=":")
        ax.set_xlabel("normalized depth (layer / (L-1)); dotted: thirds")
        ax.set_title(title or "Layer importance by normalized depth")
        fig.colorbar(im, ax=ax, label="importance\n(min-max per model)")
        if selections:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
        fig.tight_layout()
    return fig


def speedup_curve(bench: pd.DataFrame, title: str = ""):
    """Measured prefill speedup against k, with and without adapters, and the FLOP bound."""
    with paper_style():
        fig, ax = plt.subplots(figsize=(5.6, 3.6))
        for m_i, (model, g) in enumerate(bench.groupby("model", sort=False)):
            g = g[g["config"] != "full"]
            color = f"C{m_i}"
            plain, ad = g[~g["adapters"]].sort_values("k"), g[g["adapters"]].sort_values("k")
            ax.plot(plain["k"], plain["speedup"], "-o", color=color, ms=4, label=f"{model}: measured")
            if len(ad):
                ax.plot(ad["k"], ad["speedup"], "--s", color=color, ms=4, mfc="white", label=f"{model}: + adapters")
            ax.plot(plain["k"], plain["bound"], ":", color=color, lw=1.5, label=f"{model}: FLOP bound")
        ax.axhline(1, color="grey", lw=0.6)
        ax.set_xlabel("kept layers k")
        ax.set_ylabel("prefill speedup over the full model (x)")
        ax.set_title(title or "Speedup against k")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
    return fig


def efficiency_bars(bench: pd.DataFrame, title: str = ""):
    """Query latency (median, IQR), throughput and peak memory per configuration and model."""
    cols = [("latency_ms", "query latency (ms)"), ("qps", "queries / s"), ("peak_mb", "peak memory (MiB)")]
    cols = [(c, lab) for c, lab in cols if c in bench]
    models = list(dict.fromkeys(bench["model"]))
    with paper_style():
        fig, axes = plt.subplots(len(models), len(cols), figsize=(3.3 * len(cols), 2.6 * len(models)), squeeze=False)
        for r, model in enumerate(models):
            g = bench[bench["model"] == model]
            x = np.arange(len(g))
            for c, (col, lab) in enumerate(cols):
                ax = axes[r, c]
                err = g["latency_iqr_ms"] / 2 if col == "latency_ms" and "latency_iqr_ms" in g else None
                ax.bar(x, g[col], yerr=err, capsize=2, color=["#555555" if k == "full" else
                                                                  ("C1" if a else "C0")
                                                                  for k, a in zip(g["config"], g["adapters"], strict=True)])
                ax.set_xticks(x, g["config"], rotation=45, ha="right")
                ax.set_ylabel(lab)
                if c == 0:
                    ax.set_title(model, loc="left")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def cost_plan(minutes: pd.DataFrame, title: str = ""):
    """Planned against recorded minutes per step of each model (``study.minutes``); the plan's time is its
    FLOPs at one throughput, so the gap shows where a step runs faster or slower than that rate."""
    models = list(dict.fromkeys(minutes["model"]))
    with paper_style():
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 0.28 * minutes.groupby("model").size().max()
                                                          + 1.2), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            g = minutes[minutes["model"] == model]
            y = np.arange(len(g))
            ax.barh(y - 0.2, g["planned"], height=0.4, color="C0", label="planned")
            ax.barh(y + 0.2, g["recorded"].fillna(0), height=0.4, color="C1", label="recorded")
            ax.set_yticks(y, g["step"])
            ax.invert_yaxis()
            ax.set_xlabel("minutes")
            ax.set_title(f"{model}: {g['planned'].sum():.1f} planned, {g['recorded'].sum():.1f} recorded", loc="left")
        axes[0, 0].legend(loc="lower right")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


STRATEGY_MARKERS = {"importance_greedy": "o", "top_k": "^", "first_k": "s", "last_k": "D", "uniform": "P",
                    "random": "x", "forward_greedy": "v", "backward_greedy": "<", "contiguous_block": ">",
                    "reference": "*"}


def selection_traces(curves: dict[str, pd.DataFrame], chance: float | None = None, title: str = ""):
    """Validation NDCG@10 against the number of kept layers, one line per strategy, one panel per model.

    ``curves`` maps a model name to rows (strategy, k, score); the ``full`` row is drawn as a line.
    """
    names = list(curves)
    with paper_style():
        fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            c = curves[name]
            full = c[c["strategy"] == "full"]
            bands = "ci_low" in c and c["ci_low"].notna().any()
            for i, (strategy, g) in enumerate((s, g) for s, g in c.groupby("strategy", sort=False) if s != "full"):
                g = g.sort_values("k")
                big = strategy == "importance_greedy"  # hollow and larger: top_k's points coincide with it
                ax.plot(g["k"], g["score"], "-", marker=STRATEGY_MARKERS.get(strategy, "o"), ms=7 if big else 4,
                        mfc="none" if big else None, color=f"C{i}", label=strategy)
                if bands:  # 95% bootstrap CI over the validation users
                    ax.fill_between(g["k"], g["ci_low"], g["ci_high"], color=f"C{i}", alpha=0.12, lw=0)
            if len(full):
                ax.axhline(full["score"].iloc[0], color="black", lw=1, label="full model (all layers)")
                if bands:
                    ax.axhspan(full["ci_low"].iloc[0], full["ci_high"].iloc[0], color="black", alpha=0.07, lw=0)
            if chance is not None:
                ax.axhline(chance, color="grey", lw=1, ls="--", label="chance")
            ax.set_xlabel("kept layers k")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            ax.set_ylabel("NDCG@10 (validation users)")
            users = f", n={int(c['n'].max())} users, bands: 95% CI" if bands else ""
            ax.set_title((f"{name} (L={int(full['k'].iloc[0])}{users})" if len(full) else name), loc="left",
                         fontsize="medium")
            ax.set_ylim(bottom=0)
        handles, labels = axes[0, -1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)),
                   frameon=False)
        fig.suptitle(title or "Selection traces: quality against the number of kept layers")
        fig.tight_layout()
    return fig


def selected_layers(table: pd.DataFrame, selections: dict[str, list[int]], title: str = "",
                    criteria: list[str] | None = None):
    """The importance heatmap (criteria x layers) with each strategy's kept layers marked below it."""
    wide = criteria_matrix(table, criteria=criteria)
    order, n, strategies = list(wide.index), wide.shape[1], list(selections)
    with paper_style():
        fig, (ax, ax2) = plt.subplots(2, 1, sharex=True, figsize=(max(6.5, 0.28 * n + 2.5),
                                                                   0.42 * (len(order) + len(strategies)) + 2),
                                      gridspec_kw={"height_ratios": [len(order), max(1, len(strategies))]},
                                      layout="constrained")
        im = ax.imshow(wide.to_numpy(), aspect="auto", cmap=CMAP, vmin=0, vmax=1, extent=(-0.5, n - 0.5, len(order) - 0.5, -0.5))
        ax.set_yticks(range(len(order)), order)
        ax.set_ylabel("criterion")
        for r, s in enumerate(strategies):
            ax2.scatter(range(n), [r] * n, s=14, color="#dddddd", marker="s")
            ax2.scatter(selections[s], [r] * len(selections[s]), s=40, color="#d55e00",
                        marker=STRATEGY_MARKERS.get(s, "o"), zorder=3)
        ax2.set_yticks(range(len(strategies)), strategies)
        ax2.set_ylim(len(strategies) - 0.5, -0.5)
        ax2.set_ylabel("kept by")
        for a in (ax, ax2):
            for f in THIRD_EDGES:
                a.axvline((n - 1) * f, color="white" if a is ax else "#888888", lw=0.8, ls=":")
        step = max(1, n // 16)
        ax2.set_xticks(range(0, n, step))
        ax2.set_xlabel("layer (dotted: thirds of the depth)")
        ax.set_title(title or "Importance and the layers each strategy keeps")
        fig.colorbar(im, ax=[ax, ax2], label="normalized importance", shrink=0.8)
    return fig


REGION_COLORS = {"lower": "#0072b2", "middle": "#e69f00", "upper": "#009e73"}


def thirds_bars(thirds: pd.DataFrame, title: str = ""):
    """Share of the kept layers in the lower, middle and upper third, per model and strategy."""
    t = thirds.reset_index(drop=True)
    labels = [f"{m}: {s}" for m, s in zip(t["model"], t["strategy"], strict=True)]
    with paper_style():
        fig, ax = plt.subplots(figsize=(7, 0.34 * len(t) + 1.6))
        left = np.zeros(len(t))
        for region in ("lower", "middle", "upper"):
            v = t[f"{region}_share"].to_numpy()
            ax.barh(range(len(t)), v, left=left, color=REGION_COLORS[region], label=f"{region} third")
            left += v
        for f in THIRD_EDGES:
            ax.axvline(f, color="white", lw=0.6, ls=":")
        ax.set_yticks(range(len(t)), labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the kept layers")
        ax.set_title(title or "Where the kept layers lie")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
    return fig


def variant_bars(variants: pd.DataFrame, metric: str = "ndcg@10", title: str = ""):
    """Test ``metric`` (95% CI) per variant, one panel per model; full model and chance as lines."""
    models = list(dict.fromkeys(variants["model"]))
    with paper_style():
        fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 3.6), squeeze=False, sharey=True)
        for ax, model in zip(axes[0], models, strict=True):
            g = variants[(variants["model"] == model) & ~variants["variant"].isin(["full", "chance"])]
            full = variants[(variants["model"] == model) & (variants["variant"] == "full")]
            chance = variants[(variants["model"] == model) & (variants["variant"] == "chance")]
            x = np.arange(len(g))
            err = np.vstack([g[metric] - g["ci_low"], g["ci_high"] - g[metric]]).clip(min=0)
            ax.bar(x, g[metric], yerr=err, capsize=3, color=[f"C{i}" for i in range(len(g))])
            ax.set_xticks(x, [f"{v.replace('select:', '')}\n(k={k})" if v != "popularity" else v
                              for v, k in zip(g["variant"], g["k"], strict=True)], rotation=30, ha="right")
            lines = []
            if len(full):
                ax.axhline(full[metric].iloc[0], color="black", lw=1, label="full model")
                lines.append(f"full {full[metric].iloc[0]:.3f}")
            if len(chance):
                ax.axhline(chance[metric].iloc[0], color="grey", lw=1, ls="--", label="chance")
                lines.append(f"chance {chance[metric].iloc[0]:.3f}")
            ax.set_title(f"{model} ({', '.join(lines)})" if lines else model, loc="left")
        axes[0, 0].set_ylabel(f"{metric.replace('ndcg', 'NDCG')} (test users, 95% CI)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.9), frameon=False)
        fig.suptitle(title or "Plain layer dropping: selections against references")
        fig.tight_layout()
    return fig


def baseline_bars(summary: pd.DataFrame, title: str = ""):
    """Systems side by side on every metric (or user group), one panel per model.

    ``summary``: rows (model, system, metric, mean, ci_low, ci_high); ``metric`` may name a user group
    instead (a popularity slice, the cold-start set).
    """
    models = list(dict.fromkeys(summary["model"]))
    systems = list(dict.fromkeys(summary["system"]))
    metrics_ = list(dict.fromkeys(summary["metric"]))
    colors = {"full model": "C0", "fine-tuned": "C0", "zero-shot": "C2", "popularity": "C1", "chance": "#999999",
              "SASRec": "C3", "sasrec": "C3"}
    with paper_style():
        fig, axes = plt.subplots(1, len(models), figsize=(max(4.8, 0.9 * len(metrics_) + 1.5) * len(models), 3.4),
                                 squeeze=False, sharey=True)
        w = 0.8 / len(systems)
        for ax, model in zip(axes[0], models, strict=True):
            for j, system in enumerate(systems):
                g = summary[(summary["model"] == model) & (summary["system"] == system)].set_index("metric")
                g = g.reindex(metrics_)
                x = np.arange(len(metrics_)) + (j - (len(systems) - 1) / 2) * w
                err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]]).clip(min=0)
                ax.bar(x, g["mean"], width=w, yerr=err, capsize=2, color=colors.get(system, f"C{j + 2}"), label=system)
            ax.set_xticks(range(len(metrics_)), metrics_, rotation=30, ha="right")
            ax.set_title(model, loc="left")
        axes[0, 0].set_ylabel("test users (95% CI)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.9), frameon=False)
        fig.suptitle(title or "The full model against popularity and chance")
        fig.tight_layout()
    return fig


def finetune_curves(curves: dict[str, pd.DataFrame], title: str = ""):
    """Fine-tuning curves per model: training loss and validation NDCG@10 against the step.

    ``curves``: model -> frame with step, train_loss, valid_ndcg@10 (``FinetuneResult.curves``); step 0 is
    the zero-shot model.
    """
    with paper_style():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.3))
        for j, (m, c) in enumerate(curves.items()):
            a1.plot(c["step"], c["train_loss"], marker="o", ms=2, color=f"C{j}", label=m)
            v = c.dropna(subset=["valid_ndcg@10"])
            a2.plot(v["step"], v["valid_ndcg@10"], marker="o", ms=4, color=f"C{j}", label=m)
        a1.set(xlabel="optimizer step", ylabel="training loss", title="training loss per step")
        a2.set(xlabel="optimizer step", ylabel="NDCG@10", title="validation NDCG@10 (step 0: zero-shot)")
        a2.legend(frameon=False)
        fig.suptitle(title or "Fine-tuning the recommender")
        fig.tight_layout()
    return fig


def finetune_profiles(zeroshot: dict[str, pd.DataFrame], tuned: dict[str, pd.DataFrame], shift: pd.DataFrame,
                      criteria=("fused", "ablation_loss"), title: str = ""):
    """Zero-shot against fine-tuned importance on normalized depth, one panel per model.

    ``zeroshot`` / ``tuned``: model -> importance table; ``shift``: rows (model, criterion, spearman,
    ci_low, ci_high) from ``study.importance_shift``, quoted in each panel's legend.
    """
    models = list(zeroshot)
    with paper_style():
        fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.4), squeeze=False, sharey=True)
        for ax, m in zip(axes[0], models, strict=True):
            for j, crit in enumerate(criteria):
                for table, style, name in ((zeroshot[m], "--", "zero-shot"), (tuned[m], "-", "fine-tuned")):
                    t = table[table["criterion"] == crit].sort_values("layer")
                    if t.empty:
                        continue
                    d = t["layer"] / max(1, len(t) - 1)
                    ax.plot(d, t["normalized"], style, color=f"C{j}", marker="o", ms=3, label=f"{crit}, {name}")
            rho = [f"{c.criterion} {c.spearman:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
                   for c in shift[shift["model"] == m].itertuples()]
            ax.set_xlabel("normalized depth i/(L-1)")
            ax.set_title(f"{m} ({len(t)} layers); Spearman zero-shot vs fine-tuned:\n" + "\n".join(rho),
                         loc="left", fontsize=9)
        axes[0, 0].set_ylabel("normalized importance (1 = most important)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.7), frameon=False, handlelength=3)
        fig.suptitle(title or "Does fine-tuning move which layers matter?")
        fig.tight_layout()
    return fig


def protocol_funnel(stats: dict[str, pd.DataFrame], title: str = ""):
    """Users, items and interactions after each step of the data protocol, one row of panels per dataset."""
    cols = ["users", "items", "interactions"]
    with paper_style():
        fig, axes = plt.subplots(len(stats), 3, figsize=(10, 2.4 * len(stats) + 0.6), squeeze=False)
        for r, (name, st) in enumerate(stats.items()):
            for c, col in enumerate(cols):
                ax = axes[r, c]
                ax.barh(range(len(st)), st[col], color=f"C{c}")
                for i, v in enumerate(st[col]):
                    ax.text(v, i, f" {v:,}", va="center", fontsize=7)
                ax.set_yticks(range(len(st)), st["step"] if c == 0 else [""] * len(st))
                ax.invert_yaxis()
                ax.set_xlim(0, st[col].max() * 1.35)
                ax.set_xlabel(col)
                if c == 0:
                    ax.set_title(name, loc="left")
        fig.suptitle(title or "The data protocol, step by step")
        fig.tight_layout()
    return fig


def serve_latency(points: pd.DataFrame, objective_ms: float, max_rate: dict | None = None, title: str = ""):
    """Open-loop load test: p50 (dashed) and p99 (solid) latency against the offered rate, one colour per served
    configuration, the p99 objective, and each one's maximum rate under it (a dotted line); shed or failed
    points are drawn hollow. ``points``: one row per (config, offered_rate) (benchmarks/bench_serve.py)."""
    with paper_style():
        fig, ax = plt.subplots(figsize=(6.2, 3.8))
        for i, (name, g) in enumerate(points.groupby("config", sort=False)):
            g = g.sort_values("offered_rate")
            bad = failed(g)
            ax.plot(g["offered_rate"], g["p99_ms"], "-", color=f"C{i}", lw=1.4, label=f"{name} p99")
            ax.plot(g["offered_rate"], g["p50_ms"], "--", color=f"C{i}", lw=1, label=f"{name} p50")
            ax.scatter(g["offered_rate"], g["p99_ms"], s=18, color=np.where(bad, "white", f"C{i}"),
                       edgecolors=f"C{i}", zorder=3)
            if max_rate and max_rate.get(name, 0) > 0:
                ax.axvline(max_rate[name], color=f"C{i}", ls=":", lw=1)
        ax.axhline(objective_ms, color="black", lw=0.8)
        ax.annotate(f"p99 objective {objective_ms:.0f} ms", (ax.get_xlim()[0], objective_ms), xytext=(4, 3),
                    textcoords="offset points", fontsize=8)
        ax.set(xlabel="offered rate (requests/s, Poisson)", ylabel="latency from scheduled send (ms)", yscale="log",
               title=title or "Latency under open-loop load")
        ax.legend(frameon=False, fontsize=7, ncol=2)
        fig.tight_layout()
    return fig


def publish(fig, name: str, figures_dir: str | Path = "figures"):
    """Save ``fig`` (PDF+PNG) and release pyplot's reference, so a notebook shows it once via display()."""
    save(fig, name, figures_dir)
    plt.close(fig)
    return fig
