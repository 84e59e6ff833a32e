"""The one module that knows model internals.

Everything else in layerviz asks this module for a model's decoder layers,
embedding, final norm and LM head. Supported families: LLaMA, Mistral, Qwen2,
Qwen3 and Gemma3 (text). Anything else raises ``NotImplementedError`` naming
the class: we never guess where a layer stack or a final norm lives (tuned-lens
issue #56 is the cautionary tale of a silently missed final norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# config.model_type -> family name. Gemma3's multimodal wrapper has model_type
# "gemma3" and keeps its text stack under .model.language_model.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


@dataclass(frozen=True)
class Parts:
    """Where the pieces of a decoder-only LM live."""

    family: str
    decoder: nn.Module  # the base model: embed_tokens, layers, norm
    layers: nn.ModuleList
    embedding: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values layerviz can work with."""
    return sorted(FAMILIES)


def check_supported(config, class_name: str | None = None) -> str:
    """Return the family of a HF config, or raise naming the class and what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        arch = class_name or ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise NotImplementedError(
            f"layerviz does not support the architecture {arch!r} (model_type={model_type!r}). "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "To add one, teach layerviz/arch.py where its layers, final norm and LM head live."
        )
    return FAMILIES[model_type]


def parts(model: nn.Module) -> Parts:
    """Locate the decoder layers, embedding, final norm and LM head of ``model``."""
    config = getattr(model, "config", None)
    if config is None:
        raise NotImplementedError(
            f"{type(model).__name__} has no .config; layerviz needs a HF causal LM "
            "(e.g. LlamaForCausalLM) from layerviz.load_model or transformers."
        )
    family = check_supported(config, type(model).__name__)
    decoder = getattr(model, "model", None)
    if decoder is not None and hasattr(decoder, "language_model"):  # Gemma3 multimodal
        decoder = decoder.language_model
    lm_head = getattr(model, "lm_head", None)
    if decoder is None or lm_head is None or not all(
        hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm")
    ):
        raise NotImplementedError(
            f"{type(model).__name__} (model_type={config.model_type!r}) is not a causal LM layout "
            "layerviz knows: expected .model.{embed_tokens,layers,norm} and .lm_head. "
            "Load it with AutoModelForCausalLM, not AutoModel."
        )
    return Parts(family, decoder, decoder.layers, decoder.embed_tokens, decoder.norm, lm_head)


def text_config(model: nn.Module):
    """The text config (Gemma3 multimodal nests it under ``text_config``)."""
    config = model.config
    return getattr(config, "text_config", None) or config


def family(model: nn.Module) -> str:
    """Family name: llama, mistral, qwen2, qwen3 or gemma3."""
    return parts(model).family


def layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in order."""
    return parts(model).layers


def embedding(model: nn.Module) -> nn.Embedding:
    """The input token embedding."""
    return parts(model).embedding


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer, before the LM head."""
    return parts(model).final_norm


def lm_head(model: nn.Module) -> nn.Linear:
    """The output projection to the vocabulary."""
    return parts(model).lm_head


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers currently in the model."""
    return len(parts(model).layers)


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    return int(text_config(model).hidden_size)


def layer_types(model: nn.Module) -> list[str]:
    """Per-layer attention type: 'full_attention' or 'sliding_attention' (Gemma3 alternates)."""
    config = text_config(model)
    n = num_layers(model)
    types = getattr(config, "layer_types", None)
    if types is None or len(types) != n:
        return ["full_attention"] * n
    return list(types)


def logits(model: nn.Module, hidden: torch.Tensor, token_ids: list[int] | None = None) -> torch.Tensor:
    """LM-head logits for hidden states taken *after* the final norm (Gemma softcapping applied).

    ``token_ids`` restricts the projection to those vocabulary rows (e.g. Yes/No), so no
    full-vocabulary logits are ever computed for them.
    """
    head = lm_head(model)
    if token_ids is None:
        out = head(hidden)
    else:
        bias = head.bias[token_ids] if head.bias is not None else None
        out = torch.nn.functional.linear(hidden, head.weight[token_ids], bias)
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        out = torch.tanh(out / cap) * cap
    return out


def _cache_kwarg(decoder: nn.Module) -> str:
    # transformers renamed past_key_values -> cache (5.2x, old name removed in 5.40)
    import inspect

    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_decoder(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, use_cache: bool = False):
    """Base-model forward -> (last hidden state *after* the final norm, KV cache or None)."""
    decoder = parts(model).decoder
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
    if cache is not None:
        kwargs[_cache_kwarg(decoder)] = cache
    out = decoder(**kwargs)
    new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.last_hidden_state, new_cache
