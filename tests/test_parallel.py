"""Data parallelism (layerviz.parallel): 2 CPU processes on gloo, spawned by the test, against 1 process.

Bit-identical where the arithmetic is: the importance pass and the loss ablation run the very batches one
process runs (each process takes whole batches), so their arrays are equal to the last bit. Scores of
packed users may differ in the last float bits, because a process packs a different set of users into one
forward (other matmul shapes); ranks and metrics must be identical, scores within 1e-5.
"""

import argparse
import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import torch.multiprocessing as mp

from layerviz import data, load_model, parallel, store
from layerviz.compression import importance as imp
from layerviz.compression.adapters import train_adapters
from layerviz.compression.compact import build_compact
from layerviz.compression.config import AdapterPolicy, AdapterTrainConfig
from layerviz.compression.selection import select
from layerviz.data import CandidateConfig, candidates_for
from layerviz.data.prompts import build_probes
from layerviz.evaluate import TaskEvaluator
from layerviz.finetune import finetune
from layerviz.settings import FinetuneConfig

SPEC, USERS, SAMPLES = "tiny-gemma3", 7, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LAYERVIZ_PROGRESS="0")
    torch.set_num_threads(1)
    parallel.init("cpu", timeout_s=60)


def compute(folder: str) -> dict:
    """What the test compares: evaluation metrics and scores, importance arrays, ablation, a selection trace,
    and a stage written through store.cached."""
    model, tok = load_model(SPEC, device="cpu")
    prep = data.load("synthetic-electronics", config=data.PrepConfig(history_len=3), report=None)
    cands, _ = candidates_for(prep, CandidateConfig(9, "uniform", USERS, "test", 0), os.path.join(folder, "cands"))
    ev = TaskEvaluator(prep, cands, tok, split="test", max_title_tokens=6, calibration="none")
    cal = build_probes(prep, tok, n=SAMPLES, max_title_tokens=6)
    out = {"metrics": ev.metrics(model), "hook": imp.hook_pass(model, cal),
           "ablation": imp.loss_ablation(model, cal, [0, 5, 17], batch_size=2)}
    out["trace"] = select("forward_greedy", model, ev, k=2).trace
    compact = build_compact(model, [0, 5, 9, 17], AdapterPolicy(rank=4), seed=0)
    out["adapters_init"] = {f"{i}.{k}": v.detach().clone() for i, a in enumerate(compact.adapters())
                            for k, v in a.state_dict().items()}
    train_adapters(compact, model, cal, AdapterTrainConfig(stage1_epochs=1, stage2_epochs=2, sample_batch=3), pad=0,
                   report=None)
    out["adapters"] = {f"{i}.{k}": v.detach().clone() for i, a in enumerate(compact.adapters())
                       for k, v in a.state_dict().items()}
    tuned = finetune(FinetuneConfig(model=SPEC, dataset="synthetic-electronics", history_len=3, max_title_tokens=6,
                                    max_steps=2, batch_size=2, train_negatives=3, eval_every=2, eval_users=4,
                                    results_dir=folder), model, tok, report=None)
    out["finetuned"] = {k: v.detach().clone() for k, v in tuned.model.state_dict().items() if "layers.0." in k}
    out["finetune_curve"] = tuned.curves
    out["stage"], _ = store.cached(os.path.join(folder, "stage"), "k1",
                                   lambda f: {"table": pd.DataFrame({"rank": [parallel.rank()],
                                                                     "world": [parallel.world_size()]})})
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    _join(rank, world, port)
    out = compute(folder)
    with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    parallel.barrier()


def _cli_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    _join(rank, world, port)
    from layerviz import cli

    assert cli.main(argv) == 0


def _dying_worker(rank: int, world: int, port: int, folder: str) -> None:
    _join(rank, world, port)

    def stage(f):
        if rank == 1:
            os._exit(3)  # a process dies inside a stage
        return {"x": parallel.gather([rank])}

    store.cached(os.path.join(folder, "stage"), "k", stage)


@pytest.fixture(scope="session")
def both(tmp_path_factory):
    """(one process's results, every rank's results of the 2-process run)."""
    single_dir, multi_dir = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same reduction order, so the same bits
    try:
        single = compute(str(single_dir))
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_worker, args=(2, _free_port(), str(multi_dir)), nprocs=2, start_method="spawn")
    ranks = [pickle.loads((multi_dir / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    return single, ranks, multi_dir


def test_two_processes_give_the_single_process_results(both):
    single, ranks, _ = both
    for got in ranks:  # every process holds the full result
        pd.testing.assert_frame_equal(got["metrics"], single["metrics"], rtol=0, atol=1e-6)
        assert set(got["hook"]) == set(single["hook"])
        for k, v in single["hook"].items():
            np.testing.assert_array_equal(got["hook"][k], v, err_msg=k)  # the same batches: bit-identical
        np.testing.assert_array_equal(got["ablation"][0], single["ablation"][0])
        np.testing.assert_array_equal(got["ablation"][1]["ablation_loss"], single["ablation"][1]["ablation_loss"])
        assert np.isnan(got["ablation"][1]["ablation_loss"][:, 1]).all()  # a layer not ablated stays NaN
        assert got["trace"]["layers"].map(list).tolist() == single["trace"]["layers"].map(list).tolist()
        np.testing.assert_allclose(got["trace"]["score"], single["trace"]["score"], rtol=0, atol=1e-6)


def test_adapter_training_and_finetuning_split_their_examples_and_sum_gradients(both):
    """Data parallel training: each process back-propagates its share of every batch and the gradients are
    summed (all_reduce) before the step. The weights equal one process's within float rounding (each
    process runs a smaller batch: other matmul shapes and padding, and the sums meet in another order), and
    the adapters moved from their initial state, so the comparison is not of untouched weights."""
    single, ranks, _ = both
    for got in ranks:
        assert set(got["adapters"]) == set(single["adapters"])
        for k, v in single["adapters"].items():
            torch.testing.assert_close(got["adapters"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        for k, v in single["finetuned"].items():
            torch.testing.assert_close(got["finetuned"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        np.testing.assert_allclose(got["finetune_curve"]["train_loss"], single["finetune_curve"]["train_loss"],
                                   rtol=1e-5)
    assert any(not torch.equal(v, single["adapters_init"][k]) for k, v in single["adapters"].items())
    assert single["finetune_curve"]["train_loss"].notna().sum() == 2
    for got in ranks:  # the two processes ended with the very same weights (they stepped on the same gradients)
        for k, v in ranks[0]["adapters"].items():
            assert torch.equal(got["adapters"][k], v)


def test_rank_zero_alone_writes_and_every_process_reads_its_outputs(both):
    _, ranks, folder = both
    assert pd.read_parquet(folder / "stage" / "table.parquet").to_dict("records") == [{"rank": 0, "world": 2}]
    for r, got in enumerate(ranks):  # each returns what it computed (the same, but for this test's rank column)
        assert got["stage"]["table"].to_dict("records") == [{"rank": r, "world": 2}]
    assert sorted(p.name for p in (folder / "stage").iterdir()) == ["done.json", "table.parquet"]


def test_each_process_scores_a_contiguous_share():
    assert list(parallel.shard(7)) == list(range(7))  # one process: everything
    assert parallel.batches(5, 2) == [[0, 1], [2, 3], [4]]


def test_a_dead_process_fails_the_run_and_marks_no_stage_done(tmp_path):
    with pytest.raises(mp.ProcessExitedException):
        mp.start_processes(_dying_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert not (tmp_path / "stage" / "done.json").exists()


def test_more_processes_than_users_is_refused(monkeypatch):
    monkeypatch.setattr(parallel, "world_size", lambda: 4)
    with pytest.raises(ValueError, match="4 processes but only 3 users: launch at most 3"):
        parallel.check_enough(3, "users")


def test_nccl_without_cuda_is_refused(monkeypatch):
    monkeypatch.setenv("LAYERVIZ_DIST_BACKEND", "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="NCCL was requested.*no CUDA device; use gloo"):
        parallel.backend_for("cpu")


def test_a_killed_two_process_study_resumes_in_one_process(tmp_path, smoke_study):
    """torchrun -m layerviz run, killed (SIGKILL to the launcher and its workers) once its first stage is done; the
    same config in one process reuses what was written and ends with the tables of a one-process run (the session's
    smoke study, whose settings are the same: its rows of this model)."""
    from dataclasses import asdict

    import yaml

    from layerviz.study import run_study, smoke_config

    cfg = smoke_config(models=["tiny-gemma3"], results_dir=str(tmp_path / "resumed"))
    path = tmp_path / "resumed.yaml"
    path.write_text(yaml.safe_dump(asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERVIZ_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(_free_port()), "-m", "layerviz", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"))
    marker = cfg.folder / "tiny-gemma3" / "synthetic-electronics" / "finetune" / "done.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:  # the launcher first (it cannot restart anyone), then its workers (own sessions)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), (tmp_path / "stderr").read_text()[-3000:]
    assert not (cfg.folder / "manifest.json").exists()  # the study did not finish
    resumed = run_study(cfg, report=None)
    manifest = json.loads((cfg.folder / "manifest.json").read_text())
    assert "tiny-gemma3/synthetic-electronics/finetune" in manifest["stages_cached"] and manifest["processes"] == 1
    assert "tiny-gemma3/synthetic-electronics/evaluation" in manifest["stages_run"]
    assert smoke_study.config.models == ["tiny-gemma3", "tiny-llama3"]
    assert {k: v for k, v in asdict(smoke_study.config).items() if k not in ("models", "results_dir")} == \
        {k: v for k, v in asdict(cfg).items() if k not in ("models", "results_dir")}
    for name in ("variants", "thirds", "cross_domain"):
        one = smoke_study.tables[name]
        one = one[one["model"] == "tiny-gemma3"].reset_index(drop=True)
        pd.testing.assert_frame_equal(resumed.tables[name], one, rtol=1e-5, atol=1e-6)


def test_cli_commands_under_two_processes_write_once_what_one_process_writes(tmp_path, capsys):
    from layerviz import cli

    argv = ["evaluate", "--model", "tiny-llama3", "--dataset", "synthetic-electronics", "--users", "5", "--negatives", "9",
            "--history-len", "3", "--max-title-tokens", "6", "--calibration", "none"]
    assert cli.main([*argv, "--results-dir", str(tmp_path / "r1"), "--out", str(tmp_path / "one")]) == 0
    mp.start_processes(_cli_worker, args=(2, _free_port(), [*argv, "--results-dir", str(tmp_path / "r2"), "--out",
                                                            str(tmp_path / "two")]), nprocs=2, start_method="spawn")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one.keys() == two.keys() and one["ndcg@10"]["mean"] == pytest.approx(two["ndcg@10"]["mean"], abs=1e-9)
    with pytest.raises(ValueError, match="times one process"):  # a benchmark is never launched in several
        cli._one_writer(argparse.Namespace(command="bench"))
