"""The cost plan (``layerviz run CONFIG --plan``): the selection strategies' worst cases against what they
run, errors, throughput, and the pass counter. That the plan equals what a study records is tested on the
smoke study (test_study) and on the paper config's rehearsal (test_rehearsal)."""

from dataclasses import asdict

import numpy as np
import pytest
import yaml

from layerviz import arch, passes
from layerviz.cli import main
from layerviz.compression.selection import select
from layerviz.models import load_model
from layerviz.study import by_stage, plan, smoke_config
from layerviz.study.cost import Planner


@pytest.fixture(scope="module")
def tiny_gemma():
    return load_model("tiny-gemma3", seed=0)[0]


@pytest.mark.parametrize("strategy,k", [("forward_greedy", 3), ("backward_greedy", 13), ("importance_greedy", 5),
                                        ("uniform", 4)])
def test_the_plans_subset_count_is_what_a_strategy_evaluates(tiny_gemma, strategy, k, tmp_path):
    n = arch.num_layers(tiny_gemma)
    rng = np.random.default_rng(0)
    evaluator = lambda model: rng.random(4)  # noqa: E731 (any scores: the count does not depend on them)
    with passes.recording() as counted:
        select(strategy, tiny_gemma, evaluator, k=k, importance=None if strategy != "importance_greedy" else _table(n))
    sizes, exact = Planner.subsets(strategy, n, k)
    if exact:
        assert counted["subset"] == len(sizes)
    else:
        assert 0 < counted["subset"] <= len(sizes)
    if strategy == "forward_greedy":  # O(L k)
        assert len(sizes) == k * n - k * (k - 1) // 2
    if strategy == "backward_greedy":  # O(L^2): L-2 candidates at first (the ends are kept)
        assert len(sizes) == sum(m - 2 for m in range(k + 1, n + 1))


def _table(n):
    import pandas as pd

    return pd.DataFrame({"layer": range(n), "criterion": "fused", "value": np.linspace(0, 1, n),
                         "normalized": np.linspace(0, 1, n)})


def test_plan_refuses_what_run_refuses_and_needs_a_throughput_on_gpu(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [nope]\n")
    assert main(["run", str(bad), "--plan"]) == 2
    err_plan = capsys.readouterr().err
    assert main(["run", str(bad)]) == 2
    assert capsys.readouterr().err == err_plan and "models: 'nope' is not a preset" in err_plan
    cfg = smoke_config(results_dir=str(tmp_path), models=["tiny-llama3"], device="cuda")
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(asdict(cfg)))
    assert main(["run", str(path), "--plan"]) == 2
    assert "give the throughput you expect with --tflops" in capsys.readouterr().err
    assert plan(cfg)["seconds"].isna().all()  # no default throughput on a GPU
    df = plan(cfg, tflops=400)
    assert np.allclose(df["seconds"], df["flops"] / 400e12) and not (tmp_path / "smoke").exists()


def test_plan_cli_prints_stage_rows_and_totals_without_loading_weights(tmp_path, capsys, monkeypatch):
    import layerviz.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the plan loaded a model"))
    cfg = smoke_config(results_dir=str(tmp_path / "r"), models=["tiny-llama3", "tiny-gemma3"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(asdict(cfg)))
    assert main(["run", str(path), "--plan", "--tflops", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama3/synthetic-electronics/select-importance_greedy" in out and "total tiny-gemma3" in out
    assert "2 TFLOP/s (--tflops)" in out and not (tmp_path / "r").exists()
    df = plan(cfg)
    table = by_stage(df)
    total = table[table["stage"] == "total"].iloc[0]
    assert total["TFLOP"] == pytest.approx(df["flops"].sum() / 1e12, abs=0.01)
    assert total["subset"].startswith("<=")  # importance_greedy's saturation stop: a bound


def test_pass_counts_combine_across_processes_and_nest_exclusively():
    assert passes.combine([{"prefix": 3, "subset": 2}, {"prefix": 4, "subset": 2}]) == {"prefix": 7, "subset": 2}
    with passes.recording() as outer:
        passes.count("prefix", 2)
        with passes.recording() as inner:
            passes.count("prefix", 5)
    assert outer == {"prefix": 2} and inner == {"prefix": 5}
    passes.count("prefix")  # nothing open: not counted anywhere, no error
    with pytest.raises(ValueError, match="unknown pass kind"):
        passes.count("forward")
