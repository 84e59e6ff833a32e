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
    assert (cfg.domain_a, cfg.domain_b) == ("ml-1m", "ml-100k") and cfg.cold_items > 0  # real data
    synthetic = StudyConfig.from_yaml(ROOT / "configs" / "synthetic.yaml")
    assert synthetic.domain_a.startswith("demo") and synthetic.name != cfg.name
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
    ({"cold_items": 0.7}, r"cold_items=0.7: give a fraction of the items in \(0, 0.5\]"),
    ({"sasrec": {"hiden": 8}}, "hiden"),
    ({"importance": {"fusion_weights": "learned"}}, "importance.fusion_weights: 'learned'"),
    ({"finetune": {"max_steps": 2, "models": {"tiny-qwen3": {"lr": 1e-3}}}}, "finetune.models.tiny-qwen3: not one"),
    ({"finetune": {"max_steps": 2, "models": {"tiny-gemma3": {"lrate": 1e-3}}}},
     "finetune.models.tiny-gemma3.lrate: unknown setting"),
    ({"finetune": {"max_steps": 2, "models": {"tiny-gemma3": {"objective": "pairwise"}}}}, "finetune: tiny-gemma3"),
    ({"importance": {"fusion_weights": "fit", "ablation": False}, "criterion": "fused"},
     "importance.fusion_weights: 'fit' is fitted against the loss ablation"),
])
def test_bad_config_is_rejected_before_any_work(tmp_path, over, msg, monkeypatch):
    import layerviz.study.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run", lambda study: calls.append(1))
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


def test_depth_helpers():
    from layerviz.study import depth

    assert depth.map_reference([18, 20, 24, 26, 27, 29, 30, 31], 32, 30) == [17, 19, 22, 24, 25, 27, 28, 29]
    assert depth.depth_overlap([0, 29], 30, [0, 17], 18) == 1.0
    assert depth.depth_overlap([0], 30, [17], 18) == 0.0
    grid = np.linspace(0, 1, 5)
    assert np.allclose(depth.profile_on_grid(np.array([0.0, 1.0, 2.0]), grid), [0, 0.5, 1, 1.5, 2])
    # 30 layers: depth i/29; 9/29 < 1/3 <= 10/29, 19/29 < 2/3 <= 20/29
    assert depth.thirds(range(30), 30) == {"lower": 10, "middle": 10, "upper": 10}
    assert [depth.region(i, 30) for i in (-1, 9, 10, 19, 20, 30)] == ["embedding", "lower", "middle", "middle",
                                                                       "upper", "norm"]
    assert depth.without_lower_third(4) == [1, 2, 3]  # depths 0, 1/3, 2/3, 1: 1/3 is the middle third
    assert depth.without_lower_third(30) == list(range(10, 30))


class Boom(RuntimeError):
    pass


def _all_files_readable(root: Path) -> None:
    assert not list(root.rglob("*.tmp")), "no temp files left behind"
    for p in root.rglob("*.json"):
        json.loads(p.read_text())
    for p in root.rglob("*.parquet"):
        pd.read_parquet(p)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A smoke study killed in its first adapter stage, then resumed: (stages done before, the study, result)."""
    tmp = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("LAYERVIZ_DEMO_DIR", str(tmp / "demo"))
    cfg = _tiny_config(tmp, models=["tiny-gemma3"], cross_domain_models=["tiny-gemma3"])
    import layerviz.study.stages as stages_mod

    real = stages_mod.run_adapt

    def dying(*a, **k):  # the first adapter stage dies half-way: after writing part of its output
        out = Path(k["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "partial.json").write_text('{"half": ')  # what a crash mid-write would leave
        raise Boom("killed mid-stage")

    mp.setattr(stages_mod, "run_adapt", dying)
    with pytest.raises(Boom):
        study.run_study(cfg, report=None)
    root = cfg.folder
    done = sorted(str(p.parent.relative_to(root)) for p in root.rglob("done.json"))
    (root / "tiny-gemma3/demo-electronics/adapters/adapt/partial.json").unlink()  # only our fake left this
    mp.setattr(stages_mod, "run_adapt", real)
    s = study.Study(cfg, report=None)
    res = study.run(s)
    yield done, s, res
    mp.undo()


def test_runner_resumes_after_a_kill_without_repeating_work(killed_and_resumed):
    done, s, res = killed_and_resumed
    root, a, b = s.cfg.folder, "tiny-gemma3/demo-electronics", "tiny-gemma3/demo-movies"
    assert done == sorted(["demo-electronics/baselines", "demo-movies/baselines", f"{a}/finetune", f"{a}/calibration-zeroshot", f"{a}/zeroshot", f"{b}/calibration-zeroshot",
                           f"{b}/zeroshot", f"{a}/importance-zeroshot", f"{a}/importance",
                           f"{a}/select-importance_greedy", f"{a}/select-last_k", f"{a}/evaluation"])
    assert not set(s.stages.ran) & set(done)  # nothing finished is recomputed
    assert {f"{a}/importance", f"{a}/finetune", f"{a}/zeroshot"} <= set(s.stages.skipped)
    assert f"{a}/adapters" in s.stages.ran
    _all_files_readable(root)
    assert (root / "cross_model.csv").exists()  # empty: one model
    for name in ("headline", "thirds", "cross_domain", "hypotheses", "variants", "finetune"):
        assert len(pd.read_csv(root / f"{name}.csv")) == len(pd.read_parquet(root / f"{name}.parquet")) > 0
    assert (root / "headline.tex").read_text().lstrip().startswith("\\begin{tabular}")
    s3 = study.Study(s.cfg, report=None)  # a third run does nothing but rebuild the tables
    again = study.run(s3)
    assert s3.stages.ran == [] and again.tables["hypotheses"].equals(res.tables["hypotheses"])


def test_the_plan_predicts_the_passes_every_stage_records(killed_and_resumed):
    """``layerviz run --plan``: exact counts equal what each stage recorded in done.json, bounds hold, and
    the stages planned are the stages run (the killed stage was recomputed whole on resuming)."""
    from layerviz.study import against_run, plan, recorded
    from layerviz.study.cost import CPU_TFLOPS

    _, s, _ = killed_and_resumed
    planned = plan(s.cfg)
    check = against_run(planned, recorded(s.cfg))
    assert check["holds"].all(), check[~check["holds"]]
    per_stage = check.groupby("stage")[["planned", "recorded"]].sum()
    assert (per_stage > 0).all().all(), per_stage
    exact = check[check["exact"]]
    assert len(exact) > 20 and {"prefix", "candidate", "calibration", "ablation", "backward", "train"} <= set(exact["kind"])
    assert (planned["flops"] > 0).any() and np.allclose(planned["seconds"], planned["flops"] / (CPU_TFLOPS * 1e12))


def test_a_stage_returns_the_same_shapes_computed_or_cached(killed_and_resumed):
    _, s, res = killed_and_resumed
    fresh = s.stages.root / "tiny-gemma3/demo-electronics/select-last_k"
    cached = study.Study(s.cfg, report=None).selection("tiny-gemma3", s.cfg.domain_a, "last_k")
    assert json.loads((fresh / "selection.json").read_text()) == cached["selection"]
    trace = res.traces.query("strategy == 'last_k' and dataset == @s.cfg.domain_a")
    assert [list(v) for v in trace["layers"]] == [list(v) for v in cached["trace"]["layers"]]


def test_result_frames_are_tidy_and_complete(killed_and_resumed):
    _, s, res = killed_and_resumed
    a, b = s.cfg.domain_a, s.cfg.domain_b
    pu = res.per_user
    assert not pu.duplicated(["model", "dataset", "variant", "user", "metric"]).any()
    va = set(pu[pu.dataset == a].variant)
    assert {"full", "popularity", "zeroshot", "select:importance_greedy", "drop_lower_third", "reference_mapped",
            "adapters:drop", "adapters:stage1"} <= va
    assert {"full", "zeroshot", "transfer:plain", "transfer:adapters", "adapters:drop"} <= set(pu[pu.dataset == b].variant)
    assert (pu.groupby(["dataset", "variant", "metric"]).size() == s.cfg.eval_users).all()
    assert set(res.importance.base) == {"fine-tuned", "zero-shot"} and set(res.importance.dataset) == {a, b}
    assert set(res.selections.dataset) == {a, b} and set(res.calibration.base) == {"fine-tuned", "zero-shot"}
    tuned = res.calibration[res.calibration.base == "fine-tuned"]  # scored as trained, not chosen
    assert (tuned.choice == "none").all() and tuned["valid_ndcg@10"].isna().all()
    assert res.calibration[res.calibration.base == "zero-shot"]["valid_ndcg@10"].notna().all()
    assert list(res.bench.model.unique()) == ["tiny-gemma3"]
    # the adapters stage reused the evaluation's scores of the same users: identical, not re-measured
    assert res.values("tiny-gemma3", "adapters:drop").equals(res.values("tiny-gemma3", "select:importance_greedy"))


def test_curves_and_variants_agree_with_the_selections(killed_and_resumed):
    """RQ2 curves and the variants table: consistent with the selections, one point re-measured independently."""
    from layerviz import arch

    _, s, res = killed_and_resumed
    m, cfg = "tiny-gemma3", s.cfg
    c = res.rows("curves", m)
    k = s.k(m)
    full = c[c.strategy == "full"]
    assert len(full) == 1 and full["k"].iloc[0] == 18
    last = c[c.strategy == "last_k"].sort_values("k")
    assert list(last["k"]) == list(range(1, k + 1))
    assert [list(v) for v in last["layers"]] == [list(range(18 - j, 18)) for j in range(1, k + 1)]
    trace = res.rows("traces", m).query("strategy == 'importance_greedy'")
    g = c[c.strategy == "importance_greedy"].sort_values("k")
    assert np.allclose(g["score"], trace["score"]) and list(g["layers"].iloc[-1]) == res.selection(m)["layers"]
    assert last["score"].iloc[-1] == pytest.approx(res.selection(m, "last_k")["score"])
    ev, _ = s.evaluator(m, cfg.domain_a, "valid", cfg.select_users)
    model, _ = s.model(m)
    with arch.keep_layers(model, [17]):
        assert float(np.mean(ev(model))) == pytest.approx(last["score"].iloc[0])
    var = res.tables["variants"].set_index(["model", "variant"]).loc[m]
    assert var.loc["full", "retention"] == pytest.approx(1.0)
    assert var.loc["full", "layers"] == list(range(18)) and all(type(i) is int for i in var.loc["full", "layers"])
    ratio = res.values(m, "reference_mapped").mean() / res.values(m, "full").mean()
    assert var.loc["reference_mapped", "retention"] == pytest.approx(ratio)


def test_cross_model_tables_with_two_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERVIZ_DEMO_DIR", str(tmp_path / "demo"))
    cfg = _tiny_config(tmp_path, cross_domain_models=[], finetune={})
    res = study.run(study.Study(cfg, report=None))
    cm = res.tables["cross_model"]
    assert len(cm) == 1 and cm["ci_low"].iloc[0] <= cm["spearman"].iloc[0] <= cm["ci_high"].iloc[0]
    th = res.tables["thirds"]
    assert len(th) == 4 and np.allclose(th[["lower_share", "middle_share", "upper_share"]].sum(1), 1)
    head = res.tables["headline"]
    assert list(head["model"]) == ["tiny-gemma3", "tiny-llama3"] and list(head["L"]) == [18, 32]
    assert "the pattern generalizes across models" in set(res.tables["hypotheses"]["claim"])
    assert "finetune" not in res.tables and set(res.importance.base) == {"zero-shot"}


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


def test_finetune_table_reads_the_zero_shot_side(killed_and_resumed):
    from layerviz.finetune import read_manifest

    _, s, res = killed_and_resumed
    m, cfg = "tiny-gemma3", s.cfg
    assert read_manifest(s.ft_folder(m))["summary"]["steps"] == 2
    assert s.label(m) != m and s.label(m, zeroshot=True) == m
    ft = res.tables["finetune"]
    assert set(ft["dataset"]) == {cfg.domain_a, cfg.domain_b}
    v = ft[(ft.metric == "ndcg@10") & (ft.dataset == cfg.domain_a)].set_index("system")
    assert v.loc["zero-shot", "mean"] == pytest.approx(res.values(m, "zeroshot").mean())
    assert v.loc["chance", "mean"] == pytest.approx(np.mean(1 / np.log2(np.arange(2, 12))))  # 1 + 9 candidates
    shift = study.importance_shift(res)
    assert set(shift["criterion"]) == {"fused", "ablation_loss"} and (shift["layers"] == 18).all()


def test_models_run_side_by_side_and_the_parent_only_benches(tmp_path):
    """jobs=2: each model's stages in a process of its own; the parent then finds them cached and runs only
    the benches. A GPU study refuses jobs > 1."""
    cfg = study.smoke_config(results_dir=str(tmp_path), models=["tiny-gemma3", "tiny-llama3"], jobs=2)
    s = study.Study(cfg, report=None)
    res = study.run(s)
    assert sorted(s.stages.ran) == ["tiny-gemma3/bench", "tiny-llama3/bench"]
    assert {"tiny-gemma3/demo-electronics/evaluation", "tiny-llama3/demo-electronics/adapters"} <= set(s.stages.skipped)
    assert set(res.per_user.model) == {"tiny-gemma3", "tiny-llama3"}
    with pytest.raises(ValueError, match="jobs"):
        study.smoke_config(results_dir=str(tmp_path), jobs=2, device="cuda")


def test_sasrec_slices_cold_start_and_findings(tmp_path, monkeypatch):
    """SASRec sits in every quality table, slices partition the test users, the cold-start stage compares every
    system on users whose positive never was a training item, and findings.md labels the data synthetic."""
    monkeypatch.setenv("LAYERVIZ_DEMO_DIR", str(tmp_path / "demo"))
    cfg = _tiny_config(tmp_path, models=["tiny-llama3"], cold_items=0.3, eval_users=20)
    res = study.run_study(cfg, report=None)
    ft = res.tables["finetune"]
    assert {"sasrec", "fine-tuned - sasrec"} <= set(ft["system"])
    assert "sasrec" in set(res.tables["variants"]["variant"])
    assert {"sasrec_b"} <= set(res.tables["cross_domain"].columns)
    sl = res.tables["slices"]
    a = sl[(sl.dataset == cfg.domain_a) & (sl.system == "sasrec")].set_index("slice")
    assert a.drop(index="all")["users"].sum() == a.loc["all", "users"] == 20  # every user in exactly one slice
    cold = res.tables["cold"]
    assert set(cold["system"]) == {"fine-tuned", "zero-shot", "compact (no adapters)", "compact (adapters)",
                                   "sasrec", "popularity"}
    prep = study.Study(cfg, report=None).prep(cfg.domain_a)
    scored = json.loads((cfg.folder / "tiny-llama3" / cfg.domain_a / "cold" / "meta.json").read_text())["users"]
    assert len(scored) == 20 and set(scored) <= set(prep.cold_users())
    assert not prep.events[prep.events.split == "train"]["item_id"].isin(prep.cold).any()
    from layerviz.study import against_run, plan, recorded

    check = against_run(plan(cfg), recorded(cfg))  # --plan counts the cold stage's passes too
    assert check["holds"].all() and (check.stage == "tiny-llama3/demo-electronics/cold").any(), check
    findings = (cfg.folder / "findings.md").read_text()
    assert "SYNTHETIC" in findings and "Item cold start" in findings and "sasrec" in findings
