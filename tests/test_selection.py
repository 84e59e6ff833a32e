import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from layerviz import arch
from layerviz.compression import selection as sel
from layerviz.data.prompts import build_probes


@pytest.fixture()
def planted():
    """An 8-layer tiny LLaMA whose layers 2 and 5 are no-ops (output projections zeroed)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for i in (2, 5):
        with torch.no_grad():
            arch.layers(model)[i].self_attn.o_proj.weight.zero_()
            arch.layers(model)[i].mlp.down_proj.weight.zero_()
    return model


class HiddenFidelity:
    """-MSE of the final pre-norm hidden state against the full model, on fixed inputs."""

    def __init__(self, model):
        self.ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
        self.calls = 0
        self.ref = self.hidden(model)

    def hidden(self, model):
        with arch.capture(model, ["resid_final"]) as caught, torch.no_grad():
            arch.run_decoder(model, self.ids)
        return caught["resid_final"]

    def __call__(self, model):
        self.calls += 1
        return -((self.hidden(model) - self.ref) ** 2).mean().item()


@pytest.mark.parametrize("strategy", ["backward_greedy", "forward_greedy"])
def test_greedy_never_keeps_a_noop_over_a_functional_layer(planted, strategy):
    ev = HiddenFidelity(planted)
    s = sel.select(strategy, planted, ev, k=6, protect_ends=True)
    assert s.layers == [0, 1, 3, 4, 6, 7]
    assert s.score == pytest.approx(0.0, abs=1e-10)
    # complete trace: one row per real evaluation, no subset twice
    assert len(s.trace) == ev.calls
    assert s.trace["layers"].map(tuple).is_unique


def test_greedy_at_smaller_k_still_prefers_functional_layers(planted):
    s = sel.select("backward_greedy", planted, HiddenFidelity(planted), k=4)
    assert not {2, 5} & set(s.layers)


class Scripted:
    def __init__(self, scores):
        self.scores, self.calls = list(scores), 0

    def __call__(self, model):
        self.calls += 1
        return self.scores.pop(0)


def _table(n, order):
    """An importance table whose fused ranking is exactly ``order``."""
    norm = {layer: 1 - r / n for r, layer in enumerate(order)}
    return pd.DataFrame({"layer": range(n), "criterion": "fused", "value": [norm[i] for i in range(n)],
                         "normalized": [norm[i] for i in range(n)]})


def test_importance_greedy_stops_exactly_on_saturation(planted):
    order = [7, 6, 0, 1, 3, 4, 2, 5]
    ev = Scripted([0.10, 0.20, 0.30, 0.301, 0.302, 0.303, 0.9, 0.95])
    s = sel.select("importance_greedy", planted, ev, importance=_table(8, order))
    assert ev.calls == 6  # three consecutive < 1% improvements after the 3rd evaluation
    assert s.layers == sorted(order[:6]) and s.meta["stop"].startswith("saturated")
    assert s.trace["score"].tolist() == [0.10, 0.20, 0.30, 0.301, 0.302, 0.303]
    assert s.trace["k"].tolist() == [1, 2, 3, 4, 5, 6]
    # a big jump resets the window
    ev = Scripted([0.1, 0.1005, 0.101, 0.2, 0.2001, 0.2002, 0.2003, 0.5])
    s = sel.select("importance_greedy", planted, ev, importance=_table(8, order))
    assert ev.calls == 7
    # k and budget also stop it
    assert len(sel.select("importance_greedy", planted, Scripted(np.linspace(0, 1, 8)), k=3,
                          importance=_table(8, order)).layers) == 3
    s = sel.select("importance_greedy", planted, Scripted(np.linspace(0.1, 1, 8)), budget=2,
                   importance=_table(8, order))
    assert s.meta["stop"] == "budget" and len(s.trace) == 2


def test_saturation_rule():
    assert not sel.saturated([1, 1.001, 1.002])  # needs window + 1 scores
    assert sel.saturated([1, 1.001, 1.002, 1.003])
    assert not sel.saturated([1, 1.001, 1.2, 1.201])
    assert sel.saturated([1, 1.05, 1.06], window=2, threshold=0.1)


def test_baselines_and_regions(planted):
    n = 8
    assert sel.select("first_k", planted, k=3).layers == [0, 1, 2]
    assert sel.select("last_k", planted, k=3).layers == [5, 6, 7]
    assert sel.select("uniform", planted, k=3).layers == [0, 4, 7]  # round(3.5) -> 4
    r1, r2 = (sel.select("random", planted, k=4, seed=s).layers for s in (1, 2))
    assert len(r1) == 4 and r1 != r2 and r1 == sel.select("random", planted, k=4, seed=1).layers
    top = sel.select("top_k", planted, k=2, importance=_table(n, [5, 3, 1, 0, 2, 4, 6, 7]))
    assert top.layers == [3, 5]
    s = sel.select("last_k", planted, k=3)
    assert s.thirds() == {"lower": 0, "middle": 0, "upper": 3}  # depth 5/7 > 2/3
    assert sel.thirds([0, 15, 31], 32) == {"lower": 1, "middle": 1, "upper": 1}


def test_contiguous_block_removes_one_block(tiny):
    from layerviz.data import PrepConfig, load

    _, model, tok = tiny
    prep = load("synthetic-electronics", config=PrepConfig(history_len=3), report=None)
    cal = build_probes(prep, tok, n=2)
    n = arch.num_layers(model)
    s = sel.select("contiguous_block", model, k=n - 4, probes=cal)
    start, end = s.meta["removed_block"]
    assert end - start == 3 and s.layers == [i for i in range(n) if not start <= i <= end]


def test_reference_file_records_the_qwen3_discrepancy(planted):
    ref = sel.load_reference()["selections"]
    assert ref["llama3-8b"]["layers"] == [31, 30, 29, 18, 20, 26, 24, 27]
    assert ref["qwen3-8b"]["real_num_layers"] == 36 and ref["qwen3-8b"]["reported_num_layers"] == 32
    with pytest.raises(ValueError, match=r"out of range for this model's 8 layers"):
        sel.select("reference", planted, reference=ref["llama3-8b"]["layers"])


@pytest.mark.parametrize("kwargs,msg", [
    (dict(strategy="first_k", k=0), "k=0 is invalid"),
    (dict(strategy="first_k", k=9), "k=9 is invalid.*8 layers"),
    (dict(strategy="magic", k=2), "unknown strategy"),
    (dict(strategy="top_k", k=2, criterion="vibes"), "unknown criterion"),
    (dict(strategy="forward_greedy", k=2, budget=3), "budget=3 is too small"),
    (dict(strategy="forward_greedy", k=2, budget=0), "too small to evaluate anything"),
    (dict(strategy="forward_greedy", k=2), "pass an evaluator"),
])
def test_bad_input(planted, kwargs, msg):
    strategy = kwargs.pop("strategy")
    ev = HiddenFidelity(planted) if "budget" in kwargs else None
    with pytest.raises(ValueError, match=msg):
        sel.select(strategy, planted, ev, importance=_table(8, list(range(8))), **kwargs)


def test_random_baseline_is_a_distribution(planted):
    ev = HiddenFidelity(planted)
    dist = sel.random_baseline(planted, ev, k=4, seeds=range(5))
    assert list(dist.seed) == [0, 1, 2, 3, 4] and dist.layers.map(len).eq(4).all()
    assert dist.score.nunique() > 1
    for _, row in dist.iterrows():  # each score is that subset's own measurement, not another's
        with arch.keep_layers(planted, list(row.layers)):
            assert HiddenFidelity(planted)(planted) == 0.0  # (its own reference)
            assert ev(planted) == pytest.approx(row.score)


def test_subset_evaluation_restores_the_model(planted):
    ev = HiddenFidelity(planted)
    sel.select("backward_greedy", planted, ev, k=5)
    assert arch.num_layers(planted) == 8 and planted.config.num_hidden_layers == 8
    assert ev(planted) == 0.0


def test_greedy_searches_stop_on_the_budget(planted):
    ev = HiddenFidelity(planted)
    s = sel.select("forward_greedy", planted, ev, k=4, budget=10)
    assert len(s.trace) == 10 and s.meta["stop"] == "budget" and len(s.layers) == 2
    ev = HiddenFidelity(planted)
    s = sel.select("backward_greedy", planted, ev, k=4, budget=8)
    # 6 removals scored in step 0 (one layer removed), 2 in step 1 (the better of those removed)
    assert len(s.trace) == 8 and s.meta["stop"] == "budget" and len(s.layers) == 6
