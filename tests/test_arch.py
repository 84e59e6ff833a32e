import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config

from layerviz import arch
from layerviz.models import PRESETS as lm_presets
from tests.conftest import TINY_LAYERS


def test_parts_for_every_tiny_family(tiny):
    name, model, _ = tiny
    p = arch.parts(model)
    assert p.family == lm_presets[name].family
    assert isinstance(p.layers, nn.ModuleList)
    assert arch.num_layers(model) == TINY_LAYERS[name] == model.config.num_hidden_layers
    assert p.embedding is model.model.embed_tokens
    assert p.final_norm is model.model.norm
    assert "Norm" in type(p.final_norm).__name__
    assert p.lm_head is model.lm_head
    assert p.lm_head.out_features == model.config.vocab_size
    assert arch.hidden_size(model) == p.embedding.embedding_dim == 64


def test_logits_from_final_norm_match_model(tiny):
    """arch.logits(final_norm(h_last)) reproduces the model's own logits (softcap included)."""
    _, model, tok = tiny
    ids = tok("memory card", return_tensors="pt").input_ids
    with torch.no_grad():
        base = arch.parts(model).decoder(input_ids=ids).last_hidden_state  # already normed
        assert torch.allclose(arch.logits(model, base), model(ids).logits, atol=1e-5)


def test_gemma3_layer_types_alternate(tiny):
    name, model, _ = tiny
    types = arch.layer_types(model)
    assert len(types) == TINY_LAYERS[name]
    if name == "tiny-gemma3":
        assert types[5] == "full_attention" and types[0] == "sliding_attention"
    else:
        assert set(types) == {"full_attention"}


def test_unsupported_architecture_names_class():
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*Supported model types"):
        arch.parts(model)


def test_base_model_without_head_is_rejected(tiny):
    _, model, _ = tiny
    base = AutoModel.from_config(model.config)
    with pytest.raises(NotImplementedError, match="AutoModelForCausalLM"):
        arch.parts(base)


def test_module_without_config_is_rejected():
    with pytest.raises(NotImplementedError, match="has no .config"):
        arch.layers(nn.Linear(2, 2))


def test_capture_states_match_hidden_states_and_hooks_go_away(tiny):
    name, model, tok = tiny
    ids = tok(["a capture test"], return_tensors="pt").input_ids
    L = arch.num_layers(model)
    points = ["resid_pre.0", "resid_post.0", f"resid_pre.{L - 1}", "resid_final", "attn_in.1"]
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states  # [embeddings, after layer 0, ...]
        with arch.capture(model, points) as got:
            arch.run_decoder(model, ids)
    assert torch.equal(got["resid_pre.0"], ref[0]) and torch.equal(got["resid_post.0"], ref[1])
    assert torch.equal(got[f"resid_pre.{L - 1}"], ref[L - 1])
    hidden, kwargs = got["attn_in.1"]
    assert hidden.shape == ref[0].shape and "position_embeddings" in kwargs
    base = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # transformers' own
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) - base  # noqa: E731
    with pytest.raises(RuntimeError, match="boom"), arch.capture(model, points):
        assert n_hooks() == len(points)
        raise RuntimeError("boom")
    assert n_hooks() == 0  # removed after the exception too
    with pytest.raises(ValueError, match=f"resid_pre.{L}.*0..{L - 1}"):
        with arch.capture(model, ["resid_pre.0", f"resid_pre.{L}"]):
            pass
    assert n_hooks() == 0  # a bad name registers nothing


def test_attention_shape_matches_the_modules(tiny):
    _, model, _ = tiny
    heads, head_dim = arch.attention_shape(model)
    attn = arch.attention_module(arch.layers(model)[0])
    assert attn.q_proj.out_features == heads * head_dim and attn.head_dim == head_dim
