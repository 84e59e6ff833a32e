import pytest
import torch

from layerviz import arch


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_keep_layers_restores_everything(tiny):
    _, model, tok = tiny
    n = arch.num_layers(model)
    before, types = _state(model), arch.layer_types(model)
    layer_list = arch.layers(model)
    idx = [m.layer_idx for m in layer_list.modules() if hasattr(m, "layer_idx")]
    ids = tok("a camera and a tripod", return_tensors="pt").input_ids
    with torch.no_grad():
        full = model(ids).logits
        with arch.keep_layers(model, [0, 2, n - 1]):
            assert arch.num_layers(model) == 3 == model.config.num_hidden_layers
            assert arch.layer_types(model) == [types[0], types[2], types[n - 1]]
            assert [layer.self_attn.layer_idx for layer in arch.layers(model)] == [0, 1, 2]
            short = model(ids).logits
            gen = model.generate(ids, max_new_tokens=3, do_sample=False)  # KV cache with re-indexed layers
        assert not torch.allclose(full, short)
        assert gen.shape[1] == ids.shape[1] + 3
        assert torch.equal(model(ids).logits, full)
    assert arch.layers(model) is layer_list and arch.layer_types(model) == types
    assert [m.layer_idx for m in layer_list.modules() if hasattr(m, "layer_idx")] == idx
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_restored_after_an_exception(tiny):
    _, model, _ = tiny
    n = arch.num_layers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with arch.skip_layers(model, [1]):
            assert arch.num_layers(model) == n - 1
            raise RuntimeError("boom")
    assert arch.num_layers(model) == n == model.config.num_hidden_layers


def test_skipping_nothing_is_identity(tiny):
    _, model, tok = tiny
    ids = tok("memory card", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        with arch.skip_layers(model, []):
            assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("bad,msg", [([], "empty"), ([0, 0], "duplicated"), ([3, 1], "ascending"),
                                     ([0, 99], "out of range")])
def test_bad_layer_lists(tiny, bad, msg):
    _, model, _ = tiny
    with pytest.raises(ValueError, match=msg):
        with arch.keep_layers(model, bad):
            pass


def test_attention_probs_match_eager_attention(tiny):
    """Recomputed probabilities equal HF's eager weights, sliding window included (Gemma3)."""
    name, model, tok = tiny
    layers = arch.layers(model)
    li = 0 if name == "tiny-gemma3" else 5  # Gemma3 layer 0 is a sliding-window layer
    old_impl, old_win = model.config._attn_implementation, getattr(model.config, "sliding_window", None)
    attn = layers[li].self_attn
    old_mod_win = getattr(attn, "sliding_window", None)
    caught = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: caught.update(h=k["hidden_states"], pe=k["position_embeddings"]),
                                        with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, k, o: caught.update(w=o[1]), with_kwargs=True)
    try:
        model.config._attn_implementation = "eager"
        if old_mod_win:
            model.config.sliding_window = attn.sliding_window = 4
        batch = tok(["a camera lens for a mirrorless camera body", "tripod"], return_tensors="pt",
                    padding=True, padding_side="right")
        with torch.no_grad():
            model(**batch)
            probs = arch.attention_probs(attn, caught["h"], caught["pe"], batch.attention_mask)
    finally:
        h1.remove(), h2.remove()
        model.config._attn_implementation = old_impl
        if old_mod_win:
            model.config.sliding_window, attn.sliding_window = old_win, old_mod_win
    valid = batch.attention_mask.bool()
    diff = (probs - caught["w"]).abs().amax(dim=(1, 3))[valid]
    assert diff.max() < 1e-5
    assert torch.allclose(probs.sum(-1)[:, 0][valid], torch.ones(int(valid.sum())), atol=1e-5)
