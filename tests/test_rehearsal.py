"""configs/paper-gpu.yaml rehearsed end to end on CPU: every stage, every configured strategy (backward_greedy
and contiguous_block included), 1+99 candidates, then the study opened as the notebooks open it.

The models become tiny-llama3 / tiny-qwen3 (the real depths, 32 and 36 layers) and the datasets small files
that this test writes in the official Amazon 2023 (Electronics.jsonl + meta_Electronics.jsonl) and
MovieLens-1M (ratings.dat + movies.dat, latin-1, '::') formats. Every other key keeps the paper's value,
except those in OVERRIDDEN, which are sizes, plus the device, the dtype and the bench's memory processes
(a CPU run of a GPU config).
"""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from layerviz.store import slug
from layerviz.study import StudyConfig, against_run, open_study, plan, recorded_passes, run_study

ROOT = Path(__file__).resolve().parents[1]
OVERRIDDEN = {
    # what the rehearsal replaces, with why; every other key of the paper config is kept as it is
    "models": ["tiny-llama3", "tiny-qwen3"],  # the paper's architectures at tiny width, true depth
    "cross_domain_models": ["tiny-llama3", "tiny-qwen3"],
    "name": "rehearsal",
    "history_len": 3, "max_title_tokens": 4,  # sizes: tokens per prompt
    "select_users": 1, "eval_users": 4, "calibration_users": 3,  # sizes: users
    "device": "cpu", "dtype": None,  # a CPU run of the GPU config (fp32)
}
NESTED = {
    "finetune": {"epochs": None, "max_steps": 2, "eval_every": 2, "eval_users": 3, "batch_size": 2,
                 "train_negatives": 3},  # sizes: steps, users, batch
    "importance": {"samples": 3, "ablation_users": 2},  # sizes
    "adapters": {"samples": 4, "train": {"stage1_epochs": 2, "stage2_epochs": 1}, "valid_users": 3,
                 "heal": {"steps": 2, "eval_every": 2, "batch_size": 2}},  # sizes
    "rq3": {"ks": [4]},  # sizes: one depth (every variant and both selections kept)
    "bench": {"runs": 1, "warmup": 0, "prefill_batch": 1, "seq_len": 8, "qps_queries": 1,
              "isolate": False},  # sizes; memory measured in-process (no worker processes)
}


def _write_amazon2023(folder: Path, rng: np.random.Generator, users: int = 50, items: int = 150) -> None:
    folder.mkdir(parents=True)
    with open(folder / "Electronics.jsonl", "w", encoding="utf-8") as f:
        for u in range(users):
            for j, i in enumerate(rng.choice(items, size=36, replace=False)):
                f.write(json.dumps({"rating": float(rng.choice([4, 5, 5, 3])), "title": "", "text": "",
                                    "images": [], "asin": f"B{i:05d}", "parent_asin": f"B{i:05d}",
                                    "user_id": f"U{u:03d}", "timestamp": 1_600_000_000_000 + 1000 * (60 * u + j),
                                    "helpful_vote": 0, "verified_purchase": True}) + "\n")
    with open(folder / "meta_Electronics.jsonl", "w", encoding="utf-8") as f:
        for i in range(items):
            f.write(json.dumps({"main_category": "All Electronics", "title": f"Gadget model {i} cable",
                                "categories": ["Electronics"], "parent_asin": f"B{i:05d}"}) + "\n")


def _write_ml1m(folder: Path, rng: np.random.Generator, users: int = 50, items: int = 150) -> None:
    folder.mkdir(parents=True)
    with open(folder / "ratings.dat", "w", encoding="latin-1") as f:
        for u in range(1, users + 1):
            for j, i in enumerate(rng.choice(items, size=36, replace=False)):
                f.write(f"{u}::{i + 1}::{rng.choice([4, 5, 5, 2])}::{978_300_000 + 60 * u + j}\n")
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for i in range(1, items + 1):
            f.write(f"{i}::Caf\xe9 film {i} ({1950 + i % 50})::Drama|Comedy\n")


def _merge(base: dict, over: dict) -> dict:
    return {k: (_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v)
            for k, v in {**base, **over}.items()}


@pytest.mark.slow
@pytest.mark.study
def test_paper_config_rehearsed_on_cpu(tmp_path):
    paper = yaml.safe_load((ROOT / "configs" / "paper-gpu.yaml").read_text())
    rng = np.random.default_rng(0)
    _write_amazon2023(tmp_path / "amazon2023-electronics", rng)
    _write_ml1m(tmp_path / "ml-1m", rng)
    over = {**OVERRIDDEN, "dataset": str(tmp_path / "amazon2023-electronics"), "transfer_dataset": str(tmp_path / "ml-1m"),
            "results_dir": str(tmp_path / "results"), **{k: _merge(paper[k], v) for k, v in NESTED.items()}}
    unknown = set(over) - set(paper) - {"results_dir", "max_title_tokens"}  # the paper keeps their defaults
    assert not unknown, f"the rehearsal overrides keys the paper config does not have: {unknown}"
    raw = {**paper, **over}
    cfg = StudyConfig.from_dict(raw, where="rehearsal")
    kept = {k for k in paper if k not in over}  # every one of these is the paper's own value
    assert {"strategies", "negatives", "k_fraction", "reference", "calibration", "criterion", "primary"} <= kept
    assert cfg.negatives == 99 and {"backward_greedy", "contiguous_block"} <= set(cfg.strategies)

    res = run_study(cfg, report=None)
    check = against_run(plan(cfg), recorded_passes(cfg))  # --plan predicted what every stage ran (or bounded it)
    assert check["holds"].all(), check[~check["holds"]]
    per_stage = check.groupby("stage")[["planned", "recorded"]].sum()
    assert (per_stage > 0).all().all(), per_stage  # the same stages planned as run

    manifest = json.loads((cfg.folder / "manifest.json").read_text())
    ran = set(manifest["stages_run"])
    a, b = slug(cfg.dataset), slug(cfg.transfer_dataset)  # stage folders are named after the dataset paths
    for spec in ("tiny-llama3", "tiny-qwen3"):
        for s in cfg.strategies:
            assert f"{spec}/{a}/select-{s}" in ran
        assert {f"{spec}/{a}/{s}" for s in ("finetune", "importance", "evaluation", "adapters", "curves")} <= ran
        assert f"{spec}/{b}/transfer" in ran and f"{spec}/bench" in ran
    sel = res.tables["variants"]
    assert set(sel["model"]) == {"tiny-llama3", "tiny-qwen3"}
    last = sel[sel["variant"] == "select:last_k"].set_index("model")["k"].to_dict()
    assert last == {"tiny-llama3": 8, "tiny-qwen3": 9}  # k = L/4 of 32 and 36
    assert set(res.tables["headline"]["L"]) == {32, 36}
    hyp = res.tables["hypotheses"]  # every claim of the plan, for both models, with a verdict its CI decides
    assert {"tiny-llama3", "tiny-qwen3"} <= set(hyp["model"]) and "upper layers are the most important" in set(hyp["claim"])
    assert set(hyp["verdict"]) <= {"supported", "contradicted", "inconclusive", "not tested"}
    decided = hyp.dropna(subset=["ci_low", "ci_high"])
    assert len(decided) and (decided["ci_low"] <= decided["ci_high"]).all()

    config = tmp_path / "rehearsal.yaml"  # what every notebook's first cell does with CONFIG pointing at it
    config.write_text(yaml.safe_dump(asdict(cfg)))
    opened, models = open_study({"CONFIG": str(config), "RESULTS_DIR": str(tmp_path / "results"), "DEVICE": "cpu"})
    assert models == ["tiny-llama3", "tiny-qwen3"]  # (the notebooks themselves run on the smoke study: test_notebooks)
    assert opened.tables["hypotheses"].equals(res.tables["hypotheses"])
