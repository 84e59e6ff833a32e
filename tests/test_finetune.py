import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from layerviz import load_model
from layerviz.cli import main as cli
from layerviz.data import DataFormatError, PrepConfig, load
from layerviz.errors import NonFiniteLossError
from layerviz.finetune import finetune, merged, partial_path, prepare_trainable
from layerviz.models import check_base, read_finetune_manifest, sha256_file
from layerviz.paths import cache_root
from layerviz.scoring import Request, ScoringConfig, score
from layerviz.settings import FinetuneConfig

FIX = Path(__file__).parent / "fixtures"
HIST = ["Canon EOS R50 Mirrorless Camera Body", "SanDisk Extreme 128GB SDXC Memory Card", "Canon Battery Pack"]
POS, NEGS = "Canon 50mm f/1.8 Prime Lens", ["Xbox Series X", "A", "Garmin Venu 3 Smartwatch with a long name"]


def _cfg(tmp_path, **over) -> FinetuneConfig:
    raw = dict(model="tiny-llama3", dataset="synthetic-electronics", history_len=3, max_title_tokens=8, batch_size=2,
               train_negatives=3, max_steps=4, eval_every=2, eval_users=3, negatives=4, lr=5e-3, device="cpu",
               results_dir=str(tmp_path / "r"))
    raw.update(over)
    return FinetuneConfig(**raw)


def test_merged_model_equals_the_trained_one(tiny, tmp_path):
    """prepare_trainable's LoRA model (peft, training.inject_lora) merged into plain Linears scores as it did."""
    _, model, tok = tiny
    work, tuner, params = prepare_trainable(model, _cfg(tmp_path))
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad():  # LoRA B starts at 0 (a no-op): give it weights so the merge has something to merge
        for n, p in work.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.tensor([tok("A customer bought a Canon camera and a lens").input_ids])
    with torch.no_grad():
        before = work(input_ids=ids).logits
        plain = merged(work, tuner)
        after = plain(input_ids=ids).logits
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert not any(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(before, after, atol=2e-5, rtol=1e-4)  # fp32 merge: W + BA*s vs W x + B(A x)s
    with torch.no_grad():
        base = model(input_ids=ids).logits
    assert (base - after).abs().max() > 1e-3  # the LoRA weights really changed the function


def test_finetune_round_trip_and_base_untouched(tmp_path):
    model, tok = load_model("tiny-llama3", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "ft"
    res = finetune(_cfg(tmp_path, max_steps=3), model, tok, out=out, report=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit-identical base
    assert set(res.curves.columns) >= {"step", "train_loss", "valid_ndcg@10", "seconds"}
    assert res.curves["step"].tolist() == [0, 1, 2, 3]  # one row per step, validation at 0, 2 and the end
    assert res.curves["valid_ndcg@10"].notna().tolist() == [True, False, True, True]
    man = read_finetune_manifest(out)
    assert man["base"] == "tiny-llama3" and man["seed"] == 0 and man["summary"]["steps"] == 3
    assert man["data_fingerprint"] and man["versions"]["torch"]
    assert not partial_path(out).exists()
    loaded, ltok = load_model(str(out), device="cpu")
    reqs = [Request(HIST, [POS, *NEGS])]
    a = score(res.model, tok, reqs, ScoringConfig(calibration="none"))[0]
    b = score(loaded, ltok, reqs, ScoringConfig(calibration="none"))[0]
    np.testing.assert_array_equal(a, b)
    check_base(out, model)  # same base: accepted
    with pytest.raises(ValueError, match="fine-tuned from another base model"):
        check_base(out, load_model("tiny-qwen3", device="cpu")[0])


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    model, tok = load_model("tiny-llama3", device="cpu")
    cfg = _cfg(tmp_path, max_steps=5, eval_every=2)
    whole = finetune(cfg, model, tok, out=tmp_path / "a", report=None)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, model, tok, out=tmp_path / "b", report=None, stop_after=3)
    assert not (tmp_path / "b").exists() and partial_path(tmp_path / "b").exists()  # no half-written folder
    said = []
    resumed = finetune(cfg, model, tok, out=tmp_path / "b", report=said.append)
    assert any("resuming from step 2" in s for s in said)
    for (n, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    assert whole.curves.drop(columns="seconds").equals(resumed.curves.drop(columns="seconds"))


def test_full_finetuning_and_other_objectives_run(tmp_path):
    model, tok = load_model("tiny-qwen3", device="cpu")
    for obj in ("next_title", "yesno"):
        res = finetune(_cfg(tmp_path, objective=obj, max_steps=2, model="tiny-qwen3"), model, tok, report=None)
        assert res.summary["objective"] == obj and np.isfinite(res.curves["train_loss"].iloc[-1])
    res = finetune(_cfg(tmp_path, full=True, max_steps=2, lr=1e-3, model="tiny-qwen3"), model, tok, report=None)
    assert res.summary["method"] == "full" and res.summary["trainable_params"] == sum(
        p.numel() for p in model.parameters())


@pytest.mark.parametrize("over,exc,msg", [
    ({"objective": "pairwise"}, ValueError, "unknown objective 'pairwise'; use one of rank"),
    ({"target_modules": ["q_proj", "qkv"]}, ValueError, r"LoRA target modules \['qkv'\] do not exist.*available: down_proj"),
    ({"min_history": 500}, ValueError, "the training set is empty after the protocol"),
    ({"gradient_checkpointing": True}, ValueError, "'next_title' only"),
])
def test_bad_settings_fail_clearly(tmp_path, over, exc, msg):
    model, tok = load_model("tiny-llama3", device="cpu")
    with pytest.raises(exc, match=msg):
        finetune(_cfg(tmp_path, **over), model, tok, report=None)


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model, tok = load_model("tiny-llama3", device="cpu")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        finetune(_cfg(tmp_path), model, tok, out=out, report=None)
    assert (out / "keep.txt").read_text() == "mine"


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    import layerviz.finetune as ft

    model, tok = load_model("tiny-llama3", device="cpu")
    real, calls = ft.batch_loss, []

    def flaky(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(ft, "batch_loss", flaky)
    out = tmp_path / "ft"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 3 \(micro-batch 0\).*last good "
                                                 r"state \(step 2\) is saved.*best state so far \(step 2, .*\) was restored"):
        finetune(_cfg(tmp_path), model, tok, out=out, report=None)
    saved = torch.load(partial_path(out), weights_only=False)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["params"])
    assert not out.exists()


def test_resume_refuses_another_base(tmp_path):
    model, tok = load_model("tiny-llama3", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tmp_path), model, tok, out=tmp_path / "ft", report=None, stop_after=2)
    other, _ = load_model("tiny-llama3", device="cpu", seed=1)
    with pytest.raises(ValueError, match="made from another base model"):
        finetune(_cfg(tmp_path), other, tok, out=tmp_path / "ft", report=None)


def test_reviews_without_metadata_name_the_missing_file(tmp_path):
    shutil.copy(FIX / "amazon2018" / "Electronics_5.json", tmp_path / "Electronics_5.json")
    with pytest.raises(DataFormatError, match=r"recognised as amazon2018 reviews.*meta_Electronics\.json\.gz.*titles"):
        load(str(tmp_path), report=None)
    (tmp_path / "Electronics_5.json").unlink()
    shutil.copy(FIX / "amazon2023" / "Electronics.jsonl", tmp_path / "Electronics.jsonl")
    with pytest.raises(DataFormatError, match=r"amazon2023 reviews.*meta_Electronics\.jsonl"):
        load(str(tmp_path), report=None)


def test_cli_finetune_then_evaluate(tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--model", "tiny-llama3", "--dataset", "synthetic-electronics", "--max-steps", "2",
            "--eval-every", "2", "--eval-users", "3", "--history-len", "3", "--max-title-tokens", "8",
            "--batch-size", "2", "--train-negatives", "3", "--device", "cpu", "--out", str(out)]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "validation NDCG@10" in printed and "before" in printed and "after" in printed
    assert cli(args) == 2  # the folder exists now: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    ev = tmp_path / "ev"
    assert cli(["evaluate", "--model", str(out), "--dataset", "synthetic-electronics", "--users", "4", "--negatives", "4",
                "--history-len", "3", "--calibration-users", "4", "--device", "cpu", "--out", str(ev),
                "--results-dir", str(tmp_path / "r")]) == 0
    doc = json.loads((ev / "metrics.json").read_text())
    assert doc["calibration"] in ("none", "pmi") and doc["calibration_auto"]["choice"] == doc["calibration"]


def test_calibration_auto_picks_the_better_on_validation(tmp_path):
    from layerviz.data import CandidateConfig, candidates_for
    from layerviz.evaluate import TaskEvaluator, measure_calibrations
    from layerviz.settings import EvalConfig

    model, tok = load_model("tiny-gemma3", device="cpu")
    prep = load("synthetic-electronics", config=PrepConfig(history_len=3), report=None)
    cfg = EvalConfig(negatives=4, calibration_users=6, history_len=3, results_dir=str(tmp_path))
    rec = measure_calibrations(model, tok, prep, cfg)
    cands, _ = candidates_for(prep, CandidateConfig(4, "uniform", 6, "valid", 0), tmp_path / "candidates")
    direct = {c: float(np.mean(TaskEvaluator(prep, cands, tok, calibration=c, max_title_tokens=32)(model)))
              for c in ("none", "pmi")}
    assert rec["valid_ndcg@10"] == pytest.approx(direct, abs=1e-9)
    assert rec["choice"] == ("pmi" if direct["pmi"] > direct["none"] else "none")


@pytest.mark.slow
def test_real_model_finetunes_without_touching_its_cache(smollm2, tmp_path):
    model, tok = smollm2
    cached = sorted((cache_root() / "dequantized").glob("smollm2-135m-*/model.safetensors"))
    digests = [sha256_file(p) for p in cached]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune(_cfg(tmp_path, model="smollm2-135m", max_steps=2, eval_users=2), model, tok, report=None)
    assert res.summary["steps"] == 2 and cached and [sha256_file(p) for p in cached] == digests
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_time_budget_measures_where_training_stopped(tmp_path, monkeypatch):
    """Stopped by --max-seconds between evaluations: the last step still gets its validation NDCG@10."""
    import layerviz.finetune as ft

    clock = iter(range(0, 10_000, 10))  # every clock read advances 10 s
    monkeypatch.setattr(ft.time, "perf_counter", lambda: float(next(clock)))
    model, tok = load_model("tiny-llama3", device="cpu")
    res = finetune(_cfg(tmp_path, max_steps=50, eval_every=40, max_seconds=100), model, tok, report=None)
    steps = res.summary["steps"]
    assert 0 < steps < 40 and res.summary["stopped"] == "time budget (100 s)"
    assert list(res.curves["step"]) == list(range(steps + 1))
    evaluated = res.curves.dropna(subset=["valid_ndcg@10"])["step"].tolist()
    assert evaluated == [0, steps]  # step 0 (zero-shot) and where the budget ran out, nothing in between
