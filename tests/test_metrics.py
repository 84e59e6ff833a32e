import numpy as np
import pytest
from ranx import Qrels, Run, evaluate

from layerviz import metrics


def _ranx(scores, pos_index):
    qrels = Qrels({f"u{u}": {f"d{pos_index[u]}": 1} for u in range(len(scores))})
    run = Run({f"u{u}": {f"d{j}": float(s) for j, s in enumerate(row)} for u, row in enumerate(scores)})
    return evaluate(qrels, run, ["ndcg@5", "ndcg@10", "mrr", "precision@10", "hit_rate@10"])


@pytest.mark.parametrize("n_candidates", [20, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_ranx_on_random_runs(n_candidates, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(300, n_candidates))  # continuous: no ties
    pos = rng.integers(0, n_candidates, size=300)
    ours = metrics.per_user(metrics.pessimistic_ranks(scores, pos)).mean()
    ref = _ranx(scores, pos)
    assert ours["ndcg@5"] == pytest.approx(ref["ndcg@5"], abs=1e-9)
    assert ours["ndcg@10"] == pytest.approx(ref["ndcg@10"], abs=1e-9)
    assert ours["mrr"] == pytest.approx(ref["mrr"], abs=1e-9)
    assert ours["precision@10"] == pytest.approx(ref["precision@10"], abs=1e-9)
    assert ours["hr@10"] == pytest.approx(ref["hit_rate@10"], abs=1e-9)


def test_ties_count_against_the_positive():
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    assert metrics.pessimistic_ranks(scores, np.array([0, 1, 0])).tolist() == [4, 2, 1]


def test_metric_definitions_by_hand():
    m = metrics.per_user(np.array([1, 3, 11]))
    assert m["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert m["mrr"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 11])
    assert m["hr@5"].tolist() == [1.0, 1.0, 0.0]
    assert m["precision@10"].tolist() == pytest.approx([0.1, 0.1, 0.0])


@pytest.mark.parametrize("n,expected", [
    (20, {"hr@10": 0.50, "ndcg@5": 0.147, "ndcg@10": 0.227, "mrr": 0.180, "precision@10": 0.05}),
    (100, {"hr@10": 0.10, "ndcg@5": 0.0295, "ndcg@10": 0.0454, "mrr": 0.0519, "precision@10": 0.01}),
])
def test_chance_levels_match_the_published_table(n, expected):
    got = metrics.chance(n)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=6e-4), k


def test_bootstrap_ci_and_paired_comparison():
    rng = np.random.default_rng(0)
    v = rng.random(500)
    mean, lo, hi = metrics.bootstrap_ci(v, seed=1)
    assert lo < mean < hi and mean == pytest.approx(v.mean())
    assert metrics.bootstrap_ci(v, seed=1) == (mean, lo, hi)  # seeded
    better = v + 0.1
    cmp = metrics.paired_comparison(better, v)
    assert cmp["diff"] == pytest.approx(0.1) and cmp["p_value"] < 0.01 and cmp["ci_low"] > 0
    same = metrics.paired_comparison(v, v)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="same users"):
        metrics.paired_comparison(v, v[:10])
    s = metrics.summarize(metrics.per_user(np.array([1, 2, 3])))
    assert set(s.columns) == {"metric", "mean", "ci_low", "ci_high", "n"}


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        metrics.pessimistic_ranks(np.array([[np.nan, 1.0]]), np.array([0]))


def test_bootstrap_ci_is_scipys_percentile_bootstrap():
    """The hand-written resampling equals scipy.stats.bootstrap (same draws) up to summation order."""
    from scipy.stats import bootstrap

    from layerviz.metrics import bootstrap_ci

    v = np.random.default_rng(3).random(37)
    mean, lo, hi = bootstrap_ci(v, n_boot=500, seed=7)
    ref = bootstrap((v,), np.mean, n_resamples=500, method="percentile", random_state=np.random.default_rng(7))
    assert mean == v.mean()
    assert lo == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=1e-12)
