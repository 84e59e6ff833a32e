"""RQ3 healing: adapter objectives, healing modes, agreement, folding and export (tiny random models)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from layerviz import arch, load_model, metrics
from layerviz.compression.adapters import train_adapters
from layerviz.compression.compact import build_compact, load_compact
from layerviz.compression.config import (
    AdapterPolicy,
    AdapterTrainConfig,
    HealConfig,
    parse_objective,
)
from layerviz.compression.heal import Batches, heal, heal_loss
from layerviz.errors import NonFiniteLossError
from layerviz.training import rank_loss, rank_loss_naive
from tests.conftest import TINY, _load


def _ids(tok):
    return tok("a camera, a tripod and a memory card for travel", return_tensors="pt").input_ids


def _perturb(compact, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in compact.adapters():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("text,expected", [("mse", {"mse": 1.0}), ("task+distill", {"task": 1.0, "distill": 1.0}),
                                           ("task=1,distill=0.5", {"task": 1.0, "distill": 0.5}),
                                           ({"cosine": 2, "mse": 0}, {"cosine": 2.0})])
def test_objectives_parse_into_weights(text, expected):
    assert parse_objective(text) == expected


@pytest.mark.parametrize("bad,match", [("taks", "unknown adapter objective"), ("task=-1", ">= 0"),
                                       ({"task": 0, "mse": 0}, "sum to 0"), ("task=abc", "not a number")])
def test_bad_objectives_are_refused_with_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_objective(bad)


def test_cosine_stage1_lowers_the_cosine_loss(fresh_llama, synthetic):
    from layerviz.data.prompts import build_probes

    model, tok = fresh_llama
    cal = build_probes(synthetic, tok, n=6)
    compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4))
    curve = train_adapters(compact, model, cal, AdapterTrainConfig(stage1_epochs=8, stage2_epochs=0, lr=3e-3,
                                                            loss={"cosine": 1.0}), pad=tok.pad_token_id, report=None)
    for _, g in curve[curve.stage == "stage1"].groupby("gap"):
        assert g.val_mse.min() < g.val_mse.iloc[0]  # the stage's objective here: 1 - cos
        assert g.val_mse.max() <= 2.0  # a cosine distance, not a squared error


@pytest.mark.parametrize("objective", ["task", "distill", "mse", "cosine"])
def test_each_heal_objective_decreases_its_loss_on_a_planted_batch(fresh_llama, synthetic, objective, monkeypatch):
    model, tok = fresh_llama
    cfg = HealConfig(steps=6, lr=3e-2, eval_every=6, batch_size=2, train_negatives=3)
    batches = Batches(synthetic, tok, cfg, history_len=3, max_title_tokens=8, seed=0)
    planted = batches.step(0)
    monkeypatch.setattr(Batches, "step", lambda self, step: planted)  # the same batch every step
    compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4))
    weights = parse_objective(objective)

    def loss_now():
        with torch.no_grad():
            return float(heal_loss(compact, model, batches.text, *planted, weights, cfg.temperature)[0])

    before = loss_now()
    heal(compact, synthetic, tok, objective, cfg, lambda m: np.zeros(3), teacher=model, history_len=3, max_title_tokens=8)
    # validation is flat, so the best state is step 0's: heal again keeping the last state instead
    cfg_last = HealConfig(steps=6, lr=3e-2, eval_every=1, batch_size=2, train_negatives=3)
    heal(compact, synthetic, tok, objective, cfg_last, lambda m: np.full(3, -loss_now()), teacher=model, history_len=3,
         max_title_tokens=8)
    assert loss_now() < before


def test_task_loss_with_the_shared_prefix_equals_the_naive_one_on_a_compact_model(fresh_llama, synthetic):
    model, tok = fresh_llama
    compact = build_compact(model, [0, 3, 11, 31], AdapterPolicy(rank=4))
    _perturb(compact)
    batches = Batches(synthetic, tok, HealConfig(batch_size=3, train_negatives=4), history_len=3, max_title_tokens=8,
                      seed=0)
    hist, cands = batches.step(0)
    shared = rank_loss(compact, batches.text, hist, [c[0] for c in cands], [c[1:] for c in cands])
    naive = rank_loss_naive(compact, batches.text, hist, [c[0] for c in cands], [c[1:] for c in cands])
    assert torch.allclose(shared, naive, atol=1e-5)
    task, _ = heal_loss(compact, None, batches.text, hist, cands, {"task": 1.0}, 1.0)
    assert torch.allclose(task, shared, atol=1e-6)


def test_distillation_is_zero_when_the_student_is_the_teacher(fresh_llama, synthetic):
    model, tok = fresh_llama
    n = arch.num_layers(model)
    compact = build_compact(model, list(range(n)), "identity")
    batches = Batches(synthetic, tok, HealConfig(batch_size=2, train_negatives=3), history_len=3, max_title_tokens=8,
                      seed=0)
    loss, terms = heal_loss(compact, model, batches.text, *batches.step(0), {"distill": 1.0, "mse": 1.0}, 2.0)
    assert terms["distill"] == pytest.approx(0.0, abs=1e-6) and terms["mse"] == pytest.approx(0.0, abs=1e-8)


# ----------------------------------------------------------------------------- healing


def test_early_stopping_keeps_the_best_state(fresh_llama, synthetic):
    model, tok = fresh_llama
    compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4))
    seen, script = [], iter([0.1, 0.2, 0.9, 0.3, 0.2, 0.1])

    def validate(m):
        seen.append([p.detach().clone() for a in compact.adapters() for p in a.parameters()])
        return np.full(3, next(script))

    _, curve = heal(compact, synthetic, tok, "task", HealConfig(steps=10, eval_every=2, patience=3, lr=1e-2, batch_size=2,
                                                           train_negatives=3),
                    validate, history_len=3, max_title_tokens=8)
    assert curve.attrs["best_step"] == 4 and curve.attrs["stopped"].startswith("early stop")
    assert curve.step.max() == 10 and curve["valid_ndcg@10"].notna().sum() == 6
    now = [p for a in compact.adapters() for p in a.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(now, seen[2], strict=True))  # the state validated at step 4
    assert not all(torch.equal(a, b) for a, b in zip(now, seen[-1], strict=True))


def test_nonfinite_healing_loss_names_the_step_and_restores_the_best_state(fresh_llama, synthetic):
    model, tok = fresh_llama
    compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4))
    start = [p.detach().clone() for a in compact.adapters() for p in a.parameters()]
    with pytest.raises(NonFiniteLossError, match="at step 2.*restored"):
        heal(compact, synthetic, tok, "task", HealConfig(steps=4, lr=float("inf"), clip=float("inf"), batch_size=2,
                                                    train_negatives=3),
             lambda m: np.zeros(3), history_len=3, max_title_tokens=8)
    now = [p for a in compact.adapters() for p in a.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(now, start, strict=True))


def test_lora_healing_changes_the_compact_model_only_and_survives_save_and_load(fresh_llama, synthetic, tmp_path):
    model, tok = fresh_llama
    before = _state(model)
    ids = _ids(tok)
    compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4), share=False)
    with torch.no_grad():
        start = compact(ids).logits
    cfg = HealConfig(mode="lora", steps=3, eval_every=1, lr=1e-2, batch_size=2, train_negatives=3, lora_r=2)
    _, curve = heal(compact, synthetic, tok, "task+distill", cfg, lambda m: np.full(3, float(len(curve_rows(m)))),
                    teacher=model, history_len=3, max_title_tokens=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is untouched
    assert not any("lora" in n for n, _ in compact.named_parameters())  # merged into plain Linears
    with torch.no_grad():
        healed = compact(ids).logits
    assert not torch.allclose(healed, start, atol=1e-5)
    compact.save(tmp_path / "c")
    again = load_compact(tmp_path / "c", base=model)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, healed, atol=1e-6)


def curve_rows(_m, _n=[0]):  # noqa: B006 (a counter: validation improves at every call, so the last state is kept)
    _n[0] += 1
    return range(_n[0])


def test_last_mode_trains_the_last_kept_layers_and_the_head(fresh_llama, synthetic):
    model, tok = fresh_llama
    compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4), share=False)
    kept = arch.layers(compact)
    first = {n: p.clone() for n, p in kept[0].layer.named_parameters()}
    last = {n: p.clone() for n, p in kept[-1].layer.named_parameters()}
    heal(compact, synthetic, tok, "task", HealConfig(mode="last", last_layers=1, steps=2, eval_every=1, lr=1e-1,
                                                batch_size=2, train_negatives=3),
         lambda m: np.full(3, float(len(curve_rows(m)))), history_len=3, max_title_tokens=8)
    assert all(torch.equal(p, first[n]) for n, p in kept[0].layer.named_parameters())
    assert any(not torch.equal(p, last[n]) for n, p in kept[-1].layer.named_parameters())
    assert compact.base["healed"][-1] == "lm_head."


def test_bad_heal_inputs_are_refused(fresh_llama, synthetic):
    model, tok = fresh_llama
    shared = build_compact(model, [0, 4, 31])
    with pytest.raises(ValueError, match="share=False"):
        heal(shared, synthetic, tok, "task", HealConfig(mode="lora"), lambda m: np.zeros(3), history_len=3,
             max_title_tokens=8)
    own = build_compact(model, [0, 4, 31], share=False)
    with pytest.raises(ValueError, match=r"LoRA target modules \['w_q'\] do not exist.*available: down_proj"):
        heal(own, synthetic, tok, "task", HealConfig(mode="lora", target_modules=["w_q"]), lambda m: np.zeros(3),
             history_len=3, max_title_tokens=8)
    other, _ = load_model("tiny-llama3", device="cpu", seed=1)
    with pytest.raises(ValueError, match="distillation teacher"):
        heal(shared, synthetic, tok, "distill", HealConfig(), lambda m: np.zeros(3), teacher=other, history_len=3,
             max_title_tokens=8)
    with pytest.raises(ValueError, match="unknown heal mode"):
        HealConfig(mode="everything")
    with pytest.raises(ValueError, match="full model has no adapters"):
        heal(model, synthetic, tok, "task", HealConfig(), lambda m: np.zeros(3), history_len=3, max_title_tokens=8)


# ----------------------------------------------------------------------------- agreement


def test_agreement_top1_and_kendall_tau():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 8))
    noisy = ref + rng.normal(scale=0.5, size=ref.shape)
    got = metrics.agreement(ref, noisy)
    assert np.allclose(got.top1, (ref.argmax(1) == noisy.argmax(1)))
    assert np.allclose(got.kendall_tau, [kendalltau(a, b)[0] for a, b in zip(ref, noisy, strict=True)])
    same = metrics.agreement(ref, ref * 3 + 1)
    assert (same.top1 == 1).all() and np.allclose(same.kendall_tau, 1)
    assert np.allclose(metrics.agreement(ref, -ref).kendall_tau, -1)
    with pytest.raises(ValueError, match="one shape"):
        metrics.agreement(ref, ref[:, :3])


# ----------------------------------------------------------------------------- folding and export


def test_folding_is_exact():
    from layerviz.compression.adapters import Adapter

    torch.manual_seed(0)
    down = torch.nn.Linear(24, 16, bias=False)
    fold = Adapter("fold", 16)
    with torch.no_grad():
        fold.weight.add_(torch.randn(16, 16) * 0.1)
    x = torch.randn(5, 24)
    with torch.no_grad():
        mapped = fold(down(x))
        fold.fold_into(down)
        assert torch.allclose(down(x), mapped, atol=1e-6)
    with pytest.raises(ValueError, match="only a fold adapter"):
        Adapter("linear", 16).fold_into(down)


def test_fold_policy_places_the_map_on_the_block_before_each_gap(tiny):
    _, model, _ = tiny
    n = arch.num_layers(model)
    compact = build_compact(model, [0, 3, 8, n - 1], "fold")
    assert [s.kind for s in compact.specs] == ["identity", "fold", "fold", "fold", "identity"]  # last: tail
    first = build_compact(model, [2, 3, n - 1], "fold")
    assert first.specs[0].kind == "identity" and "no kept block" in first.specs[0].reason
    kept = arch.layers(compact)
    assert kept[0].fold is compact.adapters()[1] and kept[1].fold is compact.adapters()[2]


def test_fold_stage1_fits_the_gap_in_closed_form(fresh_llama, synthetic):
    from layerviz.data.prompts import build_probes

    model, tok = fresh_llama
    cal = build_probes(synthetic, tok, n=8)
    compact = build_compact(model, [0, 1, 5, 12, 20, 31], "fold")
    seen = {}
    train_adapters(compact, model, cal, AdapterTrainConfig(init="lstsq", stage1_epochs=2, stage2_epochs=0),
                   pad=tok.pad_token_id, report=None, on_stage=lambda s, mse, nmse, t: seen.update({s: mse}))
    assert seen["stage1"] < seen["drop"]


def _load_plain(folders: dict[str, Path], ids: dict[str, torch.Tensor], tmp: Path) -> dict[str, tuple]:
    """Each exported folder loaded by plain transformers, in ONE process without layerviz -> {case: (logits, [layers,
    layer_types, sliding_window, parameters])}."""
    for case, t in ids.items():
        np.save(tmp / f"{case}.ids.npy", t.numpy())
    code = (
        "import sys, json, numpy as np, torch\n"
        "sys.modules['layerviz'] = None  # any import of layerviz now fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"folders, tmp = {({k: str(v) for k, v in folders.items()})!r}, {str(tmp)!r}\n"
        "facts = {}\n"
        "for case, folder in folders.items():\n"
        "    m = AutoModelForCausalLM.from_pretrained(folder).eval()\n"
        "    with torch.no_grad():\n"
        "        np.save(f'{tmp}/{case}.out.npy', m(torch.tensor(np.load(f'{tmp}/{case}.ids.npy'))).logits.numpy())\n"
        "    c = m.config\n"
        "    facts[case] = [c.num_hidden_layers, getattr(c, 'layer_types', None), getattr(c, 'sliding_window', None),"
        " sum(p.numel() for p in m.parameters())]\n"
        "print(json.dumps(facts))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    return {case: (np.load(tmp / f"{case}.out.npy"), facts[case]) for case in folders}


EXPORTS = [(name, policy) for name in TINY for policy in ("identity", "fold")]


def _keep(model) -> list[int]:
    n = arch.num_layers(model)
    return [0, 3, n // 2 + 1, n - 1]  # Gemma3: a mix of sliding and full layers, renumbered


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic):
    """Every export of this module (each tiny family with plain dropping and with fold adapters; a healed
    LoRA + fold compact model), loaded back by plain transformers in one process -> {case: (expected logits,
    logits, facts)}."""
    tmp = tmp_path_factory.mktemp("exports")
    folders, ids, expected = {}, {}, {}
    for name, policy in EXPORTS:
        model, tok = _load(name)
        compact = build_compact(model, _keep(model), policy)
        _perturb(compact, scale=0.02)
        case = f"{name}-{policy}"
        folders[case], ids[case] = compact.export_hf(tmp / case), _ids(tok)
        with torch.no_grad():
            expected[case] = compact(ids[case]).logits.numpy()
    model, tok = copy.deepcopy(_load("tiny-llama3")[0]), _load("tiny-llama3")[1]
    compact = build_compact(model, [0, 4, 9, 31], "fold", share=False)
    heal(compact, synthetic, tok, "task", HealConfig(mode="lora", steps=2, eval_every=1, lr=1e-2, batch_size=2,
                                                     train_negatives=3, lora_r=2),
         lambda m: np.full(3, float(len(curve_rows(m)))), history_len=3, max_title_tokens=8)
    compact.export_hf(tmp / "healed")
    folders["healed"], ids["healed"] = tmp / "healed", _ids(tok)
    with torch.no_grad():
        expected["healed"] = compact(ids["healed"]).logits.numpy()
    loaded = _load_plain(folders, ids, tmp)
    return {case: (expected[case], *loaded[case]) for case in folders}


@pytest.mark.parametrize("name,policy", EXPORTS)
def test_export_hf_loads_with_plain_transformers(exported, name, policy):
    model, _ = _load(name)
    keep = _keep(model)
    expected, logits, (layers, types, window, params) = exported[f"{name}-{policy}"]
    assert layers == len(keep)
    assert np.allclose(logits, expected, atol=1e-4)  # folding is exact up to float32 rounding
    if "gemma" in name:
        assert types == [arch.layer_types(model)[i] for i in keep] and len(set(types)) == 2
        assert window == arch.sliding_window(model)
    kept_params = sum(p.numel() for i in keep for p in arch.layers(model)[i].parameters())
    rest = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - sum(
        p.numel() for p in arch.layers(model).parameters())
    assert params == kept_params + rest  # no added parameters


def test_export_refuses_adapters_that_cannot_be_folded(tiny, tmp_path):
    _, model, _ = tiny
    n = arch.num_layers(model)
    with pytest.raises(ValueError, match=r"gaps .*0→3 \(linear, rank 64\).*cannot be folded.*force='fold'"):
        build_compact(model, [0, 3, n // 2, n - 1]).export_hf(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_healed_and_folded_compact_exports_with_identical_scores(exported):
    expected, logits, _ = exported["healed"]
    assert np.allclose(logits, expected, atol=1e-4)


def test_a_teacher_with_another_tokenizer_is_refused(fresh_llama):
    from layerviz.compression.heal import check_teacher

    model, tok = fresh_llama
    compact = build_compact(model, [0, 4, 31])
    import copy

    other = copy.deepcopy(tok)
    other.add_tokens(["<not-in-the-base-vocabulary>"])  # another vocabulary
    check_teacher(model, compact, tok, tok)  # the same one passes
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_teacher(model, compact, tok, other)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smollm2-135m", "gemma3-270m"])
def test_real_models_export_folded_checkpoints_with_the_same_scores(preset, tmp_path):
    from transformers import AutoModelForCausalLM

    from layerviz.scoring import Request, ScoringConfig, score
    from tests.conftest import _load

    model, tok = _load(preset)
    n = arch.num_layers(model)
    keep = [0, 1, n // 3, n // 2 + 1, n - 1]
    compact = build_compact(model, keep, "fold")
    _perturb(compact, scale=0.01)
    compact.export_hf(tmp_path / "plain", tokenizer=tok)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", torch_dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == len(keep)
    assert arch.layer_types(plain) == [arch.layer_types(model)[i] for i in keep]
    reqs = [Request(["Toy Story (1995)", "Heat (1995)"], ["Casino (1995)", "Babe (1995)", "Jumanji (1995)"])]
    cfg = ScoringConfig(max_title_tokens=8, calibration="none")
    np.testing.assert_allclose(score(plain, tok, reqs, cfg)[0], score(compact, tok, reqs, cfg)[0], atol=1e-4)
