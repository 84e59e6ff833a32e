"""Every table builder and hypothesis rule on small hand-built StudyResults, with the verdict each must give."""

import numpy as np
import pandas as pd
import pytest

from layerviz.study import hypotheses as H
from layerviz.study import tables as T
from layerviz.study import text
from layerviz.study.config import StudyConfig
from layerviz.study.result import FINE_TUNED, ZERO_SHOT, StudyResult

A, B = "synthetic-electronics", "synthetic-movies"
L, K, USERS = 12, 3, 40


def _frame(rows, cols):
    return pd.DataFrame(rows, columns=cols) if not rows else pd.DataFrame(rows)


def make(models=("m1",), per_user=None, profiles=None, zs_profiles=None, speedup=4.0, retention=(0.9, 0.85, 0.95),
         finetune=False, layers=None, transfer=False):
    """A StudyResult with only what the tables read. ``per_user``: {(model, dataset, variant): values}."""
    cfg = StudyConfig(models=list(models), finetune={"max_steps": 2} if finetune else {}, negatives=9,
                      strategies=["importance_greedy", "last_k"])  # not validated: the models are names only
    pu = []
    for (m, d, v), vals in (per_user or {}).items():
        for metric in T.QUALITY_METRICS:
            pu += [{"model": m, "dataset": d, "variant": v, "user": u, "metric": metric, "value": float(x)}
                   for u, x in enumerate(vals)]
    imp, sel, ad, summ, bench, cal = [], [], [], [], [], []
    for m in models:
        for base, prof in ((FINE_TUNED if finetune else ZERO_SHOT, (profiles or {}).get(m)),
                           (ZERO_SHOT, (zs_profiles or {}).get(m) if finetune else None)):
            for crit, v in ({} if prof is None else prof).items():
                imp += [{"model": m, "dataset": A, "base": base, "layer": i, "criterion": crit, "value": float(x),
                         "normalized": 0.0} for i, x in enumerate(v)]
        chosen = (layers or {}).get(m, [0, 5, 11])
        for d in (A, B) if transfer else (A,):
            for s, lay in (("importance_greedy", chosen), ("last_k", list(range(L - K, L)))):
                sel.append({"model": m, "dataset": d, "strategy": s, "n_layers": L, "k": len(lay), "layers": lay,
                            "lower": sum(i < 4 for i in lay), "middle": sum(4 <= i < 8 for i in lay),
                            "upper": sum(i >= 8 for i in lay), "score": 0.5})
            r, lo, hi = retention
            for stage in ("drop", "stage1"):
                ad.append({"model": m, "dataset": d, "stage": stage, "retention": r, "retention_low": lo,
                           "retention_high": hi, "retention@5": r, "retention@5_low": lo, "retention@5_high": hi,
                           "val_mse": 1.0})
            summ.append({"model": m, "dataset": d, "layers": chosen, "k": K, "n_layers": L})
            for base in (FINE_TUNED, ZERO_SHOT):
                cal.append({"model": m, "dataset": d, "base": base, "choice": "none"})
        bench += [{"model": m, "config": "full", "k": L, "adapters": False, "speedup": 1.0, "bound": 1.0,
                   "memory_ratio": 1.0},
                  {"model": m, "config": f"k{K}+adapters", "k": K, "adapters": True, "speedup": speedup,
                   "bound": 4.2, "memory_ratio": 0.5}]
    variants = [{"model": m, "dataset": A, "variant": v, "k": L, "layers": list(range(L))}
                for m in models for (mm, d, v) in (per_user or {}) if mm == m and d == A and v != "zeroshot"
                and not v.startswith("adapters") and v != "popularity"]
    empty = pd.DataFrame(columns=["model", "dataset"])
    res = StudyResult(cfg, _frame(pu, ["model", "dataset", "variant", "user", "metric", "value"]),
                      _frame(variants, ["model", "dataset", "variant", "k", "layers"]),
                      _frame(imp, ["model", "dataset", "base", "layer", "criterion", "value"]), empty,
                      pd.DataFrame(sel), empty, empty, pd.DataFrame(ad), pd.DataFrame(summ), empty, empty,
                      pd.DataFrame(bench), pd.DataFrame(cal), empty, empty)
    return res


def users(mean, spread=0.0, n=USERS, seed=0):
    return np.clip(mean + spread * np.random.default_rng(seed).standard_normal(n), 0, 1)


# ----------------------------------------------------------------------------- rules with fixed inputs


@pytest.mark.parametrize("low,high,thr,expected", [(0.1, 0.3, 0, "supported"), (-0.3, -0.1, 0, "contradicted"),
                                                   (-0.1, 0.1, 0, "inconclusive"), (0.85, 0.95, 0.9, "inconclusive"),
                                                   (0.91, 0.99, 0.9, "supported")])
def test_verdict(low, high, thr, expected):
    assert T.verdict(low, high, thr) == expected


@pytest.mark.parametrize("speed,lo,hi,expected", [
    (4.0, 0.85, 0.95, "supported"),
    (3.6, 0.85, 0.95, "supported"),      # within 10% of 4x
    (3.5, 0.85, 0.95, "contradicted"),   # not 4x
    (4.0, 0.50, 0.85, "contradicted"),   # the whole retention CI below 90%
    (4.0, 0.70, 0.95, "inconclusive"),   # fast, but the CI reaches below the 80% floor
])
def test_four_x_rule(speed, lo, hi, expected):
    assert H.speed_verdict(speed, lo, hi) == expected
    res = make(speedup=speed, retention=(0.9, lo, hi))
    row = H.speed_and_retention(res, "m1")[0]
    assert row["verdict"] == expected and row["value"] == speed and row["claim"].startswith(f"{K} of {L} layers")


@pytest.mark.parametrize("low,high,expected", [(-0.2, 0.3, "supported"), (0.6, 0.9, "contradicted"),
                                               (0.2, 0.8, "inconclusive")])
def test_moved_rule(low, high, expected):
    assert H.moved_verdict(low, high) == expected


# ----------------------------------------------------------------------------- rules on hand-built results

RISING, FALLING = np.linspace(0, 1, L) ** 3, np.linspace(1, 0, L) ** 3


@pytest.mark.parametrize("profile,expected", [(RISING, "supported"), (FALLING, "contradicted"),
                                              (np.tile([0.0, 1.0], L // 2), "inconclusive")])
def test_upper_by_importance(profile, expected):
    res = make(profiles={"m1": {"fused": profile, "ablation_loss": profile}})
    rows = H.upper_by_importance(res, "m1")
    assert [r["evidence"] for r in rows] == ["ablation_loss", "fused"]
    assert {r["verdict"] for r in rows} == {expected}


@pytest.mark.parametrize("last,expected", [(0.8, "supported"), (0.2, "contradicted"), (0.5, "inconclusive")])
def test_upper_by_selection(last, expected):
    pu = {("m1", A, "select:importance_greedy"): users(0.5, 0.2, seed=1),
          ("m1", A, "select:last_k"): users(last, 0.2, seed=2)}
    rows = H.upper_by_selection(res := make(per_user=pu), "m1")
    assert len(rows) == 1 and rows[0]["verdict"] == expected  # no reference_mapped measured: no row for it
    assert rows[0]["value"] == pytest.approx(res.values("m1", "select:last_k").mean() - res.values(
        "m1", "select:importance_greedy").mean())


@pytest.mark.parametrize("factor,expected", [(1.0, "supported"), (0.5, "contradicted"), (0.9, "inconclusive")])
def test_lower_droppable(factor, expected):
    full = users(0.6, 0.3, seed=3)
    noise = 0.0 if factor != 0.9 else 0.3
    drop = np.clip(full * factor + noise * np.random.default_rng(4).standard_normal(USERS), 0, 1)
    res = make(per_user={("m1", A, "full"): full, ("m1", A, "drop_lower_third"): drop})
    (row,) = H.lower_droppable(res, "m1")
    assert row["verdict"] == expected and row["value"] == pytest.approx(drop.mean() / full.mean())


@pytest.mark.parametrize("gain,expected", [(0.3, "supported"), (-0.3, "contradicted"), (0.0, "inconclusive")])
def test_adapters_help(gain, expected):
    drop = users(0.4, 0.2, seed=5)
    res = make(per_user={("m1", A, "adapters:drop"): drop,
                         ("m1", A, "adapters:stage1"): drop + gain + 0.05 * np.random.default_rng(6).standard_normal(USERS)})
    (row,) = H.adapters_help(res, "m1")
    assert row["verdict"] == expected and "stage1" in row["evidence"]


@pytest.mark.parametrize("b_profile,expected", [(RISING, "supported"), (FALLING, "contradicted")])
def test_generalizes(b_profile, expected):
    res = make(models=("m1", "m2"), profiles={"m1": {"fused": RISING}, "m2": {"fused": b_profile}})
    (row,) = H.generalizes(res)
    assert row["model"] == "m1 vs m2" and row["verdict"] == expected


@pytest.mark.parametrize("zs,expected", [(FALLING, "supported"), (RISING, "contradicted")])
def test_finetuning_moves(zs, expected):
    res = make(profiles={"m1": {"fused": RISING}}, zs_profiles={"m1": {"fused": zs}}, finetune=True)
    (row,) = H.finetuning_moves(res)
    assert row["verdict"] == expected and row["value"] == pytest.approx(1.0 if zs is RISING else -1.0)


def test_finetuning_moves_is_not_tested_when_validation_kept_the_zero_shot_weights():
    res = make(profiles={"m1": {"fused": RISING}}, zs_profiles={"m1": {"fused": FALLING}}, finetune=True)
    res.finetune = pd.DataFrame([{"model": "m1", "best_step": 0}])  # step 0: the zero-shot weights
    (row,) = H.finetuning_moves(res)
    assert row["verdict"] == "not tested" and "best step 0" in row["detail"]


def test_no_finetuning_no_shift_rows():
    assert T.importance_shift(make(profiles={"m1": {"fused": RISING}})).empty


# ----------------------------------------------------------------------------- tables


def test_headline_reads_the_bench_row_at_k():
    head = T.headline(make(speedup=3.0, retention=(0.8, 0.7, 0.9)))
    row = head.iloc[0]
    assert (row["L"], row["k"], row["compression"], row["speedup"], row["bound"]) == (L, K, L / K, 3.0, 4.2)
    assert (row["ndcg10_retention"], row["ndcg10_low"], row["ndcg10_high"]) == (0.8, 0.7, 0.9)
    res = make()
    res.bench = res.bench[~res.bench.adapters]  # not measured: NaN, not a number from another k
    assert np.isnan(T.headline(res)["speedup"].iloc[0])


def test_a_speedup_above_its_bound_is_flagged_not_reported():
    res = make(speedup=5.0, retention=(0.95, 0.92, 0.98))  # 5x against a FLOP bound of 4.2x
    res.bench["speedup_iqr"] = 0.1
    res.bench["above_bound"] = res.bench["speedup"] - res.bench["speedup_iqr"] / 2 > res.bench["bound"]
    head = T.headline(res)
    assert head["above_bound"].tolist() == [True] and head["speedup_iqr"].iloc[0] == 0.1
    row = H.speed_and_retention(res, res.models[0])[0]
    assert row["verdict"] == "inconclusive" and "above its time bound" in row["detail"]
    assert "ABOVE its time bound" in text.headline_sentences(head)
    assert "WARNING: k4+adapters measured above the time bound".replace("k4", f"k{K}") in text.bound_sentences(
        res.bench.assign(measured_over_bound=res.bench.speedup / res.bench.bound, device="cpu"))
    res.bench["above_bound"] = False  # within the bound, the same numbers give the 4x rule's verdict
    assert H.speed_and_retention(res, res.models[0])[0]["verdict"] == "supported"
    res.bench["above_bound"], res.bench["time_bound"] = True, 2.0  # even the bound is far from 4x
    assert H.speed_and_retention(res, res.models[0])[0]["verdict"] == "contradicted"


def test_thirds_table_shares():
    th = T.thirds_table(make(layers={"m1": [0, 1, 11]})).set_index("strategy")
    assert th.loc["importance_greedy", ["lower_share", "middle_share", "upper_share"]].tolist() == [2 / 3, 0, 1 / 3]
    assert th.loc["last_k", "upper_share"] == 1.0 and th.loc["last_k", "depths"] == [0.818, 0.909, 1.0]


def test_variants_table_retention_and_chance():
    full = users(0.5, 0.2, seed=7)
    res = make(per_user={("m1", A, "full"): full, ("m1", A, "select:importance_greedy"): full / 2})
    v = T.variants_table(res).set_index("variant")
    assert v.loc["full", "retention"] == 1.0 and v.loc["select:importance_greedy", "retention"] == pytest.approx(0.5)
    assert v.loc["chance", "ndcg@10"] == pytest.approx(res.chance()) and list(v.index)[-1] == "chance"


def test_cross_model_overlap():
    res = make(models=("m1", "m2"), profiles={"m1": {"fused": RISING}, "m2": {"fused": RISING}},
               layers={"m1": [0, 5, 11], "m2": [0, 5, 11]})
    row = T.cross_model(res).iloc[0]
    assert row["overlap:importance_greedy"] == 1.0 and row["overlap:last_k"] == 1.0 and row["spearman"] == 1.0


def test_cross_domain_ratio():
    own = users(0.6, 0.2, seed=8)
    pu = {("m1", B, "transfer:plain"): own * 0.5, ("m1", B, "transfer:adapters"): own,
          ("m1", B, "adapters:drop"): own, ("m1", B, "adapters:stage1"): own, ("m1", B, "full"): own,
          ("m1", B, "popularity"): users(0.3, seed=9)}
    cd = T.cross_domain(make(per_user=pu, transfer=True)).set_index("variant")
    assert cd.loc["adapters", "transfer_ratio"] == pytest.approx(1.0)
    assert cd.loc["plain", "transfer_ratio"] == pytest.approx(0.5)
    assert cd.loc["plain", "gap_over_popularity"] == pytest.approx((own * 0.5).mean() - 0.3)


def test_finetune_table_differences():
    zs, ft = users(0.3, 0.1, seed=10), users(0.6, 0.1, seed=11)
    res = make(per_user={("m1", A, "zeroshot"): zs, ("m1", A, "full"): ft, ("m1", A, "popularity"): zs},
               finetune=True)
    t = T.finetune_table(res)
    v = t[t.metric == "ndcg@10"].set_index("system")
    assert v.loc["fine-tuned - zero-shot", "mean"] == pytest.approx(ft.mean() - zs.mean())
    assert v.loc["fine-tuned - zero-shot", "ci_low"] > 0 and v.loc["zero-shot", "calibration"] == "none"
    assert set(t.metric) == set(T.QUALITY_METRICS) and set(t.dataset) == {A}


def test_hypotheses_table_runs_every_rule_in_order():
    full = users(0.6, 0.2, seed=12)
    pu = {("m1", A, "full"): full, ("m1", A, "drop_lower_third"): full, ("m1", A, "select:importance_greedy"): full,
          ("m1", A, "select:last_k"): full, ("m1", A, "adapters:drop"): full, ("m1", A, "adapters:stage1"): full}
    res = make(per_user=pu, profiles={"m1": {"fused": RISING, "ablation_loss": RISING}})
    h = H.hypotheses(res)
    assert list(h["claim"]) == [H.UPPER] * 3 + ["lower layers can be dropped",
                                                "non-contiguous selections work with adapters",
                                                f"{K} of {L} layers: 4x speed with ~90% NDCG retained"]
    assert list(h["evidence"][:2]) == ["ablation_loss", "fused"]
    # rising profiles; last_k = primary; nothing lost without the lower third; adapters = dropping; 4x and 90%
    assert list(h["verdict"]) == ["supported", "supported", "inconclusive", "supported", "inconclusive", "supported"]


def test_adapter_cost_rows_against_the_plans_claims():
    from types import SimpleNamespace

    summary = pd.Series({"params_pct_of_base": 0.22, "adapter_params": 296064, "exportable": False, "flops_pct": 0.55,
                         "prefill_time_added_pct": 7.5, "train_seconds": 10.0, "heal_seconds": 20.0})
    res = SimpleNamespace(summary=lambda m: summary, finetune_seconds=lambda m: 200.0)
    rows = pd.DataFrame(H.adapter_cost(res, "m1")).set_index("claim")
    assert rows.loc["adapters add <1% parameters", "verdict"] == "supported"
    assert rows.loc["adapters add <5% compute", "verdict"] == "contradicted"  # 7.5% measured
    assert rows.loc["adapter training takes 10-20% of the original's time", "value"] == pytest.approx(15.0)
    assert rows.loc["adapter training takes 10-20% of the original's time", "verdict"] == "supported"
    folded_summary = summary.copy()
    folded_summary["exportable"] = True
    folded = pd.DataFrame(H.adapter_cost(SimpleNamespace(summary=lambda m: folded_summary,
                                                         finetune_seconds=lambda m: None), "m1")).set_index("claim")
    assert folded.loc["adapters add <1% parameters", "value"] == 0.0
    assert folded.loc["adapter training takes 10-20% of the original's time", "verdict"] == "not tested"
