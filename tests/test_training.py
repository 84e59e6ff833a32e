"""The one training module: windows and schedule, the losses, the best state and patience, the loop's non-finite
guard, and LoRA on peft (tiny random models, synthetic data)."""

import copy

import pytest
import torch

from layerviz import arch
from layerviz.data.prompts import Prompt, PromptConfig
from layerviz.errors import NonFiniteLossError
from layerviz.training import (
    BestState,
    Frozen,
    Loop,
    Schedule,
    improves,
    inject_lora,
    merge_lora,
    rank_loss,
    rank_loss_naive,
    training_windows,
)

HIST = ["Canon EOS R50 Mirrorless Camera Body", "SanDisk Extreme 128GB SDXC Memory Card", "Canon Battery Pack"]
POS, NEGS = "Canon 50mm f/1.8 Prime Lens", ["Xbox Series X", "A", "Garmin Venu 3 Smartwatch with a long name"]
# a micro-batch of three examples whose prefixes differ in length (left padding is exercised)
BATCH = ([HIST, ["Xbox Series X"], ["A", "Garmin Venu 3 Smartwatch", "Lens", "Tripod for mirrorless cameras"]],
         [POS, "Controller for Xbox", "Peak Design Everyday Camera Sling Bag"],
         [NEGS, ["B", "Sony TV 55 inch OLED", "A"], ["x", "y", "Canon 50mm f/1.8 Prime Lens"]])


# ----------------------------------------------------------------------------- windows, schedule, losses


def test_no_validation_or_test_item_leaks_into_training(synthetic, tiny_llama):
    prep = synthetic
    windows = training_windows(prep, history_len=3)
    ev = prep.events
    train = ev[ev["split"] == "train"]
    held = {u: set(g) for u, g in ev[ev["split"] != "train"].groupby("user_id")["item_id"]}
    order = {(u, i): k for k, (u, i) in enumerate(zip(train["user_id"], train["item_id"], strict=True))}
    assert len(windows) == len(train) - train["user_id"].nunique()  # every position but each user's first
    for w in windows.itertuples():
        assert (w.user_id, w.target) in order  # a training event of this user
        assert w.target not in held[w.user_id] and not set(w.history) & held[w.user_id]
        assert all(order[(w.user_id, h)] < order[(w.user_id, w.target)] for h in w.history)  # only earlier items
    # the prompts: no held-out title of the user appears in a training prompt; negatives never seen by the user
    sched = Schedule(prep, windows, seed=0, per_step=2, negatives=3)
    titles, seen = prep.titles(), prep.seen_by_user()
    tok = tiny_llama[1]
    text = Prompt(tok, PromptConfig(max_title_tokens=64))
    for step in range(20):
        for e in sched.examples(step):
            prompt = tok.decode(text.likelihood_prefix([titles[i] for i in e["history"]]))
            shown = {titles[h] for h in e["history"]}
            assert not [titles[i] for i in held[e["user_id"]] if titles[i] in prompt and titles[i] not in shown]
            assert e["target"] not in held[e["user_id"]]
            assert not set(e["negatives"]) & seen[e["user_id"]] and len(set(e["negatives"])) == 3


def test_schedule_is_a_function_of_seed_and_step(synthetic):
    w = training_windows(synthetic, 3)
    a, b = Schedule(synthetic, w, 0, 2, 3), Schedule(synthetic, w, 0, 2, 3)
    assert a.examples(5) == b.examples(5)
    assert a.examples(5) != Schedule(synthetic, w, 1, 2, 3).examples(5)


def test_shared_prefix_rank_loss_equals_naive(tiny):
    _, model, tok = tiny
    text = Prompt(tok, PromptConfig(max_title_tokens=8))
    fast = rank_loss(model, text, *BATCH)
    slow = rank_loss_naive(model, text, *BATCH)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    single = [rank_loss(model, text, [h], [p], [n]) for h, p, n in zip(*BATCH, strict=True)]
    torch.testing.assert_close(fast, torch.stack(single).mean(), atol=1e-5, rtol=1e-5)
    # and the gradients through the shared KV cache equal the naive ones (first layer's q_proj)
    w = arch.layers(model)[0].self_attn.q_proj.weight
    w.requires_grad_(True)
    try:
        g_fast = torch.autograd.grad(rank_loss(model, text, *BATCH), w)[0]
        g_slow = torch.autograd.grad(rank_loss_naive(model, text, *BATCH), w)[0]
    finally:
        w.requires_grad_(False)
    assert g_fast.abs().sum() > 0
    torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- the best state and the loop


def test_one_improvement_rule():
    assert improves(0.5, None) and improves(-3.0, None, bigger=False)  # the first value is always the best
    assert improves(0.5001, 0.5) and not improves(0.50004, 0.5) and not improves(0.5, 0.5)  # margin 1e-4 x |best|
    assert improves(0.9, 1.0, bigger=False) and not improves(0.99995, 1.0, bigger=False)
    assert improves(-0.9, -1.0) and not improves(-1.00001, -1.0)  # negative values: the margin is relative to |best|


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 1)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return lin, x, y


def _loop(lin, script, patience=None, unit="evaluations", lr=0.05):
    values = iter(script)
    seen = []

    def validate():
        seen.append([p.detach().clone() for p in lin.parameters()])
        return next(values)

    best = BestState(list(lin.parameters()), patience=patience, unit=unit)
    return Loop(best, torch.optim.SGD(lin.parameters(), lr=lr), validate, clip=1.0), best, seen


def test_the_best_state_is_kept_and_step_0_counts():
    lin, x, y = _toy()
    loop, best, seen = _loop(lin, [0.5, 0.1, 0.2, 0.3])  # training never beats the untrained state
    loop.start()
    loop.run(range(1, 4), lambda s: loop.step(((lin(x) - y) ** 2).mean(), f"step {s}") or {})
    loop.finish()
    assert best.at == 0 and best.value == 0.5
    assert all(torch.equal(a, b) for a, b in zip(lin.parameters(), seen[0], strict=True))  # restored
    lin, x, y = _toy()
    loop, best, seen = _loop(lin, [0.1, 0.2, 0.9, 0.3])
    loop.start()
    loop.run(range(1, 4), lambda s: loop.step(((lin(x) - y) ** 2).mean(), f"step {s}") or {})
    curve = loop.finish()
    assert best.at == 2 and curve.attrs["best_at"] == 2 and list(curve["valid_ndcg@10"]) == [0.1, 0.2, 0.9, 0.3]
    assert all(torch.equal(a, b) for a, b in zip(lin.parameters(), seen[2], strict=True))


@pytest.mark.parametrize("unit,eval_every,stops_at", [("evaluations", 2, 10), ("epochs", 2, 8)])
def test_patience_in_evaluations_and_in_epochs(unit, eval_every, stops_at):
    """Validations at 0, 2, 4, ...: the best at 4, then none better. Patience 3 in evaluations stops at the third
    validation after it (10); patience 3 in epochs at the first validation 3 or more epochs after it (8)."""
    lin, x, y = _toy()
    loop, best, _ = _loop(lin, [0.1, 0.2, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5], patience=3, unit=unit)
    loop.start()
    why = loop.run(range(1, 100), lambda s: loop.step(((lin(x) - y) ** 2).mean(), f"step {s}") or {},
                   eval_every=eval_every)
    assert why == f"early stop: 3 {unit} without improvement"
    assert best.at == 4 and loop.rows[-1]["step"] == stops_at


def test_patience_below_one_and_unknown_units_are_refused():
    lin, _, _ = _toy()
    with pytest.raises(ValueError, match="patience=0: give a positive integer"):
        BestState(list(lin.parameters()), patience=0)
    with pytest.raises(ValueError, match="unknown patience unit 'steps'"):
        BestState(list(lin.parameters()), patience=2, unit="steps")


def test_a_non_finite_loss_names_the_step_and_restores_the_best_state():
    lin, x, y = _toy()
    loop, best, seen = _loop(lin, [0.1, 0.9, 0.2], lr=0.01)
    loop.start()

    def step(s):
        loss = ((lin(x) - y) ** 2).mean()
        loop.step(loss * float("nan") if s == 3 else loss, f"step {s}")
        return {}

    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 3 \(value nan\); the best state "
                                                 r"so far \(step 1, validation NDCG@10 0\.9\) was restored"):
        loop.run(range(1, 10), step)
    assert all(torch.equal(a, b) for a, b in zip(lin.parameters(), seen[1], strict=True))
    assert all(p.grad is None for p in lin.parameters())


def test_a_non_finite_validation_restores_the_best_state_too():
    lin, x, y = _toy()
    loop, _, seen = _loop(lin, [0.1, float("nan")])
    loop.start()
    with pytest.raises(NonFiniteLossError, match="non-finite validation NDCG@10 \\(nan\\) at step 1"):
        loop.run(range(1, 3), lambda s: loop.step(((lin(x) - y) ** 2).mean(), f"step {s}") or {})
    assert all(torch.equal(a, b) for a, b in zip(lin.parameters(), seen[0], strict=True))


def test_frozen_trains_only_what_it_is_given_and_restores_the_flags():
    lin, _, _ = _toy()
    lin.bias.requires_grad_(False)
    with Frozen(lin, [lin.weight]):
        assert lin.weight.requires_grad and not lin.bias.requires_grad
    lin.bias.requires_grad_(True)
    with Frozen(lin, [lin.bias]):
        assert not lin.weight.requires_grad and lin.bias.requires_grad
    assert lin.weight.requires_grad and lin.bias.requires_grad


# ----------------------------------------------------------------------------- LoRA on peft


def test_lora_merge_equals_peft_merge_and_unload(tiny):
    """``inject_lora`` + ``merge_lora`` give the very model peft's own get_peft_model + merge_and_unload gives, for
    the same LoRA weights; and LoRA really changed the function."""
    from peft import LoraConfig, get_peft_model

    _, model, tok = tiny
    ids = torch.tensor([tok("A customer bought a Canon camera and a lens").input_ids])
    ours = copy.deepcopy(model)
    tuner, params = inject_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8, seed=3)
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():  # LoRA B starts at 0 (a no-op): give it weights so the merge has something to merge
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        before = ours(input_ids=ids).logits
    lora = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" in n}
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n.removeprefix("base_model.model.")])
    merged, reference = merge_lora(tuner), theirs.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        ours_logits, ref_logits, base = merged(input_ids=ids).logits, reference(input_ids=ids).logits, \
            model(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, ref_logits, atol=0, rtol=0)
    torch.testing.assert_close(before, ours_logits, atol=2e-5, rtol=1e-4)  # merged = W x + B(A x) s
    assert (base - ours_logits).abs().max() > 1e-3


def test_a_missing_lora_target_names_the_modules_that_exist(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match=r"LoRA target modules \['qkv'\] do not exist.*available: .*down_proj"):
        inject_lora(copy.deepcopy(model), ["q_proj", "qkv"], r=2, alpha=4)


def test_lora_is_seeded(tiny):
    _, model, _ = tiny
    a = inject_lora(copy.deepcopy(model), ["q_proj"], r=2, alpha=4, seed=1)[1]
    b = inject_lora(copy.deepcopy(model), ["q_proj"], r=2, alpha=4, seed=1)[1]
    c = inject_lora(copy.deepcopy(model), ["q_proj"], r=2, alpha=4, seed=2)[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
