import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerviz import study
from layerviz.study import StudyConfig

ROOT = Path(__file__).resolve().parents[1]


def _tiny_config(tmp_path, **over) -> StudyConfig:
    return study.smoke_config(results_dir=str(tmp_path / "results"), name="t", **over)


def test_shipped_configs_parse():
    cfg = StudyConfig.from_yaml(ROOT / "configs" / "demo.yaml")
    assert cfg.models == ["smollm2-135m", "gemma3-270m"] and cfg.device == "cpu"
    # the GPU config names data the user must provide: refused here, naming the key, before any work
    with pytest.raises(ValueError, match="domain_a: 'data/raw/amazon2023-electronics' is neither"):
        StudyConfig.from_yaml(ROOT / "configs" / "paper-gpu.yaml")


@pytest.mark.parametrize("over,msg", [
    ({"modles": ["x"]}, "unknown key 'modles'"),
    ({"models": []}, "models: give a non-empty list"),
    ({"models": ["nope"]}, "models: 'nope' is not a preset"),
    ({"strategies": ["magic"]}, "strategies"),
    ({"primary": "top_k"}, "primary: 'top_k' must be one of strategies"),
    ({"k_fraction": 1.5}, "k_fraction"),
    ({"eval_users": 0}, "eval_users: 0 must be a positive integer"),
    ({"importance": {"sampels": 3}}, "importance.sampels: unknown setting"),
    ({"adapters": {"policy": {"force": "conv"}}}, "unknown adapter type 'conv'"),
    ({"domain_b": "/no/such/data"}, "domain_b"),
    ({"reference": "gpt-5"}, "reference"),
    ({"importance": {"fusion_weights": "learned"}}, "importance.fusion_weights: 'learned'"),
    ({"finetune": {"max_steps": 2, "models": {"tiny-qwen3": {"lr": 1e-3}}}}, "finetune.models.tiny-qwen3: not one"),
    ({"finetune": {"max_steps": 2, "models": {"tiny-gemma3": {"lrate": 1e-3}}}},
     "finetune.models.tiny-gemma3.lrate: unknown setting"),
    ({"finetune": {"max_steps": 2, "models": {"tiny-gemma3": {"objective": "pairwise"}}}}, "finetune: tiny-gemma3"),
    ({"importance": {"fusion_weights": "fit", "ablation": False}, "criterion": "fused"},
     "importance.fusion_weights: 'fit' is fitted against the loss ablation"),
])
def test_bad_config_is_rejected_before_any_work(tmp_path, over, msg, monkeypatch):
    calls = []
    monkeypatch.setattr(study.Study, "run", lambda self: calls.append(1))
    with pytest.raises(ValueError, match=msg):
        study.run_study(_tiny_config(tmp_path, **over))
    assert not calls and not (tmp_path / "results").exists()


def test_bad_yaml_file_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models: [smollm2-135m]\nseeed: 1\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown key 'seeed'"):
        StudyConfig.from_yaml(p)
    with pytest.raises(FileNotFoundError, match="configs/demo.yaml"):
        StudyConfig.from_yaml(tmp_path / "missing.yaml")


def test_analysis_helpers():
    assert study.map_reference([18, 20, 24, 26, 27, 29, 30, 31], 32, 30) == [17, 19, 22, 24, 25, 27, 28, 29]
    assert study.depth_overlap([0, 29], 30, [0, 17], 18) == 1.0
    assert study.depth_overlap([0], 30, [17], 18) == 0.0
    grid = np.linspace(0, 1, 5)
    assert np.allclose(study.profile_on_grid(np.array([0.0, 1.0, 2.0]), grid), [0, 0.5, 1, 1.5, 2])
    assert study.verdict(0.1, 0.3) == "supported" and study.verdict(-0.3, -0.1) == "contradicted"
    assert study.verdict(-0.1, 0.1) == "inconclusive" and study.verdict(0.85, 0.95, 0.9) == "inconclusive"


class Boom(RuntimeError):
    pass


def _all_files_readable(root: Path) -> None:
    assert not list(root.rglob("*.tmp")), "no temp files left behind"
    for p in root.rglob("*.json"):
        json.loads(p.read_text())
    for p in root.rglob("*.parquet"):
        pd.read_parquet(p)


def test_runner_resumes_after_a_kill_without_repeating_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERVIZ_DEMO_DIR", str(tmp_path / "demo"))
    cfg = _tiny_config(tmp_path, models=["tiny-gemma3"], cross_domain_models=["tiny-gemma3"])
    import layerviz.compact as compact_mod

    real = compact_mod.run_adapt
    calls = {"adapt": 0}

    def dying(*a, **k):  # the first adapter stage dies half-way: after writing part of its output
        calls["adapt"] += 1
        out = Path(k["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "partial.json").write_text('{"half": ')  # what a crash mid-write would leave
        raise Boom("killed mid-stage")

    monkeypatch.setattr(compact_mod, "run_adapt", dying)
    with pytest.raises(Boom):
        study.run_study(cfg, report=None)
    root = cfg.folder
    done = sorted(str(p.parent.relative_to(root)) for p in root.rglob("done.json"))
    a, b = "tiny-gemma3/demo-electronics", "tiny-gemma3/demo-movies"
    assert done == sorted([f"{a}/finetune", f"{a}/calibration-zeroshot", f"{a}/zeroshot", f"{b}/calibration-zeroshot",
                           f"{b}/zeroshot", f"{a}/importance-zeroshot", f"{a}/importance", f"{a}/calibration",
                           f"{a}/select-importance_greedy", f"{a}/select-last_k"])
    assert not (root / "tiny-gemma3/demo-electronics/adapters/done.json").exists()
    (root / "tiny-gemma3/demo-electronics/adapters/adapt/partial.json").unlink()  # only our fake left this

    monkeypatch.setattr(compact_mod, "run_adapt", real)
    s = study.Study(cfg, report=None)
    out = s.run()
    assert not set(s.stages.ran) & set(done)  # nothing finished is recomputed
    assert {f"{a}/importance", f"{a}/finetune", f"{a}/zeroshot"} <= set(s.stages.skipped)
    assert "tiny-gemma3/demo-electronics/adapters" in s.stages.ran
    _all_files_readable(root)
    for name in ("headline", "thirds", "cross_model", "cross_domain", "hypotheses"):
        assert (root / f"{name}.csv").exists()
    assert (root / "headline.tex").read_text().lstrip().startswith("\\begin{tabular}")
    h = out["tables"]["hypotheses"]
    assert set(h["verdict"]) <= {"supported", "contradicted", "inconclusive"}
    assert {"upper layers are the most important", "lower layers can be dropped",
            "non-contiguous selections work with adapters"} <= set(h["claim"])
    cd = out["tables"]["cross_domain"]
    assert set(cd["variant"]) == {"adapters", "plain"} and np.isfinite(cd["transfer_ratio"]).all()
    _check_curves_and_variants(s, cfg, out)
    _check_finetune_tables(s, cfg, out)
    # a third run does nothing but rebuild the tables
    s3 = study.Study(cfg, report=None)
    s3.run()
    assert s3.stages.ran == []


def test_cross_model_tables_with_two_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERVIZ_DEMO_DIR", str(tmp_path / "demo"))
    cfg = _tiny_config(tmp_path, cross_domain_models=[])
    out = study.Study(cfg, report=None).run()
    cm = out["tables"]["cross_model"]
    assert len(cm) == 1 and -1 <= cm["spearman"].iloc[0] <= 1
    assert cm["ci_low"].iloc[0] <= cm["spearman"].iloc[0] <= cm["ci_high"].iloc[0]
    th = out["tables"]["thirds"]
    assert len(th) == 4 and np.allclose(th[["lower_share", "middle_share", "upper_share"]].sum(1), 1)
    head = out["tables"]["headline"]
    assert list(head["model"]) == ["tiny-gemma3", "tiny-llama3"] and list(head["L"]) == [18, 32]
    assert "the pattern generalizes across models" in set(out["tables"]["hypotheses"]["claim"])


def _check_curves_and_variants(s, cfg, out):
    """RQ2 curves and the variants table: consistent with the selections, one point re-measured independently."""
    from layerviz import arch
    from layerviz.metrics import metric_names

    r = out["models"]["tiny-gemma3"]
    c = r["curves"]["curves"]
    k = s.k("tiny-gemma3")
    full = c[c.strategy == "full"]
    assert len(full) == 1 and full["k"].iloc[0] == 18
    last = c[c.strategy == "last_k"].sort_values("k")
    assert list(last["k"]) == list(range(1, k + 1))
    assert [list(v) for v in last["layers"]] == [list(range(18 - j, 18)) for j in range(1, k + 1)]
    greedy = r["selections"]["importance_greedy"]
    g = c[c.strategy == "importance_greedy"].sort_values("k")
    assert np.allclose(g["score"], greedy["trace"]["score"]) and list(g["layers"].iloc[-1]) == greedy["selection"]["layers"]
    assert last["score"].iloc[-1] == pytest.approx(r["selections"]["last_k"]["selection"]["score"])
    ev, _ = s.evaluator("tiny-gemma3", cfg.domain_a, "valid", cfg.select_users)
    model, _ = s.model("tiny-gemma3")
    with arch.keep_layers(model, [17]):
        assert float(np.mean(ev(model))) == pytest.approx(last["score"].iloc[0])
    pu = r["evaluation"]["per_user"]
    for name in ("full", "popularity", "select:importance_greedy", "reference_mapped", "drop_lower_third"):
        assert {f"{name}:{m}" for m in metric_names()} <= set(pu.columns)
    assert np.allclose(pu["full:ndcg@10"], r["adapters"]["per_user"]["full:ndcg@10"])  # same test users
    assert np.allclose(pu["select:importance_greedy:ndcg@10"], r["adapters"]["per_user"]["drop:ndcg@10"])
    var = out["tables"]["variants"].set_index(["model", "variant"]).loc["tiny-gemma3"]
    assert var.loc["full", "retention"] == pytest.approx(1.0)
    assert var.loc["full", "layers"] == list(range(18)) and all(type(i) is int for i in var.loc["full", "layers"])
    assert var.loc["chance", "ndcg@10"] == pytest.approx(r["evaluation"]["chance"]["ndcg@10"])
    assert var.loc["popularity", "ndcg@10"] == pytest.approx(pu["popularity:ndcg@10"].mean())
    ratio = pu["reference_mapped:ndcg@10"].mean() / pu["full:ndcg@10"].mean()
    assert var.loc["reference_mapped", "retention"] == pytest.approx(ratio)
    assert var.loc["reference_mapped", "retention_low"] <= ratio <= var.loc["reference_mapped", "retention_high"]


def _check_finetune_tables(s, cfg, out):
    """The fine-tuned recommender is what the stages analyse; the zero-shot model is measured alongside."""
    from layerviz.finetune import read_manifest

    r = out["models"]["tiny-gemma3"]
    assert read_manifest(s.ft_folder("tiny-gemma3"))["summary"]["steps"] == 2
    assert s.label("tiny-gemma3") != "tiny-gemma3" and s.label("tiny-gemma3", zeroshot=True) == "tiny-gemma3"
    ft = out["tables"]["finetune"]
    assert set(ft["dataset"]) == {cfg.domain_a, cfg.domain_b}
    v = ft[(ft.metric == "ndcg@10") & (ft.dataset == cfg.domain_a)].set_index("system")
    zs, tuned = r["zeroshot"][cfg.domain_a]["per_user"], r["evaluation"]["per_user"]
    assert v.loc["zero-shot", "mean"] == pytest.approx(zs["zeroshot:ndcg@10"].mean())
    assert v.loc["fine-tuned", "mean"] == pytest.approx(tuned["full:ndcg@10"].mean())
    assert v.loc["fine-tuned - zero-shot", "mean"] == pytest.approx(v.loc["fine-tuned", "mean"] - v.loc["zero-shot", "mean"])
    assert v.loc["chance", "mean"] == pytest.approx(np.mean(1 / np.log2(np.arange(2, 12))))  # 1 + 9 candidates
    assert v.loc["zero-shot", "calibration"] in ("none", "pmi")
    shift = study.importance_shift(out, cfg)
    assert set(shift["criterion"]) == {"fused", "ablation_loss"} and (shift["layers"] == 18).all()
    h = out["tables"]["hypotheses"]
    assert len(h[h.claim == "fine-tuning moves which layers matter"]) == 2


def test_reused_finetuned_folder_must_match_its_base(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERVIZ_DEMO_DIR", str(tmp_path / "demo"))
    cfg = _tiny_config(tmp_path, models=["tiny-llama3"], cross_domain_models=[])
    s = study.Study(cfg, report=None)
    s.finetune("tiny-llama3")
    man = s.ft_folder("tiny-llama3") / "layerviz_finetune.json"
    doc = json.loads(man.read_text())
    doc["base_fingerprint"] = "0123456789abcdef"
    man.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="fine-tuned from another base model"):
        study.Study(cfg, report=None).model("tiny-llama3")


@pytest.mark.parametrize("verdict_case,lo,hi,expected", [
    ("moved", -0.2, 0.3, "supported"), ("kept", 0.6, 0.9, "contradicted"), ("unclear", 0.2, 0.8, "inconclusive")])
def test_finetune_shift_verdicts(verdict_case, lo, hi, expected, monkeypatch):
    shift = pd.DataFrame([{"model": "m", "criterion": "fused", "spearman": (lo + hi) / 2, "ci_low": lo, "ci_high": hi,
                           "layers": 30}])
    monkeypatch.setattr(study, "importance_shift", lambda out, cfg: shift)
    monkeypatch.setattr(study, "cross_model", lambda out, cfg: pd.DataFrame())
    h = study.hypotheses({"models": {}}, study.smoke_config())
    assert list(h["verdict"]) == [expected]
    assert verdict_case in study.shift_sentences(shift)[0] or expected == "inconclusive"


def test_per_model_finetune_settings(tmp_path):
    base = study.smoke_config().finetune
    cfg = _tiny_config(tmp_path, finetune={**base, "models": {"tiny-llama3": {"lr": 5e-3}}})
    s = study.Study(cfg, report=None)
    assert s.ft_config("tiny-llama3").lr == 5e-3
    assert s.ft_config("tiny-gemma3").lr == base.get("lr")
    shared = study.Study(_tiny_config(tmp_path, finetune=base), report=None)
    # the override changes that model's cache label only
    assert s.label("tiny-llama3") != shared.label("tiny-llama3")
    assert s.label("tiny-gemma3") == shared.label("tiny-gemma3")
    assert "tiny-llama3: lr 0.005" in study.describe_base(cfg)
