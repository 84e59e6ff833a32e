"""Interactive views for the notebooks: plotly figures with hover, and ipywidgets explorers.

Every figure function here is plain (data in, ``plotly.graph_objects.Figure`` out, nothing shown) and
tested; the widgets only wire controls to them. Static paper figures are ``layerviz.plots``' job.
"""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from layerviz.compression.selection import FIXED, fixed_layers, importance_order
from layerviz.depth import depth as normalized_depth
from layerviz.plots import CRITERIA_ORDER, criteria_matrix

COLORSCALE = "Cividis"  # colour-blind safe, as the static figures


def importance_heatmap(table: pd.DataFrame, title: str = "") -> go.Figure:
    """Criteria x layers; hover shows layer, criterion, normalized and raw value."""
    norm, raw = criteria_matrix(table), criteria_matrix(table, "value")
    order = list(norm.index)
    fig = go.Figure(go.Heatmap(
        z=norm.to_numpy(), x=norm.columns.tolist(), y=order, customdata=raw.to_numpy(), colorscale=COLORSCALE,
        zmin=0, zmax=1, colorbar={"title": "normalized"},
        hovertemplate="layer %{x}<br>criterion %{y}<br>normalized %{z:.3f}<br>value %{customdata:.4g}<extra></extra>"))
    fig.update_layout(title=title or "Per-layer importance", xaxis_title="layer", yaxis_title="criterion",
                      yaxis_autorange="reversed", height=120 + 28 * len(order))
    return fig


def selection_traces(curves: dict[str, pd.DataFrame], title: str = "") -> go.Figure:
    """Validation NDCG@10 against k per model and strategy; hover shows the kept layers."""
    fig = go.Figure()
    for model, c in curves.items():
        for strategy, g in c.groupby("strategy", sort=False):
            g = g.sort_values("k")
            layers = [", ".join(map(str, v)) if len(v) <= 16 else f"{len(v)} layers" for v in g["layers"]]
            fig.add_trace(go.Scatter(
                x=g["k"], y=g["score"], mode="lines+markers" if strategy != "full" else "markers",
                name=f"{model}: {strategy}", customdata=np.array(layers, dtype=object)[:, None],
                marker_symbol="star" if strategy == "full" else "circle",
                hovertemplate=f"{model}<br>{strategy}<br>k %{{x}}<br>NDCG@10 %{{y:.3f}}"
                              "<br>layers %{customdata[0]}<extra></extra>"))
    fig.update_layout(title=title or "Selection traces", xaxis_title="kept layers k",
                      yaxis_title="NDCG@10 (validation users)")
    return fig


def depth_profile(profiles: dict[str, np.ndarray], selections: dict[str, list[int]] | None = None,
                  title: str = "") -> go.Figure:
    """Each model's layers at their normalized depth, coloured by importance (min-max per model)."""
    fig = go.Figure()
    for r, (model, v) in enumerate(profiles.items()):
        v = np.asarray(v, dtype=float)
        norm = (v - v.min()) / (np.ptp(v) or 1.0)
        L = len(v)
        depth = normalized_depth(range(L), L)
        sel = set((selections or {}).get(model, []))
        fig.add_trace(go.Scatter(
            x=depth, y=[model] * L, mode="markers", name=model, showlegend=False,
            marker={"symbol": "square", "size": 16, "color": norm, "colorscale": COLORSCALE, "cmin": 0, "cmax": 1,
                    "line": {"width": [2.5 if i in sel else 0 for i in range(L)], "color": "#d55e00"},
                    "colorbar": {"title": "importance"} if r == 0 else None},
            customdata=np.stack([np.arange(L), v, ["kept" if i in sel else "" for i in range(L)]], axis=1),
            hovertemplate="%{y}<br>layer %{customdata[0]}<br>depth %{x:.2f}<br>importance %{customdata[1]:.4g}"
                          "<br>%{customdata[2]}<extra></extra>"))
    fig.update_layout(title=title or "Importance by normalized depth (orange outline: selected)",
                      xaxis_title="normalized depth (layer / (L-1))", height=140 + 60 * len(profiles))
    return fig


def speedup(bench: pd.DataFrame, title: str = "") -> go.Figure:
    """Measured prefill speedup and the FLOP bound against k; hover shows latency and memory."""
    fig = go.Figure()
    for model, g in bench[bench["config"] != "full"].groupby("model", sort=False):
        for adapters, h in g.groupby("adapters"):
            h = h.sort_values("k")
            fig.add_trace(go.Scatter(
                x=h["k"], y=h["speedup"], mode="lines+markers", name=f"{model}{' + adapters' if adapters else ''}",
                customdata=h[["bound", "latency_ms", "peak_mb"]].to_numpy(),
                hovertemplate="k %{x}<br>speedup %{y:.2f}x<br>bound %{customdata[0]:.2f}x<br>latency "
                              "%{customdata[1]:.1f} ms<br>peak %{customdata[2]:.0f} MiB<extra></extra>"))
        plain = g[~g["adapters"]].sort_values("k")
        fig.add_trace(go.Scatter(x=plain["k"], y=plain["bound"], mode="lines", line={"dash": "dot"},
                                 name=f"{model}: FLOP bound", hovertemplate="k %{x}<br>bound %{y:.2f}x<extra></extra>"))
    fig.update_layout(title=title or "Speedup against k", xaxis_title="kept layers k",
                      yaxis_title="prefill speedup (x)")
    return fig


# ----------------------------------------------------------------------------- explorer


def explore(importance: pd.DataFrame, curves: pd.DataFrame, criterion: str, strategy: str, k: int) -> dict:
    """The state the explorer shows: kept layers for (criterion, strategy, k) and their measured quality.

    ``importance_greedy`` and ``top_k`` follow ``criterion``'s order (the greedy loop adds layers in that
    order, so its first k steps are ``top_k``); the other strategies ignore it. ``score``/``retention``
    (validation NDCG@10 relative to the full model) come from the study's curves and are None where
    that subset was never measured: nothing is estimated.
    """
    n = int(importance["layer"].nunique())
    order = importance_order(importance, criterion, True, n)
    if strategy not in (*FIXED, "importance_greedy"):
        raise ValueError(f"the explorer shows {', '.join((*FIXED, 'importance_greedy'))}, not {strategy!r}")
    layers = fixed_layers("top_k" if strategy == "importance_greedy" else strategy, n, k,
                          order if strategy in ("top_k", "importance_greedy") else None)
    measured = {tuple(np.asarray(v).tolist()): s for v, s in zip(curves["layers"], curves["score"], strict=True)}
    full = curves.loc[curves["strategy"] == "full", "score"]
    score = measured.get(tuple(layers))
    retention = score / full.iloc[0] if score is not None and len(full) and full.iloc[0] else None
    return {"layers": layers, "score": score, "retention": retention, "n_layers": n,
            "full": float(full.iloc[0]) if len(full) else None}


def explorer_figure(importance: pd.DataFrame, curves: pd.DataFrame, criterion: str, strategy: str, k: int,
                    model: str = "") -> go.Figure:
    """Top: the importance heatmap with the kept layers marked on ``criterion``'s row.

    Bottom: the strategy's measured trace with k marked; the title gives the layers and the retention.
    """
    st = explore(importance, curves, criterion, strategy, k)
    heat = importance_heatmap(importance).data[0]
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.16, row_heights=[0.6, 0.4],
                        subplot_titles=(f"importance; markers: layers kept by {strategy} (k={k}, order: {criterion})",
                                        f"{strategy}: validation NDCG@10 against k"))
    fig.add_trace(heat.update(colorbar={"title": "normalized", "len": 0.55, "y": 0.75}), row=1, col=1)
    fig.add_trace(go.Scatter(x=st["layers"], y=[criterion] * len(st["layers"]), mode="markers", name="kept",
                             marker={"symbol": "x", "size": 11, "color": "#d55e00", "line": {"width": 1}},
                             hovertemplate="kept layer %{x}<extra></extra>"), row=1, col=1)
    own = curves[curves["strategy"] == strategy].sort_values("k")
    if len(own):
        fig.add_trace(go.Scatter(x=own["k"], y=own["score"], mode="lines+markers", name=strategy,
                                 hovertemplate="k %{x}<br>NDCG@10 %{y:.3f}<extra></extra>"), row=2, col=1)
    if st["score"] is not None:
        fig.add_trace(go.Scatter(x=[k], y=[st["score"]], mode="markers", name=f"k={k}",
                                 marker={"size": 14, "color": "#d55e00", "symbol": "diamond"}), row=2, col=1)
    if st["full"] is not None:
        fig.add_hline(y=st["full"], line_dash="dash", annotation_text="full model", row=2, col=1)
    ret = (f"retention {st['retention']:.0%} of the full model" if st["retention"] is not None
           else "this subset was not measured (run a study whose strategies include it)")
    fig.update_layout(title=f"{model} {strategy}, k={k}: layers {st['layers']}; {ret}", height=720)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="kept layers k", row=2, col=1)
    fig.update_yaxes(title_text="NDCG@10", row=2, col=1)
    return fig


def explorer(res):
    """ipywidgets controls (model, criterion, strategy, k) wired to :func:`explorer_figure` (a StudyResult)."""
    from IPython.display import display  # only where a widget is displayed

    first = res.importance_table(res.models[0])
    crits = [c for c in CRITERIA_ORDER if c in set(first["criterion"])]
    strategies = [s for s in dict.fromkeys(res.rows("curves", res.models[0])["strategy"]) if s != "full"]
    max_k = max(res.layers(m) for m in res.models)
    model_w = W.Dropdown(options=res.models, description="model")
    crit_w = W.Dropdown(options=crits, value="fused" if "fused" in crits else crits[0], description="criterion")
    strat_w = W.Dropdown(options=strategies, description="strategy")
    k_w = W.IntSlider(value=min(8, max_k), min=1, max=max_k, description="k")

    def show(model, criterion, strategy, k):
        imp = res.importance_table(model)
        k = min(k, res.layers(model))
        display(explorer_figure(imp, res.rows("curves", model), criterion, strategy, k, model=model))

    out = W.interactive_output(show, {"model": model_w, "criterion": crit_w, "strategy": strat_w, "k": k_w})
    return W.VBox([W.HBox([model_w, crit_w]), W.HBox([strat_w, k_w]), out])
