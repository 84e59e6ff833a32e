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
    assert (cfg.dataset, cfg.transfer_dataset) == ("ml-1m", "ml-100k") and cfg.cold_items > 0  # real data
    synthetic = StudyConfig.from_yaml(ROOT / "configs" / "synthetic.yaml")
    assert synthetic.dataset.startswith("synthetic") and synthetic.name != cfg.name
    # the GPU config names data the user must provide: refused here, naming the key, before any work
    with pytest.raises(ValueError, match="dataset: 'data/raw/amazon2023-electronics' is neither"):
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
    ({"transfer_dataset": "/no/such/data"}, "transfer_dataset"),
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
    from layerviz import depth

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


def _all_files_readable(root: Path) -> None:
    assert not list(root.rglob("*.tmp")), "no temp files left behind"
    for p in root.rglob("*.json"):
        json.loads(p.read_text())
    for p in root.rglob("*.parquet"):
        pd.read_parquet(p)


def test_runner_resumes_after_a_kill_without_repeating_work(smoke_run):
    done, s, res = smoke_run
    root, a, b = s.cfg.folder, "tiny-gemma3/synthetic-electronics", "tiny-gemma3/synthetic-movies"
    assert done == sorted(["synthetic-electronics/baselines", "synthetic-movies/baselines", f"{a}/finetune", f"{a}/calibration-zeroshot", f"{a}/zeroshot", f"{b}/calibration-zeroshot",
                           f"{b}/zeroshot", f"{a}/importance-zeroshot", f"{a}/importance",
                           f"{a}/select-importance_greedy", f"{a}/select-last_k", f"{a}/evaluation"])
    assert not set(s.stages.ran) & set(done)  # nothing finished is recomputed
    assert {f"{a}/importance", f"{a}/finetune", f"{a}/zeroshot"} <= set(s.stages.skipped)
    assert f"{a}/adapters" in s.stages.ran
    _all_files_readable(root)
    assert len(pd.read_csv(root / "cross_model.csv")) == 1  # the two models against each other
    for name in ("headline", "thirds", "cross_domain", "hypotheses", "variants", "finetune"):
        assert len(pd.read_csv(root / f"{name}.csv")) == len(pd.read_parquet(root / f"{name}.parquet")) > 0
    assert (root / "headline.tex").read_text().lstrip().startswith("\\begin{tabular}")
    s3 = study.Study(s.cfg, report=None)  # a third run does nothing but rebuild the tables
    again = study.run(s3)
    assert s3.stages.ran == [] and again.tables["hypotheses"].equals(res.tables["hypotheses"])


def test_the_plan_predicts_the_passes_every_stage_records(smoke_run):
    """``layerviz run --plan``: exact counts equal what each stage recorded in done.json, bounds hold, and
    the stages planned are the stages run (the killed stage was recomputed whole on resuming)."""
    from layerviz.study import against_run, plan, recorded_passes
    from layerviz.study.cost import CPU_TFLOPS

    _, s, _ = smoke_run
    planned = plan(s.cfg)
    check = against_run(planned, recorded_passes(s.cfg))
    assert check["holds"].all(), check[~check["holds"]]
    per_stage = check.groupby("stage")[["planned", "recorded"]].sum()
    assert (per_stage > 0).all().all(), per_stage
    assert check.stage.str.endswith("/cold").any() and check.stage.str.endswith("/transfer").any()
    exact = check[check["exact"]]
    assert len(exact) > 20 and {"prefix", "candidate", "probe", "ablation", "backward", "train"} <= set(exact["kind"])
    assert (planned["flops"] > 0).any() and np.allclose(planned["seconds"], planned["flops"] / (CPU_TFLOPS * 1e12))


def test_a_stage_returns_the_same_shapes_computed_or_cached(smoke_run):
    _, s, res = smoke_run
    fresh = s.stages.root / "tiny-gemma3/synthetic-electronics/select-last_k"
    cached = study.Study(s.cfg, report=None).selection("tiny-gemma3", s.cfg.dataset, "last_k")
    assert json.loads((fresh / "selection.json").read_text()) == cached["selection"]
    trace = res.traces.query("strategy == 'last_k' and dataset == @s.cfg.dataset and model == 'tiny-gemma3'")
    assert [list(v) for v in trace["layers"]] == [list(v) for v in cached["trace"]["layers"]]


def test_result_frames_are_tidy_and_complete(smoke_run):
    _, s, res = smoke_run
    a, b = s.cfg.dataset, s.cfg.transfer_dataset
    pu = res.per_user
    assert not pu.duplicated(["model", "dataset", "variant", "user", "metric"]).any()
    va = set(pu[pu.dataset == a].variant)
    assert {"full", "popularity", "zeroshot", "select:importance_greedy", "drop_lower_third", "reference_mapped",
            "adapters:drop", "adapters:stage1"} <= va
    assert {"full", "zeroshot", "transfer:plain", "transfer:adapters", "adapters:drop"} <= set(pu[pu.dataset == b].variant)
    assert (pu.groupby(["model", "dataset", "variant", "metric"]).size() == s.cfg.eval_users).all()
    assert set(res.importance.base) == {"fine-tuned", "zero-shot"} and set(res.importance.dataset) == {a, b}
    assert set(res.selections.dataset) == {a, b} and set(res.calibration.base) == {"fine-tuned", "zero-shot"}
    tuned = res.calibration[res.calibration.base == "fine-tuned"]  # scored as trained, not chosen
    assert (tuned.choice == "none").all() and tuned["valid_ndcg@10"].isna().all()
    assert res.calibration[res.calibration.base == "zero-shot"]["valid_ndcg@10"].notna().all()
    assert list(res.bench.model.unique()) == ["tiny-gemma3", "tiny-llama3"]
    # the adapters stage reused the evaluation's scores of the same users: identical, not re-measured
    assert res.values("tiny-gemma3", "adapters:drop").equals(res.values("tiny-gemma3", "select:importance_greedy"))


def test_curves_and_variants_agree_with_the_selections(smoke_run):
    """RQ2 curves and the variants table: consistent with the selections, one point re-measured independently."""
    from layerviz import arch

    _, s, res = smoke_run
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
    ev, _ = s.evaluator(m, cfg.dataset, "valid", cfg.select_users)
    model, _ = s.model(m)
    with arch.keep_layers(model, [17]):
        assert float(np.mean(ev(model))) == pytest.approx(last["score"].iloc[0])
    var = res.tables["variants"].set_index(["model", "variant"]).loc[m]
    assert var.loc["full", "retention"] == pytest.approx(1.0)
    assert var.loc["full", "layers"] == list(range(18)) and all(type(i) is int for i in var.loc["full", "layers"])
    ratio = res.values(m, "reference_mapped").mean() / res.values(m, "full").mean()
    assert var.loc["reference_mapped", "retention"] == pytest.approx(ratio)


@pytest.mark.study
def test_a_zero_shot_study_of_two_models_runs_them_side_by_side(tmp_path):
    """jobs=2: each model's stages in a process of its own; the parent then finds them cached and runs only the
    benches. Without fine-tuning the study is zero-shot, and two models give the cross-model tables. A GPU study
    refuses jobs > 1."""
    cfg = _tiny_config(tmp_path, cross_domain_models=[], finetune={}, jobs=2)
    s = study.Study(cfg, report=None)
    res = study.run(s)
    assert sorted(s.stages.ran) == ["tiny-gemma3/bench", "tiny-llama3/bench"]
    assert {"tiny-gemma3/synthetic-electronics/evaluation", "tiny-llama3/synthetic-electronics/adapters"} <= set(
        s.stages.skipped)
    assert set(res.per_user.model) == {"tiny-gemma3", "tiny-llama3"}
    cm = res.tables["cross_model"]
    assert len(cm) == 1 and cm["ci_low"].iloc[0] <= cm["spearman"].iloc[0] <= cm["ci_high"].iloc[0]
    th = res.tables["thirds"]
    assert len(th) == 4 and np.allclose(th[["lower_share", "middle_share", "upper_share"]].sum(1), 1)
    head = res.tables["headline"]
    assert list(head["model"]) == ["tiny-gemma3", "tiny-llama3"] and list(head["L"]) == [18, 32]
    assert "the pattern generalizes across models" in set(res.tables["hypotheses"]["claim"])
    assert "finetune" not in res.tables and set(res.importance.base) == {"zero-shot"}
    with pytest.raises(ValueError, match="jobs"):
        study.smoke_config(results_dir=str(tmp_path), jobs=2, device="cuda")


@pytest.mark.study
def test_reused_finetuned_folder_must_match_its_base(tmp_path, monkeypatch):
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


def test_finetune_table_reads_the_zero_shot_side(smoke_run):
    from layerviz.models import read_finetune_manifest

    _, s, res = smoke_run
    m, cfg = "tiny-gemma3", s.cfg
    assert read_finetune_manifest(s.ft_folder(m))["summary"]["steps"] == 2
    assert s.label(m) != m and s.label(m, zeroshot=True) == m
    ft = res.tables["finetune"]
    assert set(ft["dataset"]) == {cfg.dataset, cfg.transfer_dataset}
    v = ft[(ft.metric == "ndcg@10") & (ft.dataset == cfg.dataset) & (ft.model == m)].set_index("system")
    assert v.loc["zero-shot", "mean"] == pytest.approx(res.values(m, "zeroshot").mean())
    assert v.loc["chance", "mean"] == pytest.approx(np.mean(1 / np.log2(np.arange(2, 12))))  # 1 + 9 candidates
    shift = study.importance_shift(res)
    assert set(shift["criterion"]) == {"fused", "ablation_loss"}
    assert shift.groupby("model")["layers"].first().to_dict() == {"tiny-gemma3": 18, "tiny-llama3": 32}


def test_sasrec_slices_cold_start_and_findings(smoke_run):
    """SASRec sits in every quality table, slices partition the test users, the cold-start stage compares every
    system on users whose positive never was a training item, and findings.md labels the data synthetic."""
    _, s, res = smoke_run
    cfg = s.cfg
    ft = res.tables["finetune"]
    assert {"sasrec", "fine-tuned - sasrec"} <= set(ft["system"])
    assert "sasrec" in set(res.tables["variants"]["variant"])
    assert {"sasrec_b"} <= set(res.tables["cross_domain"].columns)
    sl = res.tables["slices"]
    a = sl[(sl.dataset == cfg.dataset) & (sl.system == "sasrec") & (sl.model == res.models[0])].set_index("slice")
    assert a.drop(index="all")["users"].sum() == a.loc["all", "users"] == cfg.eval_users  # each user in one slice
    cold = res.tables["cold"]
    assert set(cold["system"]) == {"fine-tuned", "zero-shot", "compact (no adapters)", "compact (adapters)",
                                   "sasrec", "popularity"}
    prep = s.prep(cfg.dataset)
    for m in res.models:
        scored = json.loads((cfg.folder / m / cfg.dataset / "cold" / "meta.json").read_text())["users"]
        assert len(scored) == cfg.eval_users and set(scored) <= set(prep.cold_users())
    assert not prep.events[prep.events.split == "train"]["item_id"].isin(prep.cold).any()
    findings = (cfg.folder / "findings.md").read_text()
    assert "SYNTHETIC" in findings and "Item cold start" in findings and "sasrec" in findings


@pytest.mark.study
def test_notebooks_only_read_unless_told_to_compute(smoke_study, tmp_path):
    """open_study (every notebook's first cell) loads finished stages and writes nothing; a missing stage
    raises with the `layerviz run` command that computes it (or, for a study no config names, COMPUTE)."""
    from layerviz.store import StageMissing

    root = Path(smoke_study.config.folder)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    res, models = study.open_study({"SMOKE": True, "DEVICE": "cpu", "RESULTS_DIR": smoke_study.config.results_dir})
    assert models == res.models == smoke_study.models
    assert res.tables["headline"].equals(smoke_study.tables["headline"])
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # nothing written
    config = ROOT / "configs" / "synthetic.yaml"
    with pytest.raises(StageMissing, match=f"layerviz run {config} --results-dir {tmp_path}"):
        study.open_study({"CONFIG": str(config), "RESULTS_DIR": str(tmp_path)})
    with pytest.raises(StageMissing, match="set COMPUTE = True"):
        study.open_study({"SMOKE": True, "DEVICE": "cpu", "RESULTS_DIR": str(tmp_path)})
    assert not any(tmp_path.rglob("done.json"))  # and nothing was computed


STAGE_KINDS = {"baselines", "finetune", "calibration-zeroshot", "zeroshot", "importance",
               "importance-zeroshot", "select", "evaluation", "adapters", "curves", "cold", "finetuned-full",
               "transfer", "bench", "heal_variants"}


def _kind(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return "select" if last.startswith("select-") else last


CHANGES = [
    ({"kcore": 3}, STAGE_KINDS),  # the data of every stage changes
    ({"positive_threshold": 3.0}, STAGE_KINDS),
    ({"history_len": 4}, STAGE_KINDS),
    ({"item_noun": "gadgets"}, STAGE_KINDS),  # the prompts' wording: a data setting too
    ({"eval_users": 5}, {"baselines", "zeroshot", "evaluation", "adapters", "cold", "finetuned-full", "transfer",
                         "heal_variants"}),
    ({"rq3": {"variants": {"mse": {"objective": "mse"}}, "ks": [2]}}, {"heal_variants"}),
    ({"adapters": {"samples": 4, "policy": {"rank": 4}, "train": {"stage1_epochs": 2, "stage2_epochs": 1},
                   "objective": "task", "valid_users": 3, "heal": {"steps": 2, "eval_every": 2, "batch_size": 2}}},
     {"adapters", "cold", "transfer", "heal_variants"}),  # the variants start from the adapters section
    ({"select_users": 4}, {"select", "curves"}),
    ({"calibration_users": 4}, {"calibration-zeroshot"}),  # the fine-tuned model's is 'none': no stage
    ({"importance": {"samples": 4, "ablation_users": 2, "ablation_negatives": 4}},
     {"importance", "importance-zeroshot", "select"}),  # importance_greedy's order (top_k is not studied)
    ({"bench": {"ks": [3], "runs": 1, "warmup": 0, "seq_len": 8, "prefill_batch": 1, "qps_queries": 1,
                "isolate": False}}, {"bench"}),
    ({"sasrec": {"max_epochs": 3, "eval_every": 1, "valid_users": 20, "hidden": 8, "max_len": 10}}, {"baselines"}),
    ({"jobs": 2}, set()),  # how many processes run the models: no stage reads it
    ({"results_dir": "elsewhere"}, set()),  # where results live is not what they are
]
"""A setting changed, and the kinds of stage whose cache key must change with it."""


@pytest.fixture(scope="module")
def key_walk(tmp_path_factory):
    """walk(config with changes) -> each stage's cache key, for one tiny cross-domain model with cold start."""
    from layerviz.study.runner import walk

    tmp = tmp_path_factory.mktemp("keys")
    mp = pytest.MonkeyPatch()
    base = dict(models=["tiny-llama3"], cross_domain_models=["tiny-llama3"], cold_items=0.3)

    def keys(root=tmp, **change):
        return walk(_tiny_config(root, **{**base, **change})).keys

    yield keys, keys()
    mp.undo()


@pytest.mark.parametrize("change,reruns", CHANGES)
def test_a_setting_reruns_exactly_the_stages_that_read_it(key_walk, tmp_path, change, reruns):
    """Every stage's cache key is its config (asdict) and its data's fingerprint, derived by the stage itself:
    the keys the walk derives (``runner.walk``, as a run would) change for the stages that read the setting."""
    keys, before = key_walk
    change = dict(change)
    after = keys(tmp_path / change.pop("results_dir", ""), **change)
    assert set(before) == set(after) and {_kind(n) for n in before} == STAGE_KINDS
    assert {_kind(n) for n in before if before[n] != after[n]} == reruns


def test_rq3_compares_adapter_variants_with_a_control(smoke_study):
    """The adapters stage heals (task + distill) with a control; the rq3 stage runs every variant at each k for both
    selections, and its table picks one variant per selection and k by validation NDCG@10."""
    res, a = smoke_study, smoke_study.config.dataset
    heal = res.adapters[(res.adapters.dataset == a)]
    assert list(heal.stage) == ["drop", "stage1", "heal"] * len(res.models)
    assert heal["retention_control"].notna().all() and heal["top1"].between(0, 1).all()
    assert heal["kendall_tau"].between(-1, 1).all()
    assert set(res.heal_curves.columns) >= {"step", "loss", "task", "distill", "valid_ndcg@10"}
    t = res.tables["rq3"]
    assert set(t.variant) == {"drop", "mse", "task+distill"} and set(t.selection) == {"primary", "first_k"}
    picked = t[t.variant != "drop"].groupby(["model", "selection", "k"])["chosen"].sum()
    assert (picked == 1).all()
    first = t[(t.selection == "first_k") & (t.variant == "mse")]
    assert all(list(r) == list(range(k)) for r, k in zip(first.layers, first.k, strict=True))
    mse = t[t.variant == "mse"]
    assert mse["retention_control"].isna().all() and (mse["vs_mse"] == 0).all()  # no healing: no control
    cost = res.tables["hypotheses"]
    assert {"adapters add <1% parameters", "adapters add <5% compute",
            "adapter training takes 10-20% of the original's time"} <= set(cost.claim)
