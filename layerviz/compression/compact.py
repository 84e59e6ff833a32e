"""RQ3: a real compact model that runs only the kept layers, joined by adapters.

``build_compact(model, layers)`` returns a ``CompactLM``: the embedding, the kept decoder
layers in order (each behind the adapter of the gap before it), the final norm and the LM
head. It is a HF causal LM inside (``forward``, ``generate`` and the KV cache work; each kept
layer's attention uses its new cache slot; Gemma3's per-layer attention types follow their
layers; ``config.num_hidden_layers`` is k), so the scorers accept it unchanged.

By default it shares the base model's weights (no copy; the base model itself is never
modified). ``save``/``load_compact`` keep the layer list, the adapter specs and weights
(safetensors), the weights healing changed, and a manifest naming the base model; ``export_hf``
writes a plain HF folder that transformers loads without layerviz (fold adapters folded into their
block's down projection; adapters on the residual stream refuse). Training and measuring a compact
model: ``layerviz.compression.retention``.
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layerviz import arch, store
from layerviz.compression.adapters import Adapter, AdapterSpec, place_adapters
from layerviz.compression.config import AdapterPolicy
from layerviz.models import fingerprint

FORMAT_VERSION = 1


class KeptLayer(nn.Module):
    """A kept decoder layer run at position ``index``, behind the adapter of the gap before it.

    The last kept layer also carries the tail adapter (``after``); ``fold`` maps the layer's MLP output (the
    fold adapter of the gap after it). Attributes the decoder reads from its layers (``attention_type``,
    ``self_attn``, ...) fall through to the layer.
    """

    def __init__(self, layer: nn.Module, index: int, before: Adapter, after: Adapter | None = None,
                 fold: Adapter | None = None):
        super().__init__()
        self.layer, self.before, self.index = layer, before, index
        self.after, self.fold = after, fold

    @property
    def version(self) -> int:
        """Changes whenever an adapter weight changes (in-place updates bump tensor versions)."""
        mods = (self.before, self.after, self.fold)
        return sum(p._version for a in mods if a is not None for p in a.parameters())

    def forward(self, hidden_states, *args, **kwargs):
        h = self.before(hidden_states)
        with arch.layer_index(arch.indexed_modules(self.layer), self.index), (
                arch.map_output(arch.mlp_out(self.layer), self.fold) if self.fold is not None else nullcontext()):
            out = self.layer(h, *args, **kwargs)
        if self.after is not None:
            out = (self.after(out[0]), *out[1:]) if isinstance(out, tuple) else self.after(out)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["layer"], name)


class CompactLM(nn.Module):
    """k kept layers of a base model joined by adapters; behaves like a HF causal LM."""

    def __init__(self, hf: nn.Module, layers: list[int], specs: list[AdapterSpec], base: dict,
                 gaps: list[Adapter]):
        super().__init__()
        self.hf = hf
        self.kept_layers, self.specs, self.base = list(layers), list(specs), dict(base)
        self.__dict__["_gaps"] = list(gaps)  # the same modules as the kept layers hold (not registered twice)

    # -- what layerviz.arch and the scorers read
    @property
    def config(self):
        return self.hf.config

    @property
    def model(self):
        return self.hf.model

    @property
    def lm_head(self):
        return self.hf.lm_head

    @property
    def generation_config(self):
        return self.hf.generation_config

    @property
    def device(self) -> torch.device:
        return arch.input_device(self)

    @property
    def n_base_layers(self) -> int:
        return int(self.base["n_layers"])

    def forward(self, *args, **kwargs):
        return self.hf(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.hf.generate(*args, **kwargs)

    def adapters(self) -> list[Adapter]:
        """One adapter per gap, in the order of ``specs`` (the tail one last)."""
        return list(self.__dict__["_gaps"])

    def has_adapters(self) -> bool:
        return any(a.kind != "identity" for a in self.adapters())

    def placement(self) -> pd.DataFrame:
        """One row per gap: ends, skipped layers, kind, rank, reason, parameters, FLOPs per token."""
        rows = [{**asdict(s), "gap": s.label, "params": a.n_params(), "flops_per_token": a.flops_per_token()}
                for s, a in zip(self.specs, self.adapters(), strict=True)]
        return pd.DataFrame(rows)

    def overhead(self) -> dict:
        """Adapter parameters and FLOPs per token, absolute and in % of the base / kept layers / compact model.

        FLOPs count weight matmuls (2 per multiply-add) per token; attention-score terms, which
        grow with the context and are the same with or without adapters, are left out.
        """
        adapters = sum(a.n_params() for a in self.adapters())
        flops = sum(a.flops_per_token() for a in self.adapters())
        kept = sum(p.numel() for k in arch.layers(self) for p in k.layer.parameters())
        head = arch.lm_head(self).weight.numel()
        compact_flops = 2 * (kept + head)
        return {"adapter_params": adapters, "base_params": self.base["n_params"], "kept_layer_params": kept,
                "params_pct_of_base": 100 * adapters / self.base["n_params"],
                "params_pct_of_kept_layers": 100 * adapters / kept,
                "adapter_flops_per_token": flops, "compact_flops_per_token": compact_flops,
                "flops_pct": 100 * flops / compact_flops}

    # -- persistence
    def healed_state(self) -> dict[str, torch.Tensor]:
        """The weights healing changed (``base['healed']`` names the modules), adapters left out: what ``save``
        keeps besides the adapters."""
        prefixes = tuple(self.base.get("healed", []))
        return {k: v.detach().clone().contiguous().cpu() for k, v in self.hf.state_dict().items()
                if k.startswith(prefixes) and not any(f".{a}." in k for a in ("before", "after", "fold"))}

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write layers, adapter specs, adapter weights (safetensors) and a manifest naming the base."""

        folder = _fresh_dir(folder, overwrite)
        weights = {f"{j}.{n}": t.detach().contiguous().cpu() for j, a in enumerate(self.adapters())
                   for n, t in a.state_dict().items()}
        store.atomic_write(folder / "adapters.safetensors", lambda tmp: save_file(weights, tmp))
        if self.base.get("healed"):
            healed = self.healed_state()
            store.atomic_write(folder / "weights.safetensors", lambda tmp: save_file(healed, tmp))
        store.write_json(folder / "compact.json", {
            "format": FORMAT_VERSION, "layers": self.kept_layers, "n_base_layers": self.n_base_layers,
            "specs": [asdict(s) for s in self.specs], "base": self.base, "versions": store.versions()})
        return folder

    def export_hf(self, folder: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
        """Write a plain HF model folder (num_hidden_layers = k, kept layers renumbered, their attention types
        kept) that loads without layerviz. Fold adapters are folded into their block's down projection (no
        added parameters); an adapter on the residual stream has no standard form and refuses."""
        stuck = [f"{s.label} ({s.kind}{'' if s.rank is None else f', rank {s.rank}'})"
                 for s, a in zip(self.specs, self.adapters(), strict=True) if a.kind not in ("identity", "fold")]
        if stuck:
            raise ValueError(
                f"cannot export: the adapters of gaps {', '.join(stuck)} act on the residual stream, which no standard "
                "decoder layer computes, so they cannot be folded into its weights. Build the compact model with "
                "policy force='fold' (a linear map on the previous block's MLP output, folded into down_proj) or "
                "'identity' (plain dropping) to export it; keep this one with compact.save(folder) and "
                "layerviz.load_compact(folder, base=...)."
            )
        folder = _fresh_dir(folder, overwrite)
        raw = []
        for kept in arch.layers(self):
            layer = kept.layer
            if kept.fold is not None:  # W_down <- T W_down on a copy: the shared base layer stays as it is
                layer = copy.deepcopy(layer)
                kept.fold.fold_into(arch.mlp_out(layer))
            raw.append(layer)
        plain = arch.assemble(self.hf, raw, arch.layer_types(self), share=True)
        plain.config.architectures = [type(self.hf).__name__]
        plain.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return folder


def _fresh_dir(folder: str | Path, overwrite: bool) -> Path:
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; choose a new folder or pass overwrite=True")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _resolve_specs(adapters, layers: list[int], n: int) -> list[AdapterSpec]:
    if adapters is None or isinstance(adapters, AdapterPolicy):
        return place_adapters(layers, n, adapters)
    if isinstance(adapters, str):
        return place_adapters(layers, n, AdapterPolicy(force=adapters))
    specs = [s if isinstance(s, AdapterSpec) else AdapterSpec(**s) for s in adapters]
    ends = [-1, *layers, n]
    with_tail, without = list(zip(ends[:-1], ends[1:], strict=True)), list(zip(ends[:-2], ends[1:-1], strict=True))
    if [(s.prev, s.next) for s in specs] not in (with_tail, without):
        raise ValueError("the adapter specs do not match the kept layers: one spec per gap, in order")
    return specs


def _gap_modules(kept: list[KeptLayer], specs: list[AdapterSpec]) -> list[Adapter]:
    """Each gap's adapter where ``build_compact`` placed it (after a copy, the copies)."""
    return [kept[j - 1].fold if s.kind == "fold" else kept[j].before if j < len(kept) else kept[-1].after
            for j, s in enumerate(specs)]


def build_compact(model: nn.Module, layers: list[int], adapters: AdapterPolicy | str | list | None = None,
                  share: bool = True, seed: int = 0) -> CompactLM:
    """Compact model keeping ``layers`` (ascending) of ``model``, joined by adapters.

    ``adapters``: an AdapterPolicy (default: the paper's policy, rank 64), one kind for every
    gap ('identity', 'linear', 'residual', 'mlp'), or a list of AdapterSpec. ``share``: reuse
    the base weights (default) or copy them into a standalone model. At initialisation every
    adapter is the identity, so the compact model computes plain layer dropping.
    """
    if isinstance(model, CompactLM):
        raise ValueError("build_compact takes the base model, not a compact one")
    n = arch.num_layers(model)
    layers = arch.validate_layers(layers, n)
    specs = _resolve_specs(adapters, layers, n)
    d, dev = arch.hidden_size(model), arch.input_device(model)
    mods = [Adapter(s.kind, d, s.rank, device=dev, seed=seed + j) for j, s in enumerate(specs)]
    base_layers = arch.layers(model)
    kept = [KeptLayer(base_layers[i], j, Adapter("identity", d)) for j, i in enumerate(layers)]
    for j, (spec, mod) in enumerate(zip(specs, mods, strict=True)):  # gap j lies before kept layer j (tail: after)
        if spec.kind == "fold":  # on the MLP output of the kept block before the gap
            if j == 0:
                raise ValueError("a fold adapter needs a kept block before its gap; the gap before the first kept "
                                 "layer cannot have one (use identity there, as policy force='fold' does)")
            kept[j - 1].fold = mod
        elif j < len(layers):
            kept[j].before = mod
        else:
            kept[-1].after = mod
    types = arch.layer_types(model)
    hf = arch.assemble(model, kept, [types[i] for i in layers], share=share)
    base = {"source": getattr(model, "layerviz_source", None) or getattr(model.config, "_name_or_path", ""),
            "class": type(model).__name__, "family": arch.family(model), "n_layers": n,
            "n_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "fingerprint": fingerprint(model), "shared": share}
    return CompactLM(hf, layers, specs, base, _gap_modules(list(arch.layers(hf)), specs))


def load_compact(folder: str | Path, base: nn.Module, share: bool = True) -> CompactLM:
    """Rebuild a saved compact model on ``base``; a different base model raises."""
    folder = Path(folder)
    meta_path = folder / "compact.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} holds no compact model (no compact.json); save one with compact.save(folder)")
    meta = json.loads(meta_path.read_text())
    want, have = meta["base"], {"class": type(base).__name__, "n_layers": arch.num_layers(base),
                                "fingerprint": fingerprint(base)}
    diff = [k for k in have if want.get(k) != have[k]]
    if diff:
        raise ValueError(
            f"{folder} was built on {want.get('source')!r} ({want.get('class')}, {want.get('n_layers')} layers, "
            f"fingerprint {want.get('fingerprint')}); the base model given differs in {', '.join(diff)} "
            f"({have}). Load the same base model it was trained on."
        )
    healed = meta["base"].get("healed")
    compact = build_compact(base, meta["layers"], [AdapterSpec(**s) for s in meta["specs"]],
                            share=share and not healed)
    if healed:  # healing changed these weights of the base: the compact model holds its own copy
        got = load_file(str(folder / "weights.safetensors"), device=str(compact.device))
        missing, unexpected = compact.hf.load_state_dict(got, strict=False)
        if unexpected:
            raise ValueError(f"{folder}/weights.safetensors holds weights this model lacks: {unexpected[:3]}")
        compact.base["healed"] = healed
    weights = load_file(str(folder / "adapters.safetensors"), device=str(compact.device))
    for j, a in enumerate(compact.adapters()):
        a.load_state_dict({k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == str(j)})
    return compact
