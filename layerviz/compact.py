"""RQ3: a real compact model that runs only the kept layers, joined by adapters.

``build_compact(model, layers)`` returns a ``CompactLM``: the embedding, the kept decoder
layers in order (each behind the adapter of the gap before it), the final norm and the LM
head. It is a HF causal LM inside (``forward``, ``generate`` and the KV cache work; each kept
layer's attention uses its new cache slot; Gemma3's per-layer attention types follow their
layers; ``config.num_hidden_layers`` is k), so the scorers accept it unchanged.

By default it shares the base model's weights (no copy; the base model itself is never
modified). ``save``/``load_compact`` keep the layer list, the adapter specs and weights
(safetensors) and a manifest naming the base model; ``export_hf`` writes a plain HF folder
that transformers loads without layerviz (only when no adapters are used).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layerviz import arch, metrics, store
from layerviz.adapters import (
    Adapter,
    AdapterPolicy,
    AdapterSpec,
    TrainConfig,
    plan,
    train_adapters,
)
from layerviz.data import load
from layerviz.errors import NonFiniteLossError
from layerviz.evaluate import task_evaluator
from layerviz.importance import build_calibration
from layerviz.models import load_model
from layerviz.settings import Settings

FORMAT_VERSION = 1


class KeptLayer(nn.Module):
    """A kept decoder layer run at position ``index``, behind the adapter of the gap before it.

    The last kept layer also carries the tail adapter (``after``). Attributes the decoder
    reads from its layers (``attention_type``, ``self_attn``, ...) fall through to the layer.
    """

    def __init__(self, layer: nn.Module, index: int, before: Adapter, after: Adapter | None = None):
        super().__init__()
        self.layer, self.before, self.index = layer, before, index
        self.after = after

    @property
    def version(self) -> int:
        """Changes whenever an adapter weight changes (in-place updates bump tensor versions)."""
        return sum(p._version for a in (self.before, self.after) if a is not None for p in a.parameters())

    def forward(self, hidden_states, *args, **kwargs):
        h = self.before(hidden_states)
        with arch.layer_index(arch.indexed_modules(self.layer), self.index):
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


def fingerprint(model: nn.Module) -> str:
    """Identity of a base model: its shapes plus a dtype-robust sample of every weight (16 hex)."""
    cfg = arch.text_config(model)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    h = hashlib.sha256(json.dumps({k: getattr(cfg, k, None) for k in keys}, sort_keys=True).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        if not p.is_meta:  # 2 significant digits survive fp32 -> bf16
            h.update(" ".join(f"{v:.2g}" for v in p.detach().flatten()[:8].float().tolist()).encode())
    return h.hexdigest()[:16]


class CompactLM(nn.Module):
    """k kept layers of a base model joined by adapters; behaves like a HF causal LM."""

    def __init__(self, hf: nn.Module, layers: list[int], specs: list[AdapterSpec], base: dict):
        super().__init__()
        self.hf = hf
        self.kept_layers, self.specs, self.base = list(layers), list(specs), dict(base)

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
        kept = list(arch.layers(self))
        out = [k.before for k in kept]
        return out + ([kept[-1].after] if kept[-1].after is not None else [])

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
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write layers, adapter specs, adapter weights (safetensors) and a manifest naming the base."""

        folder = _fresh_dir(folder, overwrite)
        weights = {f"{j}.{n}": t.detach().contiguous().cpu() for j, a in enumerate(self.adapters())
                   for n, t in a.state_dict().items()}
        store.atomic_write(folder / "adapters.safetensors", lambda tmp: save_file(weights, tmp))
        store.write_json(folder / "compact.json", {
            "format": FORMAT_VERSION, "layers": self.kept_layers, "n_base_layers": self.n_base_layers,
            "specs": [asdict(s) for s in self.specs], "base": self.base, "versions": store.versions()})
        return folder

    def export_hf(self, folder: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
        """Write a plain HF model folder (num_hidden_layers = k) that loads without layerviz."""
        if self.has_adapters():
            kinds = sorted({a.kind for a in self.adapters()} - {"identity"})
            raise ValueError(
                f"this compact model uses {', '.join(kinds)} adapters, which a plain transformers model "
                "cannot represent: keep it with compact.save(folder) and load it with "
                "layerviz.load_compact(folder, base=...), or build it with adapters='identity' "
                "(plain layer dropping) to export it."
            )
        folder = _fresh_dir(folder, overwrite)
        raw = [k.layer for k in arch.layers(self)]
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
        return plan(layers, n, adapters)
    if isinstance(adapters, str):
        return plan(layers, n, AdapterPolicy(force=adapters))
    specs = [s if isinstance(s, AdapterSpec) else AdapterSpec(**s) for s in adapters]
    ends = [-1, *layers, n]
    with_tail, without = list(zip(ends[:-1], ends[1:], strict=True)), list(zip(ends[:-2], ends[1:-1], strict=True))
    if [(s.prev, s.next) for s in specs] not in (with_tail, without):
        raise ValueError("the adapter specs do not match the kept layers: one spec per gap, in order")
    return specs


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
    kept = [KeptLayer(base_layers[i], j, mods[j]) for j, i in enumerate(layers)]
    if len(specs) > len(layers):
        kept[-1].after = mods[-1]
    types = arch.layer_types(model)
    hf = arch.assemble(model, kept, [types[i] for i in layers], share=share)
    base = {"source": getattr(model, "layerviz_source", None) or getattr(model.config, "_name_or_path", ""),
            "class": type(model).__name__, "family": arch.family(model), "n_layers": n,
            "n_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "fingerprint": fingerprint(model)}
    return CompactLM(hf, layers, specs, base)


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
    compact = build_compact(base, meta["layers"], [AdapterSpec(**s) for s in meta["specs"]], share=share)
    weights = load_file(str(folder / "adapters.safetensors"), device=str(compact.device))
    for j, a in enumerate(compact.adapters()):
        a.load_state_dict({k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == str(j)})
    return compact


# ----------------------------------------------------------------------------- the study stage


@dataclass
class AdaptConfig(Settings):
    """What decides an adapter run (shared by `layerviz adapt`, `layerviz run` configs and notebooks)."""

    layers: list[int] | None = None
    """Kept layers (ascending); or give ``selection``."""
    selection: str | None = None
    """A selection.json from `layerviz select --out` (its ``layers``)."""
    policy: dict = field(default_factory=dict)
    """Overrides of AdapterPolicy (rank, force, linear_max_gap, boundary, embedding, tail)."""
    train: dict = field(default_factory=dict)
    """Overrides of TrainConfig (init, stage1_epochs, stage2_epochs, lr, reg, ...)."""
    samples: int = 64
    """Calibration prompts (validation targets of seeded users) for training; a share is held out."""
    users: int = 100
    """Test users for the NDCG@10 retention (1 + negatives candidates each)."""
    calibration: str = "auto"
    """Likelihood calibration of the retention NDCG: 'auto' (chosen on validation users), 'none' or 'pmi'."""

    def kept(self, n_layers: int) -> list[int]:
        """The layer list from ``layers`` or ``selection`` (checked against the model)."""
        if (self.layers is None) == (self.selection is None):
            raise ValueError("give exactly one of layers (e.g. 0,3,7) or selection (a selection.json)")
        if self.selection is not None:
            path = Path(self.selection)
            if path.is_dir():
                path = path / "selection.json"
            if not path.exists():
                raise FileNotFoundError(f"no selection file {path}; write one with `layerviz select --out DIR`")
            sel = json.loads(path.read_text())
            if sel.get("n_layers") not in (None, n_layers):
                raise ValueError(f"{path} selects from {sel['n_layers']} layers but the model has {n_layers}")
            return arch.validate_layers(sel["layers"], n_layers)
        return arch.validate_layers(self.layers, n_layers)


class _Retention:
    """``train_adapters``' on_stage callback: each stage's NDCG@5/@10 on the test users (or the caller's
    ``given`` scores of that stage), with CIs and the retention against the full model -> ``rows``."""

    def __init__(self, evaluator, compact, full: pd.DataFrame, given: dict, seed: int, report):
        self.evaluator, self.compact, self.full, self.given, self.seed, self.report = (
            evaluator, compact, full, given, seed, report)
        self.rows: list[dict] = []
        self.per_user = {f"full:{m}": full[m].to_numpy() for m in ("ndcg@5", "ndcg@10")}

    def __call__(self, stage: str, mse: float, nmse: float, seconds: float) -> None:
        got = self.given[stage] if stage in self.given else self.evaluator.metrics(self.compact)
        row = {"stage": stage, "val_mse": mse, "val_nmse": nmse, "train_seconds": seconds}
        for m in ("ndcg@5", "ndcg@10"):
            self.per_user[f"{stage}:{m}"] = got[m].to_numpy()
            mean, lo, hi = metrics.bootstrap_ci(got[m], seed=self.seed)
            r, rlo, rhi = metrics.ratio_ci(got[m], self.full[m], seed=self.seed)
            suffix = "" if m == "ndcg@10" else "@5"
            row.update({m: mean, f"{m}_low": lo, f"{m}_high": hi, f"retention{suffix}": r,
                        f"retention{suffix}_low": rlo, f"retention{suffix}_high": rhi})
        self.rows.append(row)
        if self.report:
            self.report(f"  {stage:>6}: val MSE {mse:.4g} (relative {nmse:.3f}), NDCG@10 {row['ndcg@10']:.4f}, "
                        f"retention {row['retention']:.3f} [{row['retention_low']:.3f}, {row['retention_high']:.3f}]")


def _adapt(cfg: AdaptConfig, policy: AdapterPolicy, tcfg: TrainConfig, prep, model, tokenizer, folder: Path,
           given: dict, report) -> tuple[dict, CompactLM]:
    """The adapters trained on ``cfg``'s layers and measured (``run_adapt``'s work) -> (outputs, compact model).
    A non-finite loss saves the last good adapters first, then raises."""
    layers = cfg.kept(arch.num_layers(model))
    cal = build_calibration(prep, tokenizer, cfg.samples, "valid", "likelihood", cfg.max_title_tokens, cfg.seed)
    evaluator, _ = task_evaluator(cfg, prep, model, tokenizer, cfg.users, "test", cfg.calibration)
    full = given["full"] if "full" in given else evaluator.metrics(model)
    compact = build_compact(model, layers, policy, seed=cfg.seed)
    retention, error = _Retention(evaluator, compact, full, given, cfg.seed, report), None
    try:
        curve = train_adapters(compact, model, cal, tcfg, pad=tokenizer.pad_token_id, report=None,
                               on_stage=retention)
    except NonFiniteLossError as e:
        error, curve = e, pd.DataFrame()
    compact.save(folder / "compact", overwrite=True)
    if error is not None:
        raise NonFiniteLossError(f"{error} The last good adapters are saved in {folder / 'compact'}.") from error
    full_mean, flo, fhi = metrics.bootstrap_ci(full["ndcg@10"], seed=cfg.seed)
    summary = {"model": cfg.model, "layers": layers, "k": len(layers), "n_layers": compact.n_base_layers,
               "full_ndcg@10": full_mean, "full_ndcg@10_low": flo, "full_ndcg@10_high": fhi,
               "full_ndcg@5": float(full["ndcg@5"].mean()),
               "chance_ndcg@10": metrics.chance(cfg.negatives + 1)["ndcg@10"],
               "train_seconds": curve.attrs.get("train_seconds", float("nan")),
               "calibration": evaluator.cfg.calibration, **compact.overhead()}
    return {"summary": summary, "retention": pd.DataFrame(retention.rows), "curve": curve,
            "placement": compact.placement(),
            "per_user": pd.DataFrame({k: np.asarray(v) for k, v in retention.per_user.items()})}, compact


def run_adapt(cfg: AdaptConfig, out: str | Path | None = None, model=None, tokenizer=None, use_cache: bool = True,
              report=print, measured: dict[str, pd.DataFrame] | None = None) -> dict:
    """Build, train and evaluate a compact model; write it and its tables to ``out`` -> summary dict.

    Retention (compact / full NDCG@10 on the test users, paired bootstrap CI) and the
    validation MSE of the pre-norm final hidden state are measured before training (plain
    layer dropping), after stage 1 and after stage 2. ``measured`` may hold the per-user ``ndcg@5`` and
    ``ndcg@10`` of the full model ("full") and of plain dropping ("drop") that the caller already scored
    on these test users with this calibration: they are used instead of scoring them again.
    """
    policy, tcfg = AdapterPolicy(**cfg.policy), TrainConfig(**{"seed": cfg.seed, **cfg.train})  # bad input: now
    prep = load(cfg.dataset, cfg.format, cfg.prep_config(), report=report)
    key = store.config_hash("adapt", {k: v for k, v in asdict(cfg).items() if k != "results_dir"},
                            prep.fingerprint, store.versions()["layerviz"])
    folder = Path(out) if out else Path(cfg.results_dir) / "adapt" / f"{cfg.model.replace('/', '_')}-{key}"
    made = {}

    def compute(folder: Path) -> dict:
        nonlocal model, tokenizer
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        outputs, made["compact"] = _adapt(cfg, policy, tcfg, prep, model, tokenizer, folder, measured or {}, report)
        return outputs

    out, was_cached = store.cached(folder, key, compute, use_cache, marker="manifest.json",
                                   meta={"config": asdict(cfg), "seed": cfg.seed, "data_fingerprint": prep.fingerprint})
    if was_cached and report:
        report(f"adapt: loaded cached results from {folder}")
    return {**out, "folder": folder, "compact": made.get("compact")}


def load_adapt(folder: str | Path) -> dict:
    """Read the tables of a finished adapter run (the compact model itself: load_compact)."""
    folder = Path(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return {**store.read_outputs(folder, files), "folder": folder, "compact": None}
