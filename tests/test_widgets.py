"""Interactive views and the new static figures: plain functions, tested on synthetic data."""

import matplotlib
import numpy as np
import pandas as pd
import pytest

from layerviz import plots, widgets

matplotlib.use("Agg")

CRITS = ["fisher_sum", "kurtosis", "fused"]


def _importance(n=10, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in CRITS:
        v = rng.random(n)
        norm = (v - v.min()) / np.ptp(v)
        rows += [{"criterion": c, "layer": i, "value": v[i], "normalized": norm[i]} for i in range(n)]
    return pd.DataFrame(rows)


def _curves(imp, k=4):
    n = imp["layer"].nunique()
    order = imp[imp.criterion == "fused"].sort_values("normalized", ascending=False)["layer"].tolist()
    rows = [{"strategy": "full", "k": n, "layers": list(range(n)), "score": 0.5}]
    rows += [{"strategy": "importance_greedy", "k": j, "layers": sorted(order[:j]), "score": 0.1 * j}
             for j in range(1, k + 1)]
    rows += [{"strategy": "last_k", "k": j, "layers": list(range(n - j, n)), "score": 0.05 * j}
             for j in range(1, k + 1)]
    return pd.DataFrame(rows)


def test_explore_follows_the_criterion_and_reports_only_measured_quality():
    imp = _importance()
    cur = _curves(imp)
    for crit in CRITS:
        top3 = imp[imp.criterion == crit].nlargest(3, "normalized")["layer"].tolist()
        assert widgets.explore(imp, cur, crit, "top_k", 3)["layers"] == sorted(top3)
    st = widgets.explore(imp, cur, "fused", "importance_greedy", 3)
    assert st["score"] == pytest.approx(0.3) and st["retention"] == pytest.approx(0.6) and st["full"] == 0.5
    st = widgets.explore(imp, cur, "fused", "last_k", 2)
    assert st["layers"] == [8, 9] and st["retention"] == pytest.approx(0.2)
    assert widgets.explore(imp, cur, "fused", "first_k", 2) == {"layers": [0, 1], "score": None, "retention": None,
                                                                "n_layers": 10, "full": 0.5}
    assert widgets.explore(imp, cur, "fused", "uniform", 4)["layers"] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="not 'forward_greedy'"):
        widgets.explore(imp, cur, "fused", "forward_greedy", 3)
    with pytest.raises(ValueError, match="k=11 is invalid for a model with 10 layers"):
        widgets.explore(imp, cur, "fused", "last_k", 11)


def test_explorer_figure_marks_the_kept_layers():
    imp = _importance()
    fig = widgets.explorer_figure(imp, _curves(imp), "kurtosis", "top_k", 3, model="m")
    heat, marks = fig.data[0], fig.data[1]
    assert list(heat.y) == CRITS and "criterion" in heat.hovertemplate
    kept = widgets.explore(imp, _curves(imp), "kurtosis", "top_k", 3)["layers"]
    assert list(marks.x) == kept and set(marks.y) == {"kurtosis"}
    assert "not measured" in fig.layout.title.text
    fig = widgets.explorer_figure(imp, _curves(imp), "fused", "last_k", 2, model="m")
    assert list(fig.data[1].x) == [8, 9] and "retention 20%" in fig.layout.title.text
    assert list(fig.data[-1].x) == [2] and fig.data[-1].y[0] == pytest.approx(0.1)


def test_explorer_widget_wires_controls_to_the_figure_function(monkeypatch):
    imp = _importance()
    tables = {"a": (imp, _curves(imp)), "b": (_importance(6, 1), _curves(_importance(6, 1), 2))}

    class Result:  # what the explorer reads of a StudyResult
        models = list(tables)
        importance_table = staticmethod(lambda m: tables[m][0])
        rows = staticmethod(lambda frame, m: tables[m][1])
        layers = staticmethod(lambda m: int(tables[m][0]["layer"].nunique()))

    out = Result()
    calls = []
    real = widgets.explorer_figure
    monkeypatch.setattr(widgets, "explorer_figure", lambda *a, **k: calls.append((a[2:], k)) or real(*a, **k))
    box = widgets.explorer(out)
    controls = [w for row in box.children[:2] for w in row.children]
    model_w, crit_w, strat_w, k_w = controls
    assert list(model_w.options) == ["a", "b"] and crit_w.value == "fused"
    assert list(strat_w.options) == ["importance_greedy", "last_k"] and k_w.max == 10
    k_w.value = 2
    strat_w.value = "last_k"
    model_w.value = "b"
    k_w.value = 9  # more layers than model b has: capped at its 6
    assert calls[-1] == (("fused", "last_k", 6), {"model": "b"})
    assert ("fused", "importance_greedy", 2) in [c[0] for c in calls]


def test_interactive_figures_hover_and_values():
    imp = _importance()
    fig = widgets.importance_heatmap(imp)
    hm = fig.data[0]
    assert all(s in hm.hovertemplate for s in ("layer", "criterion", "normalized", "value"))
    assert list(hm.y) == CRITS
    assert np.allclose(np.asarray(hm.z)[2], imp[imp.criterion == "fused"].sort_values("layer")["normalized"])
    tr = widgets.selection_traces({"m": _curves(imp)})
    assert {t.name for t in tr.data} == {"m: full", "m: importance_greedy", "m: last_k"}
    assert "layers" in tr.data[1].hovertemplate
    dp = widgets.depth_profile({"a": np.arange(5.0), "b": np.arange(3.0)}, {"a": [0, 4]})
    assert np.allclose(dp.data[0].x, [0, 0.25, 0.5, 0.75, 1]) and list(dp.data[0].marker.line.width) == [2.5, 0, 0, 0, 2.5]
    bench = pd.DataFrame({"model": "m", "config": ["full", "k2", "k2+ad"], "k": [4, 2, 2], "adapters": [False, False, True],
                          "speedup": [1, 1.8, 1.7], "bound": [1, 1.9, 1.85], "latency_ms": [10, 6, 6.2],
                          "peak_mb": [100, 60, 61]})
    sp = widgets.speedup(bench)
    assert [t.name for t in sp.data] == ["m", "m + adapters", "m: FLOP bound"]
    assert list(sp.data[2].y) == [1.9]


def _labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


def test_static_rq2_and_overview_figures_are_labelled(tmp_path):
    imp = _importance()
    cur = _curves(imp)
    fig = plots.selection_traces({"m": cur, "n": cur}, chance=0.1)
    assert _labels(fig)[0] == ("kept layers k", "NDCG@10 (validation users)")
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"importance_greedy", "last_k",
                                                                    "full model (all layers)", "chance"}
    fig = plots.selected_layers(imp, {"last_k": [8, 9], "top_k": [1, 2]})
    assert fig.axes[1].get_xlabel().startswith("layer") and [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["last_k", "top_k"]
    th = pd.DataFrame({"model": ["m", "m"], "strategy": ["a", "b"], "lower_share": [0.5, 0], "middle_share": [0.25, 0],
                       "upper_share": [0.25, 1]})
    fig = plots.thirds_bars(th)
    assert fig.axes[0].get_xlabel() == "share of the kept layers"
    widths = [p.get_width() for p in fig.axes[0].patches]
    assert widths == [0.5, 0, 0.25, 0, 0.25, 1]
    var = pd.DataFrame({"model": "m", "variant": ["full", "select:x", "popularity", "chance"], "k": [10, 3, 0, 0],
                        "ndcg@10": [0.5, 0.4, 0.3, 0.2], "ci_low": [0.4, 0.3, 0.2, 0.2], "ci_high": [0.6, 0.5, 0.4, 0.2]})
    fig = plots.variant_bars(var)
    assert [p.get_height() for p in fig.axes[0].patches] == [0.4, 0.3]
    assert "full 0.500" in fig.axes[0].get_title(loc="left") and fig.legends
    summ = pd.DataFrame({"model": "m", "system": ["full model", "popularity"], "metric": "mrr", "mean": [0.4, 0.3],
                         "ci_low": [0.3, 0.2], "ci_high": [0.5, 0.4]})
    fig = plots.baseline_bars(summ)
    assert fig.axes[0].get_ylabel() == "test users (95% CI)" and fig.legends
    stats = pd.DataFrame({"step": ["raw", "5-core"], "users": [10, 5], "items": [8, 4], "interactions": [50, 20]})
    fig = plots.protocol_funnel({"d": stats})
    assert [ax.get_xlabel() for ax in fig.axes] == ["users", "items", "interactions"]
    paths = plots.save(fig, "funnel", tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_selection_traces_draw_ci_bands_and_name_n():
    imp = _importance()
    cur = _curves(imp)
    cur["ci_low"], cur["ci_high"], cur["n"] = cur["score"] - 0.05, cur["score"] + 0.05, 18
    fig = plots.selection_traces({"m": cur}, chance=0.1)
    ax = fig.axes[0]
    assert "n=18 users" in ax.get_title(loc="left")
    bands = [c for c in ax.collections if c.get_alpha() == 0.12]  # one band per strategy
    assert len(bands) == cur[cur.strategy != "full"]["strategy"].nunique()
    low, high = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    greedy = cur[cur.strategy == "importance_greedy"]
    assert (low, high) == pytest.approx((greedy.ci_low.min(), greedy.ci_high.max()))
    no_ci = plots.selection_traces({"m": _curves(imp)})  # older caches without intervals: lines only
    assert "n=" not in no_ci.axes[0].get_title(loc="left") and not no_ci.axes[0].collections


def test_heatmap_rank_scaling_is_not_flattened_by_one_extreme_layer():
    imp = _importance()
    imp.loc[(imp.criterion == "kurtosis") & (imp.layer == 0), "value"] = 1e6  # layer 0 dwarfs the rest
    k = imp.criterion == "kurtosis"
    v = imp.loc[k, "value"]
    imp.loc[k, "normalized"] = (v - v.min()) / (v.max() - v.min())
    minmax = plots.importance_heatmap(imp, scale="minmax").axes[0].images[0].get_array()
    rank = plots.importance_heatmap(imp, scale="rank").axes[0].images[0].get_array()
    row = plots.criteria_matrix(imp).index.get_loc("kurtosis")
    assert np.ptp(np.asarray(minmax[row, 1:])) < 1e-5  # every other layer one colour
    assert sorted(np.asarray(rank[row]).round(6)) == pytest.approx(np.linspace(0, 1, 10))
    with pytest.raises(ValueError, match="unknown scale"):
        plots.importance_heatmap(imp, scale="log")


def test_retention_vs_k_draws_each_variant_with_values_and_skips_the_rest():
    import pandas as pd

    from layerviz import plots

    rows = []
    for sel in ("primary", "first_k"):
        for k in (4, 7):
            for v, r, c in (("drop", 0.5, None), ("mse", 0.6, None), ("task+distill", 0.7, 0.75)):
                rows.append({"selection": sel, "k": k, "variant": v, "retention": r, "retention_low": r - 0.1,
                             "retention_high": r + 0.1, "retention_control": c,
                             "retention_control_low": None if c is None else c - 0.1,
                             "retention_control_high": None if c is None else c + 0.1})
    table = pd.DataFrame(rows).astype({"retention_control": float, "retention_control_low": float,
                                       "retention_control_high": float})
    fig = plots.retention_vs_k(table, title="t")
    assert [len(ax.get_legend_handles_labels()[1]) for ax in fig.axes] == [3, 3]
    assert [ax.get_title() for ax in fig.axes] == ["primary selection", "first_k selection"]
    fig = plots.retention_vs_k(table, against="retention_control")
    assert fig.axes[-1].get_legend_handles_labels()[1] == ["task+distill"]  # no control without healing
    assert list(fig.axes[0].get_xticks()) == [4, 7]
