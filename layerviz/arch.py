"""The one module that knows model internals.

Everything else in layerviz asks this module for a model's decoder layers,
embedding, final norm and LM head. Supported families: LLaMA, Mistral, Qwen2,
Qwen3 and Gemma3 (text). Anything else raises ``NotImplementedError`` naming
the class: we never guess where a layer stack or a final norm lives (tuned-lens
issue #56 is the cautionary tale of a silently missed final norm).
"""

from __future__ import annotations

import copy
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import numpy as np
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


def _align_hook(module: nn.Module):
    """accelerate's AlignDevicesHook on ``module`` (models dispatched with a ``device_map``), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        if h is not None and hasattr(h, "execution_device"):
            return h
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its dispatch hook's execution device, else the device of its weights."""
    hook = _align_hook(module)
    if hook is not None and hook.execution_device is not None:
        dev = hook.execution_device
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next(chain(module.parameters(), module.buffers())).device


def input_device(model: nn.Module) -> torch.device:
    """The device input ids go to: the embedding's execution device (also for dispatched models)."""
    return execution_device(embedding(model))


@contextmanager
def materialized(module: nn.Module):
    """``module``'s own weights on its execution device for direct use (``module.weight[...]``).

    A module that accelerate offloads (``device_map`` with "cpu" or "disk" entries) keeps its weights on
    the meta device between forwards and loads them in its forward hook; here they are loaded for the
    block and offloaded again on exit. A no-op for every other module, and when already loaded.
    """
    hook = _align_hook(module)
    w = getattr(module, "weight", None)
    if hook is None or not getattr(hook, "offload", False) or w is None or w.device.type != "meta":
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)


def offloaded_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose weights accelerate offloads (on the meta device between forwards)."""
    return [i for i, layer in enumerate(layers(model))
            if any(getattr(_align_hook(m), "offload", False) for m in layer.modules())]


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers currently in the model."""
    return len(parts(model).layers)


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    return int(text_config(model).hidden_size)


def attention_shape(model: nn.Module) -> tuple[int, int]:
    """(query heads, head dimension) of every layer's attention, from the model's config."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    return heads, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


def layer_types(model: nn.Module) -> list[str]:
    """Per-layer attention type: 'full_attention' or 'sliding_attention' (Gemma3 alternates)."""
    config = text_config(model)
    n = num_layers(model)
    types = getattr(config, "layer_types", None)
    if types is None or len(types) != n:
        return ["full_attention"] * n
    return list(types)


# attention implementations that take a custom 4D additive mask (flash-attention kernels do not)
PACKABLE_ATTENTION = ("sdpa", "eager")


def packed_mask_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the packed block mask of ``packed_masks``, or None if it can."""
    impl = getattr(text_config(model), "_attn_implementation", None) or "eager"
    if impl not in PACKABLE_ATTENTION:
        return f"attention implementation {impl!r} takes no custom 4D mask (packable: {', '.join(PACKABLE_ATTENTION)})"
    return None


def sliding_window(model: nn.Module) -> int | None:
    """The window of the sliding-attention layers (Gemma3, Mistral), None when there are none."""
    cfg = text_config(model)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window) if window else None


def packed_masks(model: nn.Module, segment: torch.Tensor, position: torch.Tensor, dtype: torch.dtype):
    """Additive attention masks for rows that pack a shared prefix and independent blocks.

    ``segment`` (B, T): 0 for prefix tokens, b >= 1 for the tokens of block b, -1 for padding.
    ``position`` (B, T): each token's position in its own logical sequence (prefix, then block).
    A token sees the earlier prefix tokens and the earlier tokens of its own block; sliding
    layers also drop keys ``window`` or more positions back. Returns one (B, 1, T, T) mask, or
    a dict by layer type when the model mixes full and sliding layers (what its decoder takes).
    """
    q, k = segment[:, :, None], segment[:, None, :]
    t = segment.shape[1]
    order = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    visible = order & (k >= 0) & ((k == 0) | (k == q))
    visible |= torch.eye(t, dtype=torch.bool, device=segment.device)  # padding rows: never all-masked

    def additive(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(v.shape, dtype=dtype, device=v.device).masked_fill_(~v, torch.finfo(dtype).min)
        return out[:, None]

    window = sliding_window(model)
    if window is None:
        return additive(visible)
    near = visible & (position[:, :, None] - position[:, None, :] < window)
    types = set(layer_types(model))
    if types == {"sliding_attention"} or not getattr(text_config(model), "layer_types", None):
        return additive(near)  # every layer slides (Mistral)
    return {"full_attention": additive(visible), "sliding_attention": additive(near)}


def logits(model: nn.Module, hidden: torch.Tensor, token_ids: list[int] | slice | None = None) -> torch.Tensor:
    """LM-head logits for hidden states taken *after* the final norm (Gemma softcapping applied).

    ``token_ids`` (a list, or a slice of the vocabulary) restricts the projection to those vocabulary
    rows (e.g. Yes/No, or one block of the vocabulary), so no full-vocabulary logits are computed.
    """
    head = lm_head(model)
    if token_ids is None:
        out = head(hidden)
    else:
        with materialized(head):
            bias = head.bias[token_ids] if head.bias is not None else None
            out = torch.nn.functional.linear(hidden.to(head.weight.device), head.weight[token_ids], bias)
    return _softcap(model, out)


def target_logits(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The logit of ``targets[i]`` for post-norm ``hidden[i]``, (n,): one head row per target, no vocabulary."""
    head = lm_head(model)
    with materialized(head):
        dev = head.weight.device
        out = (hidden.to(dev).float() * head.weight[targets.to(dev)].float()).sum(-1)
        if head.bias is not None:
            out = out + head.bias[targets.to(dev)].float()
    return _softcap(model, out)


def _softcap(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _cache_kwarg(decoder: nn.Module) -> str:
    # transformers renamed past_key_values -> cache (5.2x, old name removed in 5.40)

    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_decoder(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, use_cache: bool = False, position_ids: torch.Tensor | None = None):
    """Base-model forward -> (last hidden state *after* the final norm, KV cache or None).

    ``position_ids`` (batch, T) are needed when rows are left-padded: positions then follow the
    real tokens, not the slots of the padded batch.
    """
    decoder = parts(model).decoder
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if cache is not None:
        kwargs[_cache_kwarg(decoder)] = cache
    out = decoder(**kwargs)
    new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.last_hidden_state, new_cache


def layer_signature(model: nn.Module) -> tuple:
    """Identity of the layers currently in the model: changes whenever surgery changes them.

    Layers with a ``version`` (compact models' adapter-carrying layers) add it, so training
    their adapters invalidates results cached under the old signature.
    """
    return tuple((id(layer), getattr(layer, "version", 0)) for layer in layers(model))


def indexed_modules(layer: nn.Module) -> list[nn.Module]:
    """Submodules of a decoder layer that carry ``layer_idx`` (their KV-cache slot)."""
    return [m for m in layer.modules() if hasattr(m, "layer_idx")]


@contextmanager
def layer_index(modules: list[nn.Module], idx: int):
    """Temporarily give a layer's attention the KV-cache slot ``idx`` (shared layers keep theirs)."""
    old = [m.layer_idx for m in modules]
    try:
        for m in modules:
            m.layer_idx = idx
        yield
    finally:
        for m, i in zip(modules, old, strict=True):
            m.layer_idx = i


def assemble(model: nn.Module, new_layers: list[nn.Module], types: list[str] | None = None,
             share: bool = True) -> nn.Module:
    """A new causal LM of ``model``'s class running ``new_layers`` between its embedding and final norm.

    ``new_layers`` are modules with the decoder-layer call signature (e.g. wrappers around
    kept layers). Everything else (embedding, rotary embedding, final norm, LM head) is
    shared with ``model`` when ``share`` is true, otherwise deep-copied (tied weights stay
    tied). The config reports ``len(new_layers)`` layers with per-layer attention ``types``.
    The shell is built on the meta device, so nothing is allocated twice.
    """
    p = parts(model)
    if p.decoder is not getattr(model, "model", None):
        raise NotImplementedError(
            f"{type(model).__name__} nests its text stack (multimodal wrapper); compact models need the "
            "text-only causal LM, e.g. Gemma3ForCausalLM loaded from the text checkpoint."
        )
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(new_layers)
    _set_layer_types(config, types)
    with torch.device("meta"):
        shell = type(model)(config)
    outer = {n: m for n, m in model.named_children() if n != "model"}
    inner = {n: m for n, m in p.decoder.named_children() if n != "layers"}
    if not share:  # one deepcopy call: tied embedding/head stay one tensor
        outer, inner, new_layers = copy.deepcopy((outer, inner, new_layers))
    for n, m in inner.items():
        setattr(shell.model, n, m)
    shell.model.layers = nn.ModuleList(new_layers)
    for n, m in outer.items():
        setattr(shell, n, m)
    shell.generation_config = copy.deepcopy(model.generation_config)
    known = {id(t) for m in (model, *new_layers) for t in chain(m.parameters(), m.buffers())}  # offloaded: meta
    left = [n for n, t in chain(shell.named_parameters(), shell.named_buffers()) if t.is_meta and id(t) not in known
            and not p.embedding.weight.is_meta]
    if left:
        raise NotImplementedError(f"{type(model).__name__}: layerviz does not know where {left[:3]} come from")
    return shell.eval()


def _set_layer_types(config, types: list[str] | None) -> None:
    if types is not None and getattr(config, "layer_types", None) is not None:
        config.layer_types = types


@contextmanager
def keep_layers(model: nn.Module, keep: list[int]):
    """Temporarily run only the decoder layers ``keep`` (ascending); restores the model on exit.

    No weights are copied: the ModuleList is swapped for one holding the same layer
    objects. Each kept attention's ``layer_idx`` is re-indexed so the KV cache works,
    ``config.num_hidden_layers`` reports the new count, and Gemma3's per-layer attention
    types follow their layers. Everything is restored in ``finally``, also after an error.
    """
    p = parts(model)
    n = len(p.layers)
    keep = validate_layers(keep, n)
    config = text_config(model)
    old_types = list(config.layer_types) if getattr(config, "layer_types", None) is not None else None
    old_count, old_list = config.num_hidden_layers, p.layers
    old_idx = [(m, m.layer_idx) for i in keep for m in old_list[i].modules() if hasattr(m, "layer_idx")]
    try:
        p.decoder.layers = nn.ModuleList([old_list[i] for i in keep])
        config.num_hidden_layers = len(keep)
        _set_layer_types(config, [old_types[i] for i in keep] if old_types else None)
        for new, i in enumerate(keep):
            for m in old_list[i].modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new
        yield model
    finally:
        p.decoder.layers = old_list
        config.num_hidden_layers = old_count
        _set_layer_types(config, old_types)
        for m, idx in old_idx:
            m.layer_idx = idx


@contextmanager
def skip_layers(model: nn.Module, skip: list[int]):
    """Temporarily remove the decoder layers ``skip`` (see ``keep_layers``)."""
    n = num_layers(model)
    skip_set = set(validate_layers(skip, n, allow_empty=True))
    with keep_layers(model, [i for i in range(n) if i not in skip_set]) as m:
        yield m


@contextmanager
def resume_at(model: nn.Module, start: int, hidden: torch.Tensor):
    """Run only layers ``start``.. on ``hidden``, the state entering layer ``start`` (shaped like the inputs).

    The embedding's output is replaced by ``hidden`` and the layers before ``start`` are left out
    (``keep_layers``), so a forward computes exactly what the full model computes from layer
    ``start`` on, for the price of the layers it runs. Restored on exit.
    """
    n = num_layers(model)
    if not 0 < start < n:
        raise ValueError(f"resume_at needs 0 < start < {n} (layers left to run), got {start}")
    with keep_layers(model, list(range(start, n))):
        handle = embedding(model).register_forward_hook(lambda _m, _a, _out: hidden)
        try:
            yield model
        finally:
            handle.remove()


def validate_layers(layer_ids, n: int, allow_empty: bool = False) -> list[int]:
    """Check a layer list: ints in [0, n), sorted, no duplicates; raise naming the problem."""
    ids = list(layer_ids)
    if not ids and not allow_empty:
        raise ValueError("the layer list is empty: keep at least one layer")
    bad = [i for i in ids if not isinstance(i, int | np.integer) or not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range for a model with {n} layers (valid: 0..{n - 1})")
    ids = [int(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"layer indices {dup} are duplicated; give each layer once")
    if ids != sorted(ids):
        raise ValueError(f"layer indices {ids} are not in ascending order; sort them (layers run in order)")
    return ids


def mlp_out(layer: nn.Module) -> nn.Module:
    """The MLP's output (down) projection of a decoder layer: where a fold adapter's map is folded (a Linear, or
    a wrapper of one while LoRA is injected)."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear) and not isinstance(getattr(down, "base_layer", None), nn.Linear):
        raise NotImplementedError(f"{type(layer).__name__}: no mlp.down_proj Linear that layerviz knows")
    return down


def mlp_adds_to_stream(model: nn.Module) -> bool:
    """Whether a layer adds its down projection's output to the residual stream as is (Gemma3 normalizes it
    first with post_feedforward_layernorm)."""
    return family(model) != "gemma3"


@contextmanager
def map_output(module: nn.Module, fn):
    """Temporarily replace ``module``'s output y by ``fn(y)`` (a forward hook, removed on exit)."""
    handle = module.register_forward_hook(lambda _m, _a, out: fn(out))
    try:
        yield module
    finally:
        handle.remove()


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention block of a decoder layer."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "head_dim")):
        raise NotImplementedError(f"{type(layer).__name__}: no self_attn with q_proj/k_proj that layerviz knows")
    return attn


def attention_probs(attn: nn.Module, hidden: torch.Tensor, position_embeddings, token_mask: torch.Tensor) -> torch.Tensor:
    """Recompute one layer's attention probabilities (batch, heads, T, T) from its queries and keys.

    Follows the family's own recipe: q/k projection, q_norm/k_norm (Qwen3, Gemma3), its
    rotary embedding, its scaling, logit softcapping (if any), causal + sliding-window +
    padding masks. For statistics only: call under ``torch.no_grad()`` and drop the result.
    """

    b, t, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, t, -1, attn.head_dim)
    k = attn.k_proj(hidden).view(b, t, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    pos = torch.arange(t, device=hidden.device)
    allowed = pos[None, :] <= pos[:, None]  # causal
    window = getattr(attn, "sliding_window", None)
    if window:
        allowed &= (pos[:, None] - pos[None, :]) < window
    allowed = allowed[None, None] & token_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0


def _hook_point(model: nn.Module, name: str):
    """(module, kind) for a capture point name; kind: 'pre' (module input) or 'post' (module output)."""
    n = num_layers(model)
    kind, _, idx = name.partition(".")
    if kind == "resid_final" and not idx:
        return final_norm(model), "pre"
    if kind in ("resid_pre", "resid_post", "attn_in", "mlp_out") and idx.isdigit() and int(idx) < n:
        layer = layers(model)[int(idx)]
        if kind == "mlp_out":
            return mlp_out(layer), "post"
        if kind == "attn_in":
            return attention_module(layer), "attn"
        return layer, "pre" if kind == "resid_pre" else "post"
    raise ValueError(f"unknown capture point {name!r}: use resid_pre.i, resid_post.i, attn_in.i or mlp_out.i with i in "
                     f"0..{n - 1}, or resid_final")


@contextmanager
def capture(model: nn.Module, points: list[str], detach: bool = False, on=None):
    """Capture residual-stream states during forward passes (TransformerLens-style names).

    Points: ``resid_pre.i`` (the hidden state entering layer i), ``resid_post.i`` (leaving layer i),
    ``resid_final`` (entering the final norm), ``mlp_out.i`` (layer i's MLP down-projection output) and ``attn_in.i`` (layer i's attention module input, as
    ``(hidden_states, kwargs)``). Yields a dict that holds, per point, the state of the latest forward
    pass; with ``on``, each state is passed to ``on(name, state)`` as it is produced instead (streaming).
    ``detach`` cuts states from the autograd graph. Every hook is removed on exit, also after an exception.
    """
    caught: dict = {}
    where = [(name, *_hook_point(model, name)) for name in points]  # every name checked before any hook

    def emit(name, value):
        if detach:
            value = value.detach() if torch.is_tensor(value) else (value[0].detach(), value[1])
        if on is not None:
            on(name, value)
        else:
            caught[name] = value

    def make(name, kind):
        if kind == "post":
            return lambda _m, _a, _k, out: emit(name, out[0] if isinstance(out, tuple) else out)
        if kind == "attn":
            return lambda _m, args, kwargs: emit(name, (kwargs.get("hidden_states", args[0] if args else None),
                                                        kwargs))
        return lambda _m, args, kwargs: emit(name, args[0] if args else kwargs["hidden_states"])

    handles = []
    try:
        for name, module, kind in where:
            register = module.register_forward_hook if kind == "post" else module.register_forward_pre_hook
            handles.append(register(make(name, kind), with_kwargs=True))
        yield caught
    finally:
        for h in handles:
            h.remove()
