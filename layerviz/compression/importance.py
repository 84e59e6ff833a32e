"""RQ1: per-layer importance from several criteria in ONE forward+backward pass, plus ablation.

Criteria (one tidy row per layer and criterion; ``normalized`` is in [0, 1], higher =
more important after applying each criterion's direction):

* ``fisher_sum`` / ``fisher_mean``: diagonal empirical Fisher, mean over samples of
  sum (dL/dtheta)^2 over the layer's parameters (and per parameter). Gradients are
  squared and freed in ``register_post_accumulate_grad_hook``: no full gradient is kept.
  Exact per sample with ``batch_size=1``; larger batches use mini-batch gradients.
* ``attn_entropy``: mean attention entropy (nats) over heads and query positions.
* ``attn_item_mass``: share of the last prompt position's attention on item-title tokens
  (the rest goes to template tokens); ``attn_item_share`` is the share of item tokens
  among the visible keys, the uniform-attention reference.
* ``block_influence`` (ShortGPT): 1 - cos(h_in, h_out), mean over tokens.
* ``angular_distance`` (Gromov et al.): arccos(cos(h_in, h_out)) / pi, mean over tokens.
* ``norm_ratio``: ||h_out|| / ||h_in||; ``kurtosis``: excess kurtosis of h_out over hidden units.
* ablation ground truth: ``ablation_ndcg`` (drop of validation NDCG@10 when the layer is
  skipped) and ``ablation_loss`` (rise of the probe loss), via ``arch.skip_layers``.
* ``fused``: weighted mean of normalized criteria (min-max or rank normalization). The weights are
  fixed (``DEFAULT_FUSION``, equal) or ``"fit"``: fitted on the validation probe prompts against the
  loss ablation (``fit_fusion``), and then judged by a two-fold cross-fit so that its validity is not in-sample.

Each layer's own input and output come from forward hooks (HF ``hidden_states[-1]`` is after
the final norm). Attention statistics are recomputed from the layer's queries and keys under
``no_grad`` and discarded at once: ``output_attentions=True`` is never used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr

from layerviz import arch, parallel, passes, store
from layerviz.compression.config import DEFAULT_FUSION, ImportanceConfig
from layerviz.data import load
from layerviz.data.prompts import ProbePrompt, ProbeSet, build_probes
from layerviz.depth import depth
from layerviz.errors import NonFiniteLossError
from layerviz.evaluate import task_evaluator
from layerviz.models import load_model
from layerviz.progress import progress
from layerviz.scoring import token_logprobs

HOOK_CRITERIA = ["fisher_sum", "fisher_mean", "attn_entropy", "attn_item_mass", "attn_item_share",
                 "block_influence", "angular_distance", "norm_ratio", "kurtosis"]
ABLATION_CRITERIA = ["ablation_ndcg", "ablation_loss"]
# +1: a larger value means a more important layer; -1: a smaller value does; 0: descriptive only
DIRECTION = {"fisher_sum": 1, "fisher_mean": 1, "attn_entropy": -1, "attn_item_mass": 1,
             "attn_item_share": 0, "block_influence": 1, "angular_distance": 1, "norm_ratio": 1,
             "kurtosis": 1, "ablation_ndcg": 1, "ablation_loss": 1, "fused": 1}

FIT_STEP = 0.1
"""Grid step of fitted fusion weights (non-negative, summing to 1): 66 weightings of the three default criteria."""


def probe_batch(cal: ProbeSet, idx: list[int], pad: int, device):
    """Examples ``idx`` of a probe set, right-padded -> (examples, input ids, attention mask, item mask)."""
    exs = [cal.examples[i] for i in idx]
    t = max(len(e.ids) for e in exs)
    ids = torch.full((len(exs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(exs), t), dtype=torch.long)
    item = torch.zeros((len(exs), t), dtype=torch.bool)
    for r, e in enumerate(exs):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        mask[r, : len(e.ids)] = 1
        item[r, : len(e.ids)] = torch.tensor(e.item_mask)
    return exs, ids.to(device), mask.to(device), item.to(device)


def _query_positions(cal: ProbeSet, exs: list[ProbePrompt]) -> list[int]:
    """The position whose output is scored: before the target title, or the answer position."""
    return [len(e.ids) - e.n_target - 1 if cal.loss == "likelihood" else len(e.ids) - 1 for e in exs]


def per_sample_loss(model, cal: ProbeSet, exs, ids, mask) -> torch.Tensor:
    """Recommendation loss per example: title NLL (mean over its tokens) or Yes/No cross-entropy."""
    hidden, _ = arch.run_decoder(model, ids, mask)
    if cal.loss == "likelihood":
        row = torch.tensor([r for r, e in enumerate(exs) for _ in range(e.n_target)], device=ids.device)
        pos = torch.tensor([p for e in exs for p in range(len(e.ids) - e.n_target - 1, len(e.ids) - 1)],
                           device=ids.device)
        logp = token_logprobs(model, hidden[row, pos], ids[row, pos + 1])
        n = torch.tensor([e.n_target for e in exs], dtype=logp.dtype, device=ids.device)
        return -torch.zeros(len(exs), dtype=logp.dtype, device=ids.device).index_add_(0, row, logp) / n
    last = hidden[torch.arange(len(exs), device=ids.device), mask.sum(1) - 1]
    two = arch.logits(model, last, list(cal.yes_no)).float()
    labels = torch.tensor([1 - e.label for e in exs], device=ids.device)  # column 0 = Yes
    return F.cross_entropy(two, labels, reduction="none")


class _Restore:
    """Remembers requires_grad flags, training mode and hooks; puts everything back."""

    def __init__(self, model):
        self.model, self.training = model, model.training
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.handles: list = []
        self.contexts: list = []

    def enter(self, context):
        """Enter a context manager (a capture) that ``restore`` exits."""
        self.contexts.append(context)
        return context.__enter__()

    def restore(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        while self.contexts:
            self.contexts.pop().__exit__(None, None, None)
        for p, flag in self.flags:
            p.requires_grad_(flag)
            p.grad = None
        self.model.train(self.training)


@dataclass
class _Batch:
    """The batch in flight: which samples (rows), their attention mask, item-token mask and query positions."""

    rows: list[int]
    mask: torch.Tensor
    item: torch.Tensor
    qpos: torch.Tensor


class _Activations:
    """Each layer's output against its input: 1 - cos, angle/pi, norm ratio, kurtosis (token means)."""

    NAMES = ("block_influence", "angular_distance", "norm_ratio", "kurtosis")

    def __init__(self, n: int, n_layers: int):
        self.values = {c: np.zeros((n, n_layers)) for c in self.NAMES}

    def record(self, i: int, h_in: torch.Tensor, h_out: torch.Tensor, b: _Batch) -> None:
        m = b.mask.float()
        cnt = m.sum(1)
        cos = F.cosine_similarity(h_in, h_out, dim=-1).clamp(-1, 1)
        ratio = h_out.norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)
        x = h_out - h_out.mean(-1, keepdim=True)
        kurt = (x**4).mean(-1) / (x**2).mean(-1).clamp_min(1e-12) ** 2 - 3
        for name, v in zip(self.NAMES, (1 - cos, torch.arccos(cos) / torch.pi, ratio, kurt), strict=True):
            self.values[name][b.rows, i] = ((v * m).sum(1) / cnt).cpu().numpy()


class _Attention:
    """Each layer's attention: entropy (token and head mean), the query's mass on item tokens, their share."""

    NAMES = ("attn_entropy", "attn_item_mass", "attn_item_share")

    def __init__(self, layers, n: int):
        self.layers, self.values = layers, {c: np.zeros((n, len(layers))) for c in self.NAMES}

    @torch.no_grad()
    def record(self, i: int, hidden: torch.Tensor, kwargs: dict, b: _Batch) -> None:
        p = arch.attention_probs(arch.attention_module(self.layers[i]), hidden, kwargs["position_embeddings"], b.mask)
        m = b.mask.float()
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean(1)  # (B, T) mean over heads
        self.values["attn_entropy"][b.rows, i] = ((ent * m).sum(1) / m.sum(1)).cpu().numpy()
        q = b.qpos
        last = p[torch.arange(len(q), device=p.device), :, q, :].mean(1)  # (B, T) over heads
        item = b.item.float()
        self.values["attn_item_mass"][b.rows, i] = (last * item).sum(1).cpu().numpy()
        visible = (torch.arange(item.shape[1], device=p.device)[None] <= q[:, None]).float() * m
        self.values["attn_item_share"][b.rows, i] = ((item * visible).sum(1) / visible.sum(1)).cpu().numpy()


class _Fisher:
    """Per layer, the summed squared gradient of its weights (empirical Fisher), and that per parameter."""

    def __init__(self, layers, n: int):
        self.n_params = np.array([sum(p.numel() for p in layer.parameters()) for layer in layers])
        self.values = {"fisher_sum": np.zeros((n, len(layers)))}
        self.batch_sums = [0.0] * len(layers)

    def hook(self, i: int):
        def add(param):
            self.batch_sums[i] += float(param.grad.detach().float().pow(2).sum())
            param.grad = None  # free it now: no full gradient is ever kept
        return add

    def record(self, rows: list[int]) -> None:
        self.values["fisher_sum"][rows] = np.array(self.batch_sums)[None, :]
        self.batch_sums = [0.0] * len(self.batch_sums)


class _Router:
    """Sends the captured states to the criteria; hooks fire in order resid_pre.i, attn_in.i, resid_post.i."""

    def __init__(self, activations: _Activations | None, attention: _Attention | None):
        self.activations, self.attention = activations, attention
        self.batch: _Batch | None = None
        self.h_in: torch.Tensor | None = None
        self.bad_layer: int | None = None  # the first layer whose output is non-finite, in this batch

    def __call__(self, name: str, value) -> None:
        kind, i = name.split(".")
        if kind == "resid_pre":
            self.h_in = value
        elif kind == "attn_in":
            self.attention.record(int(i), *value, self.batch)
        else:
            h_in, h_out = self.h_in.float(), value.float()
            if self.bad_layer is None and not torch.isfinite(h_out).all():
                self.bad_layer = int(i)
            if self.activations is not None:
                self.activations.record(int(i), h_in, h_out, self.batch)


def _check_fisher(model) -> None:
    offloaded = arch.offloaded_layers(model)
    if offloaded:
        raise ValueError(
            f"the Fisher criteria need the gradients of every layer's weights, but layers {offloaded[:5]} are "
            "offloaded by accelerate ('cpu' or 'disk' in the device_map), which re-creates their weights at every "
            "forward. Place every layer on an accelerator (a device_map over GPUs, or max_memory large enough), or "
            "run the pass with fisher=False: the attention and activation criteria work on offloaded layers.")


def _hook_batches(model, cal: ProbeSet, batch_size: int, fisher: _Fisher | None, router: _Router, desc: str,
                  losses_out: np.ndarray) -> None:
    """The probe batches (this process's share) through the hooked model, backward where Fisher is on."""
    dev = arch.input_device(model)
    for idx in progress(parallel.batches(len(cal.examples), batch_size), desc=desc, unit="batch"):
        passes.count("probe", len(idx))
        passes.count("backward", len(idx) if fisher else 0)
        exs, ids, mask, item = probe_batch(cal, idx, 0, dev)
        router.batch = _Batch(idx, mask, item, torch.tensor(_query_positions(cal, exs), device=dev))
        router.bad_layer = None
        with torch.set_grad_enabled(fisher is not None):
            losses = per_sample_loss(model, cal, exs, ids, mask)
            if not torch.isfinite(losses).all():
                where = f"; first non-finite activation at layer {router.bad_layer}" if router.bad_layer is not None else ""
                raise NonFiniteLossError(
                    f"non-finite probe loss in batch {idx[0] // batch_size} (samples {idx}){where}. "
                    "Check the model weights/dtype (fp16 overflows: use bf16 or fp32).")
            losses_out[idx] = losses.detach().float().cpu().numpy()
            if fisher:
                losses.mean().backward()
        if fisher:
            fisher.record(idx)


def hook_pass(model, cal: ProbeSet, batch_size: int = 1, fisher: bool = True,
              attention: bool = True, activations: bool = True, desc: str = "importance pass") -> dict[str, np.ndarray]:
    """One forward+backward over the probe set -> {criterion: (n_samples, n_layers)} and 'loss': (n_samples,).

    One small class per family of criteria (``_Fisher``, ``_Attention``, ``_Activations``) fills its own arrays;
    ``_Router`` hands them the captured states of the batch in flight."""
    if not cal.examples:
        raise ValueError("the probe set is empty: build it with build_probes(prep, tok, n>0)")
    if fisher:
        _check_fisher(model)
    layers, n = arch.layers(model), len(cal.examples)
    parts = {"fisher": _Fisher(layers, n) if fisher else None, "attention": _Attention(layers, n) if attention else None,
             "activations": _Activations(n, len(layers)) if activations else None}
    router, losses, guard = _Router(parts["activations"], parts["attention"]), np.zeros(n), _Restore(model)
    try:
        model.eval()
        for p, _ in guard.flags:
            p.requires_grad_(False)
        points = [f"{kind}.{i}" for i in range(len(layers)) for kind in ("resid_pre", "resid_post")]
        guard.enter(arch.capture(model, points + ([f"attn_in.{i}" for i in range(len(layers))] if attention else []),
                                 detach=True, on=router))
        for i, layer in enumerate(layers if fisher else []):
            for p in layer.parameters():
                p.requires_grad_(True)
                guard.handles.append(p.register_post_accumulate_grad_hook(parts["fisher"].hook(i)))
        _hook_batches(model, cal, batch_size, parts["fisher"], router, desc, losses)
    finally:
        guard.restore()
    found = {k: v for part in parts.values() if part is not None for k, v in part.values.items()}
    res = parallel.sum_arrays({**{c: found[c] for c in HOOK_CRITERIA if c in found}, "loss": losses})  # own rows each
    if fisher:  # in HOOK_CRITERIA's order: fisher_sum, fisher_mean, the others
        mean = res["fisher_sum"] / parts["fisher"].n_params[None, :]
        res = {"fisher_sum": res.pop("fisher_sum"), "fisher_mean": mean, **res}
    return res


def probe_losses(model, cal: ProbeSet, batch_size: int = 8) -> np.ndarray:
    """Forward-only per-sample probe loss."""
    dev = arch.input_device(model)
    out = np.zeros(len(cal.examples))
    with torch.no_grad():
        for idx in parallel.batches(len(cal.examples), batch_size):  # this process's share (all, alone)
            exs, ids, mask, _ = probe_batch(cal, idx, 0, dev)
            passes.count("probe", len(idx))
            out[idx] = per_sample_loss(model, cal, exs, ids, mask).float().cpu().numpy()
    return parallel.sum_arrays({"loss": out})["loss"]


def loss_ablation(model, cal: ProbeSet, todo: list[int], batch_size: int = 8) -> tuple[np.ndarray, dict]:
    """Per-sample probe loss, and its rise (n_samples, L) when each layer of ``todo`` is skipped.

    Skipping layer i leaves layers 0..i-1 as they were, so their output is taken from the full pass
    (``resid_pre.i``) and only layers i+1.. run again (``arch.resume_at``): the same numbers as
    running the model without layer i, for about half the layer passes.
    """
    n_layers, dev = arch.num_layers(model), arch.input_device(model)
    base = np.zeros(len(cal.examples))
    rise = np.zeros((len(cal.examples), n_layers))
    mine = parallel.batches(len(cal.examples), batch_size)  # this process's share of the batches
    with torch.no_grad(), progress(total=len(mine) * len(todo), desc="ablation", unit="layer") as bar:
        for idx in mine:
            exs, ids, mask, _ = probe_batch(cal, idx, 0, dev)
            passes.count("probe", len(idx))
            passes.count("ablation", len(idx) * len(todo))
            with arch.capture(model, [f"resid_pre.{i}" for i in todo]) as states:
                base[idx] = per_sample_loss(model, cal, exs, ids, mask).float().cpu().numpy()
            for i in todo:
                last = i == n_layers - 1  # nothing to resume: run the model without its last layer
                with arch.skip_layers(model, [i]) if last else arch.resume_at(model, i + 1, states[f"resid_pre.{i}"]):
                    rise[idx, i] = per_sample_loss(model, cal, exs, ids, mask).float().cpu().numpy() - base[idx]
                bar.update(1)
    got = parallel.sum_arrays({"base": base, "rise": rise})
    rise = got["rise"]
    rise[:, sorted(set(range(n_layers)) - set(todo))] = np.nan  # layers not ablated
    return got["base"], {"ablation_loss": rise}


def ablate(model, cal: ProbeSet, evaluator: Callable | None = None, layers: list[int] | None = None,
           batch_size: int = 8) -> dict[str, np.ndarray]:
    """Skip each layer in turn -> per-sample loss rise (n_samples, L) and per-user NDCG@10 drop (n_users, L)."""
    n_layers = arch.num_layers(model)
    todo = list(range(n_layers)) if layers is None else layers
    base_loss, out = loss_ablation(model, cal, todo, batch_size)
    base_ndcg = evaluator(model) if evaluator else None
    if evaluator:
        out["ablation_ndcg"] = np.full((len(base_ndcg), n_layers), np.nan)
        for i in progress(todo, desc="ablation (task)", unit="layer"):
            with arch.skip_layers(model, [i]):
                out["ablation_ndcg"][:, i] = base_ndcg - evaluator(model)
    out["base_loss"] = base_loss
    if evaluator:
        out["base_ndcg"] = base_ndcg
    return out


def _normalize(v: np.ndarray, direction: int, method: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64) * (direction or 1)
    if method == "rank":
        return (rankdata(v) - 1) / max(1, len(v) - 1)
    if method != "minmax":
        raise ValueError(f"unknown normalization {method!r}; use 'minmax' or 'rank'")
    span = np.nanmax(v) - np.nanmin(v)
    return (v - np.nanmin(v)) / span if span > 0 else np.zeros_like(v)


def fuse(per_layer: dict[str, np.ndarray], weights: dict[str, float], method: str = "minmax") -> np.ndarray:
    """Weighted mean of the normalized criteria (per layer)."""
    unknown = set(weights) - set(per_layer)
    if unknown:
        raise ValueError(f"fusion weights name unknown or uncomputed criteria {sorted(unknown)}; "
                         f"available: {sorted(per_layer)}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("fusion weights must sum to a positive number")
    return sum(w * _normalize(per_layer[c], DIRECTION[c], method) for c, w in weights.items()) / total


def importance_frame(model, per_layer: dict[str, np.ndarray], method: str = "minmax") -> pd.DataFrame:
    """One row per (layer, criterion): layer, depth_fraction, layer_type, criterion, value, normalized."""
    L = arch.num_layers(model)
    types = arch.layer_types(model)
    rows = []
    for c, v in per_layer.items():
        norm = _normalize(v, DIRECTION.get(c, 1), method)
        for i in range(L):
            rows.append({"layer": i, "depth_fraction": float(depth(i, L)), "layer_type": types[i],
                         "criterion": c, "value": float(v[i]), "normalized": float(norm[i])})
    return pd.DataFrame(rows)


def check_fusion_weights(weights, ablation: bool) -> None:
    """Refuse fusion weights that are neither a mapping nor 'fit', and 'fit' without the loss ablation."""
    if isinstance(weights, str) and weights != "fit":
        raise ValueError(f"{weights!r}: give a mapping of criterion weights or 'fit'")
    if weights == "fit" and not ablation:
        raise ValueError("'fit' is fitted against the loss ablation: keep ablation on, or give fixed weights")


def _weight_grid(n: int, step: float = FIT_STEP) -> np.ndarray:
    """All non-negative weightings of n criteria on a grid of ``step`` that sum to 1 (rows)."""
    m = int(round(1 / step))
    rows = [[0] * n]
    for i in range(n - 1):  # compositions of m into n parts, in a fixed order
        rows = [r[:i] + [a] + [0] * (n - i - 1) for r in rows for a in range(m - sum(r[:i]) + 1)]
    grid = np.array([r[:-1] + [m - sum(r[:-1])] for r in rows], dtype=np.float64)
    return grid / m


def _fit_on(means: dict[str, np.ndarray], truth: np.ndarray, criteria: list[str], method: str,
            step: float) -> tuple[dict[str, float], float]:
    grid = _weight_grid(len(criteria), step)
    normed = np.stack([_normalize(means[c], DIRECTION[c], method) for c in criteria])  # criteria x layers
    fused = grid @ normed
    rf = rankdata(fused, axis=1)
    rf -= rf.mean(1, keepdims=True)
    rt = rankdata(truth) - rankdata(truth).mean()
    denom = np.sqrt((rf ** 2).sum(1) * (rt ** 2).sum())
    rho = np.where(denom > 0, rf @ rt / np.where(denom > 0, denom, 1), -np.inf)
    best = int(np.argmax(rho))  # the first of equals: deterministic
    return {c: float(w) for c, w in zip(criteria, grid[best], strict=True)}, float(rho[best])


def fit_fusion(per_sample: dict[str, np.ndarray], truth: np.ndarray, criteria: list[str] | None = None,
               method: str = "minmax", step: float = FIT_STEP, samples: np.ndarray | None = None) -> dict[str, float]:
    """Fusion weights fitted on validation data: the grid weighting whose fused profile has the highest Spearman
    with ``truth`` (samples x layers, the per-sample loss ablation), over the given probe ``samples``.

    ``criteria`` default to those of ``DEFAULT_FUSION`` that were computed (one gradient, one activation and one
    attention criterion). Weights are non-negative, sum to 1, on a grid of ``step``; ties go to the first.
    """
    criteria = [c for c in (criteria or DEFAULT_FUSION) if c in per_sample]
    if not criteria:
        raise ValueError(f"fusion 'fit' needs at least one of {sorted(DEFAULT_FUSION)} computed")
    idx = np.arange(len(truth)) if samples is None else np.asarray(samples)
    means = {c: per_sample[c][idx].mean(0) for c in criteria}
    return _fit_on(means, truth[idx].mean(0), criteria, method, step)[0]


def validity(per_sample: dict[str, np.ndarray], ablation: dict[str, np.ndarray], weights: dict[str, float] | str,
             method: str = "minmax", n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Spearman correlation of each criterion with each ablation ground truth, bootstrap CI.

    Criteria and the loss ground truth are resampled over probe prompts (jointly);
    the NDCG ground truth over evaluation users. With ``weights="fit"`` the fused row against the loss
    ablation is cross-fitted: weights fitted on the even probe prompts are scored on the odd ones and
    the other way round (the mean of both), refitted in every bootstrap replicate; against the NDCG ablation
    the weights fitted on all examples are used (they were not fitted to it).
    """
    rng = np.random.default_rng(seed)
    crits = [c for c in per_sample if c in HOOK_CRITERIA and DIRECTION[c] != 0]
    truths = [g for g in ABLATION_CRITERIA if g in ablation]
    n = len(per_sample["loss"])
    check_fusion_weights(weights, ablation="ablation_loss" in ablation)
    fit = weights == "fit"
    if fit and n < 4:
        raise ValueError(f"fusion 'fit' is cross-fitted on two halves of the probe prompts and needs at "
                         f"least 4 of them (got {n}): raise importance samples")
    loss = ablation["ablation_loss"]
    fold = np.arange(n) % 2

    def crossfit(sample_idx) -> float:
        rhos = []
        for f in (0, 1):
            a, b = sample_idx[fold[sample_idx] == f], sample_idx[fold[sample_idx] != f]
            if not len(a) or not len(b):  # a bootstrap replicate that drew one fold only
                return np.nan
            w = fit_fusion(per_sample, loss, method=method, samples=a)
            held = fuse({c: per_sample[c][b].mean(0) for c in w}, w, method)
            rhos.append(spearmanr(held, loss[b].mean(0)).statistic)
        return float(np.mean(rhos))

    def stats(sample_idx, user_idx):
        means = {c: per_sample[c][sample_idx].mean(0) for c in crits}
        if weights:
            w = fit_fusion(per_sample, loss, method=method, samples=sample_idx) if fit else weights
            means["fused"] = fuse(means, w, method)
        gt = {"ablation_loss": loss[sample_idx].mean(0)}
        if "ablation_ndcg" in ablation:
            gt["ablation_ndcg"] = ablation["ablation_ndcg"][user_idx].mean(0)
        out = {(c, g): spearmanr(means[c], gt[g]).statistic for c in means for g in truths}
        if fit:
            out[("fused", "ablation_loss")] = crossfit(sample_idx)
        return out

    n_users = len(ablation["ablation_ndcg"]) if "ablation_ndcg" in ablation else 1
    point = stats(np.arange(n), np.arange(n_users))
    boots = [stats(rng.integers(0, n, n), rng.integers(0, n_users, n_users)) for _ in range(n_boot)]
    rows = []
    for key, rho in point.items():
        vals = np.array([b[key] for b in boots], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        lo, hi = (np.quantile(vals, [0.025, 0.975]) if len(vals) else (np.nan, np.nan))
        rows.append({"criterion": key[0], "ground_truth": key[1], "spearman": rho, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def layer_importance(model, probes: ProbeSet, criteria: list[str] | None = None,
            fusion_weights: dict[str, float] | str | None = None, normalization: str = "minmax",
            batch_size: int = 1, ablation: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Per-layer importance -> tidy DataFrame (layer, depth_fraction, layer_type, criterion, value, normalized).

    ``criteria`` selects among HOOK_CRITERIA (default: all); they all come from one
    forward+backward pass. Pass the output of ``ablate`` to add the ground-truth rows.
    ``fusion_weights="fit"`` fits them on these probe prompts against ``ablation["ablation_loss"]``;
    the weights used are in ``df.attrs["fusion_weights"]``.
    """
    check_fusion_weights(fusion_weights, ablation=ablation is not None and "ablation_loss" in ablation)
    criteria = criteria or HOOK_CRITERIA
    unknown = set(criteria) - set(HOOK_CRITERIA)
    if unknown:
        raise ValueError(f"unknown criteria {sorted(unknown)}; available: {HOOK_CRITERIA}")
    res = hook_pass(model, probes, batch_size,
                    fisher=any(c.startswith("fisher") for c in criteria),
                    attention=any(c.startswith("attn") for c in criteria),
                    activations=any(c in ("block_influence", "angular_distance", "norm_ratio", "kurtosis")
                                    for c in criteria))
    per_layer = {c: res[c].mean(0) for c in criteria}
    if fusion_weights is None:  # the defaults fuse whichever of their criteria were computed
        weights = {c: w for c, w in DEFAULT_FUSION.items() if c in per_layer}
    elif fusion_weights == "fit":
        weights = fit_fusion(res, ablation["ablation_loss"], method=normalization)
    else:
        weights = fusion_weights
    if weights:
        per_layer["fused"] = fuse(per_layer, weights, normalization)
    if ablation is not None:
        per_layer.update({g: np.nanmean(ablation[g], 0) for g in ABLATION_CRITERIA if g in ablation})
    df = importance_frame(model, per_layer, normalization)
    df.attrs["per_sample"] = res
    df.attrs["fusion_weights"] = dict(weights or {})
    return df


# ----------------------------------------------------------------------------- the cached study stage


@dataclass
class ImportanceResult:
    """Tidy per-layer table, ablation table and validity table of one run."""

    table: pd.DataFrame
    validity: pd.DataFrame
    per_sample: dict[str, np.ndarray]
    folder: Path | None = None
    seconds: float = 0.0
    fusion_weights: dict[str, float] = field(default_factory=dict)
    """The weights of the fused score (fitted ones where ``fusion_weights='fit'``)."""


def run_importance(cfg: ImportanceConfig, model=None, tokenizer=None, use_cache: bool = True,
                   report=print) -> ImportanceResult:
    """Compute (or load from the cache) importance, ablation and validity for a model and dataset."""
    check_fusion_weights(cfg.fusion_weights, cfg.ablation)  # before any work
    prep = load(cfg.dataset, cfg.format, cfg.prep_config(), report=report)
    settings = {k: v for k, v in asdict(cfg).items() if k != "results_dir"}  # where, not what
    key = store.config_hash("importance", settings, prep.fingerprint, store.versions()["layerviz"])
    folder = Path(cfg.results_dir) / "importance" / f"{cfg.model.replace('/', '_')}-{key}"
    t0 = time.perf_counter()

    def compute(folder: Path) -> dict:
        nonlocal model, tokenizer
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        cal = build_probes(prep, tokenizer, cfg.samples, "valid", cfg.loss, cfg.max_title_tokens, cfg.seed)
        ablation = ablate(model, cal, _ablation_evaluator(cfg, prep, model, tokenizer)) if cfg.ablation else None
        table = layer_importance(model, cal, fusion_weights=cfg.fusion_weights, normalization=cfg.normalization,
                        batch_size=cfg.batch_size, ablation=ablation)
        per_sample = dict(table.attrs.pop("per_sample"))
        weights = table.attrs.pop("fusion_weights")
        valid = pd.DataFrame()
        if ablation is not None:
            per_sample.update(ablation)
            valid = validity(per_sample, ablation, cfg.fusion_weights, cfg.normalization, seed=cfg.seed)
        return {"importance": table, "validity": valid, "per_sample": store.Arrays(per_sample), "fusion": weights}

    out, was_cached = store.cached(folder, key, compute, use_cache, marker="manifest.json",
                                   meta={"config": asdict(cfg), "seed": cfg.seed, "data_fingerprint": prep.fingerprint})
    if was_cached and report:
        report(f"importance: loaded cached results from {folder}")
    return ImportanceResult(out["importance"], out["validity"], dict(out["per_sample"]), folder,
                            0.0 if was_cached else time.perf_counter() - t0, out["fusion"])


def _ablation_evaluator(cfg: ImportanceConfig, prep, model, tokenizer):
    """The task evaluator of the ablation NDCG ground truth (None with ablation_users=0: loss only)."""
    if not cfg.ablation_users:
        return None
    return task_evaluator(cfg, prep, model, tokenizer, cfg.ablation_users, "valid", cfg.calibration,
                          cfg.ablation_negatives, cfg.scorer)[0]


def load_importance(folder: str | Path) -> ImportanceResult:
    """Read a cached importance run."""
    folder = Path(folder)
    out = store.read_outputs(folder, json.loads((folder / "manifest.json").read_text())["files"])
    return ImportanceResult(out["importance"], out["validity"], dict(out["per_sample"]), folder, 0.0, out["fusion"])


def choose_criterion(validity: pd.DataFrame, truth: str = "ablation_loss") -> dict:
    """The criterion with the highest Spearman validity against ``truth`` -> {criterion, spearman, ci_low, ci_high, truth}.

    What 'auto' means wherever a criterion orders layers: measured per model and data, never assumed
    (on SmolLM2 the default fusion had 0.52 against the loss ablation, block influence 0.79).
    """
    rows = validity[validity["ground_truth"] == truth] if len(validity) else validity
    if rows is None or not len(rows):
        raise ValueError(f"criterion 'auto' needs the {truth} ground truth in the validity table: run importance "
                         "with ablation on (importance.ablation: true), or name a criterion (e.g. fused)")
    best = rows.sort_values(["spearman", "criterion"], ascending=[False, True]).iloc[0]
    return {"criterion": str(best["criterion"]), "spearman": float(best["spearman"]), "ci_low": float(best["ci_low"]),
            "ci_high": float(best["ci_high"]), "truth": truth}


def layers_by_criterion(table: pd.DataFrame, value: str = "normalized") -> pd.DataFrame:
    """Layers x criteria view of the tidy table (for printing and heatmaps)."""
    return table.pivot(index="layer", columns="criterion", values=value)
