import json

import numpy as np
import pytest
import torch

from layerviz import arch, load_model
from layerviz.compression.adapters import Adapter, fit_lstsq, place_adapters, train_adapters
from layerviz.compression.compact import build_compact, load_compact
from layerviz.compression.config import AdapterPolicy, AdapterTrainConfig
from layerviz.errors import NonFiniteLossError
from layerviz.scoring import Request, ScoringConfig, score


def _ids(tok):
    return tok("a camera, a tripod and a memory card for travel", return_tensors="pt").input_ids


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["identity", "linear"])
def test_all_layers_with_identity_adapters_equal_the_base(tiny, kind):
    _, model, tok = tiny
    n, ids = arch.num_layers(model), _ids(tok)
    # force applies to non-empty gaps only; with every layer kept, make the adapters real ones
    specs = [dict(prev=p, next=p + 1, skipped=0, kind=kind, rank=r, reason="test", n_layers=n)
             for p, r in zip(range(-1, n), [None, 8] * n, strict=False)]
    compact = build_compact(model, list(range(n)), specs)
    assert compact.has_adapters() == (kind != "identity")
    with torch.no_grad():
        assert torch.allclose(compact(ids).logits, model(ids).logits, atol=1e-5)
        g_base = model.generate(ids, max_new_tokens=6, do_sample=False)
        g_comp = compact.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(g_base, g_comp)
    assert compact.config.num_hidden_layers == n


@pytest.mark.parametrize("rank", [None, 4])
def test_at_init_compact_equals_plain_layer_dropping(tiny, rank):
    _, model, tok = tiny
    n, ids = arch.num_layers(model), _ids(tok)
    keep = [1, 2, 6, n // 2, n - 2]
    compact = build_compact(model, keep, AdapterPolicy(rank=rank))
    assert compact.has_adapters()
    with torch.no_grad():
        with arch.keep_layers(model, keep):
            ref, g_ref = model(ids).logits, model.generate(ids, max_new_tokens=6, do_sample=False)
        out = compact(ids).logits
        assert torch.equal(out, ref)
        assert torch.equal(compact.generate(ids, max_new_tokens=6, do_sample=False), g_ref)
        assert not torch.allclose(out, model(ids).logits, atol=1e-3)  # dropping layers changes outputs
    assert compact.config.num_hidden_layers == len(keep)
    assert arch.layer_types(compact) == [arch.layer_types(model)[i] for i in keep]
    assert arch.num_layers(model) == n  # base untouched


def test_policy_choices_and_reasons():
    specs = {s.label: s for s in place_adapters([0, 2, 8, 11, 12, 16, 29], 30)}
    assert specs["emb→0"].kind == "identity"
    assert specs["0→2"].kind == "linear" and "1 <= 3" in specs["0→2"].reason
    assert specs["2→8"].kind == "residual" and specs["2→8"].skipped == 5
    assert specs["8→11"].kind == "mlp" and "lower/middle" in specs["8→11"].reason  # depth 8/29 < 1/3 <= 11/29
    assert specs["11→12"].kind == "identity" and specs["11→12"].reason == "no layer skipped"
    assert specs["12→16"].kind == "linear" and specs["12→16"].skipped == 3
    assert specs["16→29"].kind == "mlp" and "middle/upper" in specs["16→29"].reason
    assert specs["29→norm"].kind == "identity"
    first = place_adapters([4, 5], 30)
    assert first[0].kind == "mlp" and "embedding" in first[0].reason
    assert first[-1].label == "5→norm" and first[-1].skipped == 24
    assert [s.kind for s in place_adapters([4, 5], 30, AdapterPolicy(force="linear"))] == ["linear", "identity", "linear"]
    assert len(place_adapters([4, 5], 30, AdapterPolicy(tail=False))) == 2
    assert {s.rank for s in place_adapters([0, 5], 30, AdapterPolicy(rank=16)) if s.kind != "identity"} == {16}


@pytest.mark.parametrize("bad,msg", [([], "empty"), ([3, 1], "ascending"), ([1, 1], "duplicated"),
                                     ([0, 99], "out of range")])
def test_bad_layer_lists_are_refused(tiny, bad, msg):
    _, model, _ = tiny
    with pytest.raises(ValueError, match=msg):
        build_compact(model, bad)


def test_unknown_adapter_type_is_refused(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="unknown adapter type 'conv'"):
        build_compact(model, [0, 3], "conv")
    with pytest.raises(ValueError, match="unknown adapter type"):
        Adapter("lora", 8)


@pytest.mark.parametrize("kind", ["linear", "residual", "mlp"])
@pytest.mark.parametrize("rank", [None, 3])
def test_adapter_is_identity_at_init_and_counts_add_up(kind, rank):
    d = 16
    a = Adapter(kind, d, rank)
    h = torch.randn(5, d)
    assert torch.equal(a(h), h)
    assert a.distance_to_identity().item() == 0
    expected = {("linear", None): d * d, ("residual", None): d * d, ("mlp", None): 2 * d * d,
                ("linear", 3): 2 * d * 3 + d, ("residual", 3): 2 * d * 3, ("mlp", 3): 2 * d * 3}[(kind, rank)]
    assert a.n_params() == expected
    # move away from the identity: the regularizer is the squared distance of the map (linear kinds exactly)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if kind != "mlp":
        eye = torch.eye(d)
        m = a(eye)  # rows: images of the basis vectors
        assert a.distance_to_identity().item() == pytest.approx(((m - eye) ** 2).sum().item(), rel=1e-4)
    assert a.distance_to_identity().item() > 0


def test_least_squares_bridge_recovers_a_linear_map():
    torch.manual_seed(0)
    d, n = 12, 400
    x = torch.randn(n, d)
    w = torch.randn(d, d) * 0.3 + torch.eye(d)
    y = x @ w
    for kind in ("linear", "residual"):
        a = Adapter(kind, d)
        fit_lstsq(a, x, y, ridge=0)
        assert torch.allclose(a(x), y, atol=1e-3)
    low = torch.randn(d, 2) @ torch.randn(2, d) * 0.3  # rank-2 correction: the rank-2 adapters fit it exactly
    for kind in ("linear", "residual"):
        a = Adapter(kind, d, rank=2)
        fit_lstsq(a, x, x + x @ low, ridge=0)
        assert torch.allclose(a(x), x + x @ low, atol=1e-3)
    m = Adapter("mlp", d, rank=32)
    target = x + torch.tanh(x @ low)
    before = ((m(x) - target) ** 2).mean()
    fit_lstsq(m, x, target)
    assert ((m(x) - target) ** 2).mean() < 0.5 * before


def test_training_lowers_validation_mse_and_leaves_the_base_bit_identical(fresh_llama, synthetic):
    from layerviz.data.prompts import build_probes

    model, tok = fresh_llama
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    compact = build_compact(model, [0, 1, 5, 12, 20, 31], AdapterPolicy(rank=8))
    cal = build_probes(synthetic, tok, n=8)
    seen = {}
    curve = train_adapters(compact, model, cal, AdapterTrainConfig(stage1_epochs=15, stage2_epochs=2, lr=3e-3),
                           pad=tok.pad_token_id, report=None, on_stage=lambda s, mse, nmse, t: seen.update({s: mse}))
    assert list(seen) == ["drop", "stage1", "stage2"]
    assert seen["stage1"] < seen["drop"] and seen["stage2"] <= seen["stage1"]
    s1 = curve[curve.stage == "stage1"]
    for _, g in s1.groupby("gap"):
        assert g.val_mse.min() < g.val_mse.iloc[0]
    assert set(curve.columns) == {"stage", "gap", "epoch", "train_mse", "val_mse"}
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert any(a.distance_to_identity().item() > 0 for a in compact.adapters())


def test_training_is_deterministic(fresh_llama, synthetic):
    from layerviz.data.prompts import build_probes

    model, tok = fresh_llama
    cal = build_probes(synthetic, tok, n=6)
    cfg = AdapterTrainConfig(stage1_epochs=3, stage2_epochs=1, init="lstsq")
    curves = []
    for _ in range(2):
        compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4))
        curves.append(train_adapters(compact, model, cal, cfg, pad=tok.pad_token_id, report=None))
    assert curves[0].equals(curves[1])


def test_nonfinite_loss_stops_with_the_last_good_adapters(fresh_llama, synthetic):
    from layerviz.data.prompts import build_probes

    model, tok = fresh_llama
    cal = build_probes(synthetic, tok, n=6)
    compact = build_compact(model, [0, 4, 9, 31], AdapterPolicy(rank=4))
    with pytest.raises(NonFiniteLossError, match=r"non-finite validation MSE \(nan\) at epoch 1; the best state so far "
                                                 r"\(epoch 0, validation MSE .*\) was restored"):
        train_adapters(compact, model, cal, AdapterTrainConfig(lr=float("inf"), clip=float("inf")),
                       pad=tok.pad_token_id, report=None)
    assert all(torch.isfinite(p).all() for a in compact.adapters() for p in a.parameters())


def _perturb(compact, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in compact.adapters():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_save_load_round_trip_and_mismatched_base(tiny, tmp_path):
    _, model, tok = tiny
    n, ids = arch.num_layers(model), _ids(tok)
    compact = build_compact(model, [0, 2, 7, n - 1], AdapterPolicy(rank=4))
    _perturb(compact)
    compact.save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "compact.json").read_text())
    assert meta["layers"] == [0, 2, 7, n - 1] and meta["base"]["n_layers"] == n and meta["versions"]["layerviz"]
    again = load_compact(tmp_path / "c", base=model)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, compact(ids).logits)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        compact.save(tmp_path / "c")
    compact.save(tmp_path / "c", overwrite=True)
    other, _ = load_model("tiny-llama3", device="cpu", seed=1)
    if arch.family(model) == "llama":
        with pytest.raises(ValueError, match="differs in fingerprint"):
            load_compact(tmp_path / "c", base=other)
    else:
        with pytest.raises(ValueError, match="differs in class"):
            load_compact(tmp_path / "c", base=other)


def test_scorers_accept_the_compact_model_and_see_adapter_changes(tiny):
    _, model, tok = tiny
    n = arch.num_layers(model)
    keep = [0, 5, n - 1]
    reqs = [Request(["usb cable", "camera bag"], ["tripod", "lens cap", "hdmi cable"])]
    cfg = ScoringConfig(max_title_tokens=8)
    compact = build_compact(model, keep, AdapterPolicy(rank=4))
    with arch.keep_layers(model, keep):
        ref = score(model, tok, reqs, cfg)[0]
    first = score(compact, tok, reqs, cfg)[0]
    assert np.allclose(first, ref, atol=1e-5)
    _perturb(compact, seed=3)  # the PMI prior cache must not serve the old adapters' values
    with torch.no_grad():
        fresh = build_compact(model, keep, AdapterPolicy(rank=4))
        for a, b in zip(fresh.adapters(), compact.adapters(), strict=True):
            a.load_state_dict(b.state_dict())
    assert np.allclose(score(compact, tok, reqs, cfg)[0], score(fresh, tok, reqs, cfg)[0], atol=1e-5)
    assert not np.allclose(score(compact, tok, reqs, cfg)[0], first, atol=1e-4)


@pytest.mark.parametrize("spec", ["tiny-llama3", "tiny-gemma3"])  # untied and tied embeddings
def test_standalone_copy_does_not_share_weights(spec):
    model, tok = load_model(spec, device="cpu")
    ids = _ids(tok)
    compact = build_compact(model, [0, 4, arch.num_layers(model) - 1], share=False)
    with torch.no_grad():
        before = compact(ids).logits
        arch.layers(model)[4].mlp.down_proj.weight.mul_(2)
        arch.embedding(model).weight.mul_(2)
        assert torch.equal(compact(ids).logits, before)
    assert arch.embedding(compact).weight.data_ptr() != arch.embedding(model).weight.data_ptr()
    tied = arch.lm_head(model).weight is arch.embedding(model).weight
    assert (arch.lm_head(compact).weight is arch.embedding(compact).weight) == tied  # tying survives the copy


def test_overhead_goal_on_llama3_8b_shape():
    """The paper's '< 1% parameters, < 5% compute' for the default (rank 64) policy, from the config."""
    from layerviz.compression.selection import load_reference
    from layerviz.models import PRESETS

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(PRESETS["llama3-8b"].config())
    ref = sorted(load_reference()["selections"]["llama3-8b"]["layers"])
    for keep in (ref, [0, 4, 9, 13, 18, 22, 27, 31]):
        compact = build_compact(model, keep)
        o = compact.overhead()
        d, r = 4096, 64
        by_kind = {"linear": 2 * d * r + d, "residual": 2 * d * r, "mlp": 2 * d * r, "identity": 0}
        assert o["adapter_params"] == sum(by_kind[s.kind] for s in compact.specs)
        assert o["base_params"] == 8030261248
        assert o["params_pct_of_base"] < 1 and o["flops_pct"] < 5
        # FLOPs: 2 per weight of the kept layers and the head (embedding lookups are free)
        layer = sum(p.numel() for p in arch.layers(model)[0].parameters())
        assert o["compact_flops_per_token"] == 2 * (len(keep) * layer + 128256 * d)

