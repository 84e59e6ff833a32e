import numpy as np
import pytest
import torch

from layerviz import arch, load_model
from layerviz.compression import importance as imp
from layerviz.data import CandidateConfig, build_candidates
from layerviz.data.prompts import ProbeSet, build_probes
from layerviz.errors import NonFiniteLossError
from layerviz.evaluate import TaskEvaluator


@pytest.fixture()
def fresh(request):
    """A fresh tiny model of each family (these tests change weights)."""
    return load_model(request.param, device="cpu")


FAMILIES = ["tiny-llama3", "tiny-qwen3", "tiny-gemma3"]


@pytest.mark.parametrize("fresh", FAMILIES, indirect=True)
@pytest.mark.parametrize("loss", ["likelihood", "yesno"])
def test_every_criterion_is_finite_for_every_layer(fresh, synthetic, loss):
    model, tok = fresh
    cal = build_probes(synthetic, tok, n=4, loss=loss)
    df = imp.layer_importance(model, cal)
    L = arch.num_layers(model)
    assert set(df.criterion) == set(imp.HOOK_CRITERIA) | {"fused"}
    assert (df.groupby("criterion").size() == L).all()
    assert np.isfinite(df.value).all() and df.normalized.between(0, 1).all()
    assert df.depth_fraction.min() == 0 and df.depth_fraction.max() == 1
    assert list(df[df.criterion == "fused"].layer_type) == arch.layer_types(model)
    fisher = df[df.criterion == "fisher_sum"].value
    assert (fisher > 0).all()  # every layer gets gradient
    mass = df[df.criterion == "attn_item_mass"].value
    assert mass.between(0, 1).all()


@pytest.mark.parametrize("fresh", FAMILIES, indirect=True)
def test_model_restored_no_hooks_no_grads(fresh, synthetic):
    model, tok = fresh
    model.requires_grad_(False)  # frozen, eval mode: handled and restored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = build_probes(synthetic, tok, n=3)
    imp.layer_importance(model, cal)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters() if hasattr(p, "_post_accumulate_grad_hooks"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fresh", ["tiny-llama3"], indirect=True)
def test_hooks_removed_after_nonfinite_loss(fresh, synthetic):
    model, tok = fresh
    cal = build_probes(synthetic, tok, n=3)
    layer = arch.layers(model)[7]
    with torch.no_grad():
        layer.mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="batch 0.*layer 7"):
        imp.layer_importance(model, cal)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert arch.num_layers(model) == 32


def test_empty_calibration_and_bad_names(tiny, synthetic):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="probe set is empty"):
        build_probes(synthetic, tok, n=0)
    with pytest.raises(ValueError, match="probe set is empty"):
        imp.layer_importance(model, ProbeSet([], "likelihood"))
    cal = build_probes(synthetic, tok, n=2)
    with pytest.raises(ValueError, match="unknown criteria"):
        imp.layer_importance(model, cal, criteria=["vibes"])
    with pytest.raises(ValueError, match="unknown or uncomputed"):
        imp.layer_importance(model, cal, criteria=["block_influence"], fusion_weights={"fisher_sum": 1})


@pytest.mark.parametrize("fresh", FAMILIES, indirect=True)
def test_planted_identity_layer(fresh, synthetic):
    """A layer whose output projections are zero is a no-op: BI ~ 0 and its ablation changes nothing."""
    model, tok = fresh
    planted = 4
    layer = arch.layers(model)[planted]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    cal = build_probes(synthetic, tok, n=4)
    cands = build_candidates(synthetic, CandidateConfig(negatives=9, users=4, split="valid"))
    ev = TaskEvaluator(synthetic, cands, tok, split="valid")
    params = {k: v.clone() for k, v in model.state_dict().items()}
    abl = imp.ablate(model, cal, ev, layers=[planted, planted + 1])
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())  # bit-identical
    assert np.abs(abl["ablation_loss"][:, planted]).max() < 1e-5
    assert np.abs(abl["ablation_ndcg"][:, planted]).max() == 0
    assert np.abs(abl["ablation_loss"][:, planted + 1]).max() > 1e-4
    df = imp.layer_importance(model, cal, criteria=["block_influence", "angular_distance"])
    bi = df[df.criterion == "block_influence"].set_index("layer").value
    assert bi[planted] < 1e-5 and bi.drop(planted).min() > 1e-3


def test_validity_and_fusion(synthetic):
    model, tok = load_model("tiny-gemma3")
    cal = build_probes(synthetic, tok, n=4)
    cands = build_candidates(synthetic, CandidateConfig(negatives=9, users=3, split="valid"))
    abl = imp.ablate(model, cal, TaskEvaluator(synthetic, cands, tok, split="valid"))
    df = imp.layer_importance(model, cal, ablation=abl, normalization="rank")
    assert {"ablation_loss", "ablation_ndcg"} <= set(df.criterion)
    per = dict(df.attrs["per_sample"], **abl)
    v = imp.validity(per, abl, imp.DEFAULT_FUSION, n_boot=20)
    assert set(v.ground_truth) == {"ablation_loss", "ablation_ndcg"}
    assert "fused" in set(v.criterion)
    ok = v.dropna()
    assert ((ok.ci_low <= ok.spearman + 1e-9) & (ok.spearman <= ok.ci_high + 1e-9)).all()
    ranks = imp._normalize(np.array([3.0, 1.0, 2.0]), 1, "rank")
    assert ranks.tolist() == [1.0, 0.0, 0.5]
    assert imp._normalize(np.array([3.0, 1.0, 2.0]), -1, "minmax").tolist() == [0.0, 1.0, 0.5]


def test_run_importance_caches(tmp_path, synthetic, monkeypatch):
    cfg = imp.ImportanceConfig(model="tiny-gemma3", samples=3, ablation_users=3, ablation_negatives=9,
                               history_len=5, results_dir=str(tmp_path))
    first = imp.run_importance(cfg, report=None)
    assert (first.folder / "manifest.json").exists() and len(first.validity)
    calls = []
    monkeypatch.setattr(imp, "hook_pass", lambda *a, **k: calls.append(1))
    second = imp.run_importance(cfg, report=None)
    assert not calls
    assert second.table.equals(first.table)


def test_choose_criterion_picks_the_most_valid_and_says_why_it_cannot():
    import pandas as pd

    from layerviz.compression.importance import choose_criterion

    v = pd.DataFrame([
        {"criterion": "fused", "ground_truth": "ablation_loss", "spearman": 0.52, "ci_low": 0.2, "ci_high": 0.8},
        {"criterion": "block_influence", "ground_truth": "ablation_loss", "spearman": 0.79, "ci_low": 0.6, "ci_high": 0.9},
        {"criterion": "norm_ratio", "ground_truth": "ablation_ndcg", "spearman": 0.95, "ci_low": 0.1, "ci_high": 0.99},
    ])
    got = choose_criterion(v)
    assert got["criterion"] == "block_influence" and got["spearman"] == 0.79 and got["truth"] == "ablation_loss"
    assert choose_criterion(v, truth="ablation_ndcg")["criterion"] == "norm_ratio"
    with pytest.raises(ValueError, match="needs the ablation_loss ground truth"):
        choose_criterion(pd.DataFrame())


def test_weight_grid_is_the_simplex():
    g = imp._weight_grid(3, 0.1)
    assert g.shape == (66, 3) and np.allclose(g.sum(1), 1) and (g >= 0).all()
    assert len({tuple(r) for r in g.round(6)}) == 66


def test_fit_fusion_recovers_a_planted_weighting():
    rng = np.random.default_rng(0)
    L, n = 12, 8
    per = {c: rng.random((n, L)) for c in imp.DEFAULT_FUSION}
    # the ground truth follows block influence alone, on every sample: the fit must put all weight there
    truth = per["block_influence"] * 3 + 0.01 * rng.random((n, L))
    w = imp.fit_fusion(per, truth)
    assert w == {"fisher_sum": 0.0, "block_influence": 1.0, "attn_item_mass": 0.0}
    # the equal weights (the default) correlate worse than the fit on the same data
    means = {c: v.mean(0) for c, v in per.items()}
    from scipy.stats import spearmanr
    fitted = spearmanr(imp.fuse(means, w), truth.mean(0)).statistic
    equal = spearmanr(imp.fuse(means, imp.DEFAULT_FUSION), truth.mean(0)).statistic
    assert fitted > equal
    with pytest.raises(ValueError, match="needs at least one"):
        imp.fit_fusion({"kurtosis": per["fisher_sum"]}, truth)


def test_fitted_fusion_validity_is_cross_fitted():
    """Pure noise: in-sample fitting would report a high Spearman, the cross-fit must not."""
    rng = np.random.default_rng(1)
    L, n = 16, 10
    per = {c: rng.random((n, L)) for c in imp.DEFAULT_FUSION}
    per["loss"] = rng.random(n)
    abl = {"ablation_loss": rng.random((n, L))}
    v = imp.validity(per, abl, "fit", n_boot=30).set_index("criterion")
    in_sample = imp._fit_on({c: per[c].mean(0) for c in imp.DEFAULT_FUSION}, abl["ablation_loss"].mean(0),
                            list(imp.DEFAULT_FUSION), "minmax", imp.FIT_STEP)[1]
    assert v.loc["fused", "spearman"] < in_sample - 0.2
    assert v.loc["fused", "ci_low"] <= v.loc["fused", "spearman"] <= v.loc["fused", "ci_high"]
    with pytest.raises(ValueError, match="at least 4"):
        imp.validity({c: a[:3] for c, a in per.items()}, {"ablation_loss": abl["ablation_loss"][:3]}, "fit")


def test_run_importance_fit_fusion(tmp_path):
    cfg = imp.ImportanceConfig(model="tiny-gemma3", samples=4, ablation_users=0, history_len=5,
                               fusion_weights="fit", results_dir=str(tmp_path))
    res = imp.run_importance(cfg, report=None)
    assert set(res.fusion_weights) == set(imp.DEFAULT_FUSION) and abs(sum(res.fusion_weights.values()) - 1) < 1e-9
    fused = res.table[res.table.criterion == "fused"].sort_values("layer")["value"].to_numpy()
    per = {c: res.per_sample[c].mean(0) for c in imp.DEFAULT_FUSION}
    assert np.allclose(fused, imp.fuse(per, res.fusion_weights))
    assert imp.load_importance(res.folder).fusion_weights == res.fusion_weights
    with pytest.raises(ValueError, match="keep ablation on"):
        imp.run_importance(imp.ImportanceConfig(model="tiny-gemma3", fusion_weights="fit", ablation=False,
                                                results_dir=str(tmp_path)), report=None)


@pytest.mark.parametrize("fresh", FAMILIES, indirect=True)
def test_loss_ablation_resumes_from_the_full_pass_with_the_same_numbers(fresh, synthetic):
    """Skipping layer i by resuming at i + 1 from resid_pre.i equals running the model without layer i."""
    model, tok = fresh
    cal = build_probes(synthetic, tok, n=5)
    n = arch.num_layers(model)
    todo = [0, 1, n // 2, n - 2, n - 1]
    base, out = imp.loss_ablation(model, cal, todo, batch_size=2)
    np.testing.assert_allclose(base, imp.probe_losses(model, cal, batch_size=2), atol=1e-6)
    for i in range(n):
        if i in todo:
            with arch.skip_layers(model, [i]):
                plain = imp.probe_losses(model, cal, batch_size=2) - base
            np.testing.assert_allclose(out["ablation_loss"][:, i], plain, atol=1e-5, err_msg=f"layer {i}")
        else:
            assert np.isnan(out["ablation_loss"][:, i]).all()
    with pytest.raises(ValueError, match="resume_at needs 0 < start"):
        with arch.resume_at(model, n, torch.zeros(1)):
            pass
    assert arch.num_layers(model) == n  # restored
