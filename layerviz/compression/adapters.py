"""RQ3: light adapters that join non-contiguous kept layers, and how they are trained.

An adapter sits in each *gap*: between the embedding and the first kept layer, between
consecutive kept layers, and (``tail``) between the last kept layer and the final norm.
The gap size is the number of skipped layers. The paper's placement policy:

* gap 0 (nothing skipped): no adapter (identity);
* a gap that starts at the embedding, or whose kept ends lie in different depth thirds
  (lower/middle/upper): MLP adapter ``h + W2 gelu(W1 h)``, W2 = 0 at init;
* gap <= 3: linear adapter ``W h``, W = I at init;
* gap > 3: residual adapter ``h + W h``, W = 0 at init.

``force='fold'`` places ReplaceMe's foldable adapter instead: a full-rank linear map T (= I at init) on the
MLP output (the down projection's output) of the kept block *before* the gap, so that the block computes
``h_mid + T down(...)``; T folds exactly into ``down_proj`` (``W <- T W``) and the exported model has no
added parameters. The gap before the first kept layer has no block to fold into and stays the identity.

Every adapter has a full-rank form and a rank-r form. Rank r: linear becomes
``diag(s) h + U D h`` (s = 1, U = 0 at init: identity plus a low-rank correction, with a
per-channel scale that can follow the norm growth of the skipped layers), residual
``h + U D h`` (U = 0), MLP ``h + W2 gelu(W1 h)`` with r hidden units. So at init every
adapter is the identity and the compact model equals plain layer dropping.

Training (``train_adapters``) minimizes MSE to the original model's hidden states plus
lambda times each adapter's squared distance from the identity map:
stage 1 fits each adapter locally on cached teacher states (optionally starting from the
closed-form least-squares bridge, as in ReplaceMe); stage 2 trains all adapters end to end
on the final hidden state *before* the final norm, read by a hook.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from layerviz import arch, parallel, passes
from layerviz.compression.config import (
    KINDS,
    AdapterPolicy,
    AdapterTrainConfig,
)
from layerviz.depth import region
from layerviz.progress import progress
from layerviz.scoring import pad_right
from layerviz.training import BestState, Frozen, Loop

# ----------------------------------------------------------------------------- placement policy


@dataclass
class AdapterSpec:
    """One gap: the kept layer before it (-1 = embedding), after it (L = final norm), and its adapter."""
    prev: int
    next: int
    skipped: int
    kind: str
    rank: int | None
    reason: str
    n_layers: int

    @property
    def label(self) -> str:
        """e.g. 'emb→0', '3→7', '25→norm'."""
        return f"{'emb' if self.prev < 0 else self.prev}→{'norm' if self.next >= self.n_layers else self.next}"


def place_adapters(layers: list[int], n_layers: int, policy: AdapterPolicy | None = None) -> list[AdapterSpec]:
    """The adapter for every gap of a selection, with the reason for each choice."""
    policy = policy or AdapterPolicy()
    layers = arch.validate_layers(layers, n_layers)
    ends = [-1, *layers] + ([n_layers] if policy.tail else [])
    specs = []
    for prev, nxt in zip(ends[:-1], ends[1:], strict=True):
        gap = nxt - prev - 1
        a, b = region(prev, n_layers), region(min(nxt, n_layers - 1), n_layers)
        if gap == 0:
            kind, why = "identity", "no layer skipped"
        elif policy.force == "fold" and prev < 0:
            kind, why = "identity", "fold: no kept block before the first kept layer to fold into"
        elif policy.force is not None:
            kind, why = policy.force, f"forced {policy.force}"
        elif prev < 0 and policy.embedding:
            kind, why = policy.embedding, f"starts at the embedding, skips {gap}"
        elif a != b and policy.boundary:
            kind, why = policy.boundary, f"spans the {a}/{b} boundary, skips {gap}"
        elif gap <= policy.linear_max_gap:
            kind, why = "linear", f"skips {gap} <= {policy.linear_max_gap}"
        else:
            kind, why = "residual", f"skips {gap} > {policy.linear_max_gap}"
        rank = policy.rank if kind not in ("identity", "fold") else None
        specs.append(AdapterSpec(prev, nxt, gap, kind, rank, why, n_layers))
    return specs


# ----------------------------------------------------------------------------- the adapter module


class Adapter(nn.Module):
    """One gap's map h -> h' (identity at init); weights in fp32 (master weights under autocast)."""

    def __init__(self, kind: str, hidden: int, rank: int | None = None, device=None, seed: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown adapter type {kind!r}; use one of {', '.join(KINDS)}")
        self.kind, self.hidden, self.rank = kind, hidden, rank
        d, f32 = hidden, dict(device=device, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape):  # seeded on CPU, then moved: same init on every device
            w = torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])
            return w.to(**f32) if device != "meta" else torch.empty(*shape, **f32)

        if kind == "identity":
            return
        width = rank or d
        if kind == "fold":  # T on the MLP output, = I at init; full rank (it folds into down_proj for free)
            self.rank = None
            self.weight = nn.Parameter(torch.eye(d, **f32))
        elif kind == "mlp":
            self.w1 = nn.Parameter(rand(width, d))
            self.w2 = nn.Parameter(torch.zeros(d, width, **f32))
        elif rank is None:  # full rank: linear W = I, residual W = 0
            self.weight = nn.Parameter(torch.eye(d, **f32) if kind == "linear" else torch.zeros(d, d, **f32))
        else:
            self.down = nn.Parameter(rand(rank, d))
            self.up = nn.Parameter(torch.zeros(d, rank, **f32))
            if kind == "linear":
                self.scale = nn.Parameter(torch.ones(d, **f32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return h
        x = h.to(torch.float32) if not torch.is_autocast_enabled(h.device.type) else h
        if self.kind == "mlp":
            y = x + F.linear(F.gelu(F.linear(x, self.w1)), self.w2)
        elif self.rank is None:  # linear, fold: W h; residual: h + W h
            y = F.linear(x, self.weight) + (x if self.kind == "residual" else 0)
        else:
            y = F.linear(F.linear(x, self.down), self.up) + (x * self.scale if self.kind == "linear" else x)
        return y.to(h.dtype)

    def distance_to_identity(self) -> torch.Tensor:
        """Squared Frobenius distance of the map from the identity (0 at init): the default regularizer."""
        if self.kind == "identity":
            return torch.zeros(())
        if self.kind == "mlp":
            return self.w2.pow(2).sum()
        if self.rank is None:
            eye = torch.eye(self.hidden, device=self.weight.device) if self.kind in ("linear", "fold") else 0
            return (self.weight - eye).pow(2).sum()
        # ||U D||_F^2 = sum((U^T U) * (D D^T)), all r x r
        low = ((self.up.T @ self.up) * (self.down @ self.down.T)).sum()
        if self.kind == "residual":
            return low
        s1 = self.scale - 1  # ||diag(s-1) + U D||^2 = ||s-1||^2 + ||UD||^2 + 2 sum_i (s_i-1)(UD)_ii
        return s1.pow(2).sum() + low + 2 * (s1 * (self.up * self.down.T).sum(1)).sum()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one token through the adapter (elementwise ops not counted)."""
        if self.kind == "identity":
            return 0
        return 2 * sum(p.numel() for n, p in self.named_parameters() if n != "scale")

    @torch.no_grad()
    def fold_into(self, linear: nn.Linear) -> None:
        """Fold a ``fold`` adapter into the bias-free Linear whose output it maps: W <- T W (in float64)."""
        if self.kind != "fold" or linear.bias is not None:
            raise ValueError(f"only a fold adapter folds into a bias-free Linear (this one: {self.kind})")
        linear.weight.copy_((self.weight.double() @ linear.weight.double()).to(linear.weight.dtype))

    def extra_repr(self) -> str:
        return f"{self.kind}, hidden={self.hidden}, rank={self.rank}"


@torch.no_grad()
def fit_lstsq(adapter: Adapter, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> None:
    """Closed-form least-squares bridge from inputs x (N, d) to targets y (N, d), in float64.

    Linear/residual full rank: the ridge solution. Rank r: reduced-rank regression of y - x
    on x (the rank-r solution with the smallest squared error). MLP: W2 by least squares on
    the fixed random features gelu(W1 x). ``ridge`` is relative to the mean diagonal of x^T x.
    """
    if adapter.kind == "identity":
        return
    x64, y64 = x.double(), y.double()

    def solve(a, b):
        g = a.T @ a
        g += torch.eye(g.shape[0], dtype=g.dtype, device=g.device) * (ridge * g.diagonal().mean() + 1e-12)
        return torch.linalg.solve(g, a.T @ b)

    if adapter.kind == "mlp":
        phi = F.gelu(x64 @ adapter.w1.double().T)
        adapter.w2.copy_(solve(phi, y64 - x64).T)
    elif adapter.rank is None:  # fold: x is the MLP output, y the residual target (what it must add)
        target = y64 if adapter.kind in ("linear", "fold") else y64 - x64
        adapter.weight.copy_(solve(x64, target).T)
    else:
        m = solve(x64, y64 - x64)  # d x d, h -> h @ m
        _, vecs = torch.linalg.eigh((x64 @ m).T @ (x64 @ m))
        v = vecs[:, -adapter.rank:]  # top right-singular vectors of the fitted values
        adapter.down.copy_((m @ v).T)
        adapter.up.copy_(v)
        if adapter.kind == "linear":
            adapter.scale.fill_(1.0)


# ----------------------------------------------------------------------------- training


def _padded(examples, idx, pad, device):
    return pad_right([examples[i].ids for i in idx], pad, device)


def loss_mask(mask: torch.Tensor, skip_first: bool) -> torch.Tensor:
    m = mask.bool().clone()
    if skip_first:
        m[:, 0] = False
    return m


@torch.no_grad()
def teacher_states(model, examples, points: list[int], pad: int, batch: int = 8, skip_first: bool = True,
                   desc: str = "teacher states", mlp: list[int] = ()) -> dict:
    """Hidden states *entering* layer i for each i in ``points`` (i = L: entering the final norm), and for each
    i in ``mlp`` the output of layer i's MLP down projection (key ``("mlp", i)``: what a fold adapter maps).

    Returns {key: [per-example (tokens, d) fp32 tensors on the model's device]}, masked tokens only.
    """
    n = arch.num_layers(model)
    dev = arch.input_device(model)
    names = {i: f"resid_pre.{i}" if i < n else "resid_final" for i in points} | {("mlp", i): f"mlp_out.{i}"
                                                                                for i in mlp}
    out: dict = {key: [] for key in names}
    with arch.capture(model, list(names.values())) as caught:
        for s in progress(range(0, len(examples), batch), desc=desc, unit="batch"):
            idx = list(range(s, min(s + batch, len(examples))))
            ids, mask = _padded(examples, idx, pad, dev)
            passes.count("probe", len(idx))
            arch.run_decoder(model, ids, mask)
            keep = loss_mask(mask, skip_first)
            for key, name in names.items():
                for r in range(len(idx)):
                    out[key].append(caught[name][r][keep[r]].float())
    return out


def hidden_loss(pred: torch.Tensor, target: torch.Tensor, weights: dict) -> torch.Tensor:
    """Sum over tokens (rows) of the weighted hidden-state loss: ``mse`` is the mean squared error over the hidden
    dimension, ``cosine`` is 1 - cos(pred, target)."""
    total = pred.new_zeros(())
    if weights.get("mse"):
        total = total + weights["mse"] * (pred - target).pow(2).mean(-1).sum()
    if weights.get("cosine"):
        total = total + weights["cosine"] * (1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)).sum()
    return total


def _fit(adapters: list[Adapter], lr: float, epochs: int, batches, validate, cfg: AdapterTrainConfig, curve: list,
         stage: str, gap: str, where: str, desc: str | None = None, shared: bool = False) -> None:
    """AdamW + clipping + early stopping on ``validate()`` (``training.Loop``, patience in epochs); the adapters end
    at their best validation state.

    ``batches()`` yields, per epoch, callables that return one batch's MSE (with grad). Every step adds
    ``cfg.reg`` x the adapters' distance from the identity. Rows (epoch 0 = before training) go to ``curve``.
    ``shared``: under torchrun each batch's MSE is this process's share of it, and the gradients are summed
    over processes before clipping (data parallel); the regularizer is split so that it counts once.
    """
    world = parallel.world_size() if shared else 1
    params = [p for a in adapters for p in a.parameters()]
    best = BestState(params, bigger=False, patience=cfg.patience, unit="epochs", metric="validation MSE", at="epoch")
    loop = Loop(best, torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay), torch.no_grad()(validate),
                clip=cfg.clip, shared=shared, column="val_mse", what="adapter",
                hint="Lower the learning rate (lr / stage2_lr) or raise the gradient clipping.")

    def epoch(e: int) -> dict:
        losses = []
        for batch_mse in batches():
            mse = batch_mse()
            loop.step(mse + cfg.reg * sum(a.distance_to_identity() for a in adapters) / world, f"{where}, epoch {e}")
            losses.append(parallel.all_sum(mse.item()) if shared else mse.item())
        return {"stage": stage, "gap": gap, "train_mse": float(np.mean(losses))}

    loop.start({"stage": stage, "gap": gap, "train_mse": float("nan")})
    loop.run(range(1, epochs + 1), epoch, desc=desc, unit="epoch")
    loop.finish()
    curve.extend(loop.rows)


def _local_stage(adapter: Adapter, tr: tuple, va: tuple, cfg: AdapterTrainConfig, label: str, curve: list) -> None:
    """Fit one adapter on cached teacher states: ``tr``/``va`` = (inputs, targets, base); the prediction is
    ``adapter(inputs)``, plus ``base`` for a fold adapter (the block's stream before its MLP output is added)."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss(x, y, base, b=slice(None)):
        pred = adapter(x[b]) + (base[b] if base is not None else 0)
        return hidden_loss(pred, y[b], cfg.loss) / len(pred)

    def batches():
        order = torch.randperm(len(tr[0]), generator=gen).to(tr[0].device)
        for s in range(0, len(order), cfg.token_batch):
            yield lambda b=order[s : s + cfg.token_batch]: loss(*tr, b)

    _fit([adapter], cfg.lr, cfg.stage1_epochs, batches, lambda: loss(*va).item(), cfg, curve, "stage1", label,
         f"stage 1, gap {label}")


def final_mse(model, examples, targets: list[torch.Tensor], pad: int, batch: int, skip_first: bool,
              grad: bool = False, shared: bool = False, weights: dict | None = None):
    """Mean squared error of ``model``'s pre-final-norm hidden states against ``targets`` (per-example tensors);
    with ``weights``, that hidden-state objective (``hidden_loss``) instead.

    Returns a scalar tensor (with grad if ``grad``) averaged over all compared tokens. ``shared``: under
    torchrun each process runs its share (of the batches; with ``grad``, of the examples, in one batch) and
    the mean is over every process's tokens (with ``grad``: this process's part of it, whose gradients
    the processes sum).
    """
    dev = arch.input_device(model)
    total, count = torch.zeros((), device=dev), 0
    if shared and grad:
        part = parallel.shard(len(examples))
        todo = [list(part)] if len(part) else []
    elif shared:
        todo = parallel.batches(len(examples), batch)
    else:
        todo = [list(range(s, min(s + batch, len(examples)))) for s in range(0, len(examples), batch)]
    with arch.capture(model, ["resid_final"]) as caught:
        for idx in todo:
            ids, mask = _padded(examples, idx, pad, dev)
            passes.count("probe", len(idx))
            passes.count("backward", len(idx) if grad else 0)
            with torch.set_grad_enabled(grad), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
                arch.run_decoder(model, ids, mask)
            keep = loss_mask(mask, skip_first)
            pred = caught["resid_final"][keep].float()
            tgt = torch.cat([targets[i] for i in idx])
            total = total + hidden_loss(pred, tgt, weights or {"mse": 1.0})
            count += len(pred)
    if shared and parallel.active():
        count = parallel.all_sum(count)
        if not grad:
            total = torch.tensor(parallel.all_sum(total.item()), device=dev)
    return total / max(count, 1)


def train_adapters(compact, base, probes, cfg: AdapterTrainConfig | None = None, pad: int = 0,
                   report=print, on_stage=None) -> pd.DataFrame:
    """Train the compact model's adapters to reproduce ``base``; return the loss curve (tidy frame).

    Rows: stage ('stage1' per gap, 'stage2'), gap, epoch, train_mse, val_mse. Only adapter
    parameters change; the base weights are frozen (and shared, so they stay bit-identical).
    ``on_stage(stage, val_mse, val_nmse, seconds)`` is called before training ('drop'), after
    stage 1 and after stage 2, with the validation MSE of the pre-norm final hidden state
    (nmse: divided by the teacher's mean square). On a NaN/inf loss the adapters are reset to
    their last good state and NonFiniteLossError is raised.
    """
    cfg = cfg or AdapterTrainConfig()
    examples = probes.examples if hasattr(probes, "examples") else probes
    if len(examples) < 2:
        raise ValueError("adapter training needs at least 2 probe prompts (train + validation)")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(examples))
    n_val = max(1, int(round(len(examples) * cfg.val_fraction)))
    val_idx, tr_idx = sorted(order[:n_val]), sorted(order[n_val:])
    specs, adapters = compact.specs, compact.adapters()
    n = compact.n_base_layers
    points = sorted({s.prev + 1 for s in specs} | {s.next for s in specs} | {n})
    folds = [s.prev for s in specs if s.kind == "fold"] if arch.mlp_adds_to_stream(base) else []
    teacher = teacher_states(base, examples, points, pad, skip_first=cfg.skip_first, mlp=folds)
    va, va_t = [examples[i] for i in val_idx], [teacher[n][i] for i in val_idx]
    energy = torch.cat(va_t).pow(2).mean().item()
    curve: list[dict] = []
    t0, outside = time.perf_counter(), [0.0]  # time spent in checkpoints is not training time

    def checkpoint(stage: str) -> None:
        t1 = time.perf_counter()
        seconds = t1 - t0 - outside[0]
        with torch.no_grad():
            mse = final_mse(compact, va, va_t, pad, cfg.sample_batch, cfg.skip_first, shared=True).item()
        if report:
            report(f"{stage}: validation MSE {mse:.4g} (relative {mse / energy:.4f}) after {seconds:.1f} s")
        if on_stage is not None:
            on_stage(stage, mse, mse / energy, seconds)
        outside[0] += time.perf_counter() - t1

    checkpoint("drop")
    torch.manual_seed(cfg.seed)
    with Frozen(compact, [p for a in adapters for p in a.parameters()]):
        _stage1(specs, adapters, teacher, tr_idx, val_idx, cfg, curve)
        checkpoint("stage1")
        if cfg.stage2_epochs and any(a.n_params() for a in adapters):
            _end_to_end(compact, examples, teacher[n], tr_idx, val_idx, adapters, cfg, pad, curve)
            checkpoint("stage2")
    out = pd.DataFrame(curve, columns=["stage", "gap", "epoch", "train_mse", "val_mse"])
    out.attrs["train_seconds"] = time.perf_counter() - t0 - outside[0]
    return out


def _stage1(specs, adapters, teacher: dict, tr_idx, val_idx, cfg: AdapterTrainConfig, curve: list) -> None:
    """Each adapter fitted on its own on the teacher's states (closed form first with init='lstsq'). A fold
    adapter maps the teacher's MLP output of the block before its gap; where the block does not add that output
    to the stream as is (Gemma3 normalizes it first) it is left to stage 2 and healing."""
    for spec, adapter in progress(list(zip(specs, adapters, strict=True)), desc="stage 1", unit="adapter"):
        if adapter.kind == "identity" or (adapter.kind == "fold" and ("mlp", spec.prev) not in teacher):
            continue
        x, y = teacher[spec.prev + 1], teacher[spec.next]
        base = None
        if adapter.kind == "fold":  # input: the MLP output m; the stream without it: h_out - m
            x, base = teacher[("mlp", spec.prev)], [h - m for h, m in zip(x, teacher[("mlp", spec.prev)], strict=True)]
        tr, va = ([torch.cat([t[i] for i in idx]) if t is not None else None for t in (x, y, base)]
                  for idx in (tr_idx, val_idx))
        if cfg.init == "lstsq":
            fit_lstsq(adapter, tr[0], tr[1] - (tr[2] if tr[2] is not None else 0))
        _local_stage(adapter, tuple(tr), tuple(va), cfg, spec.label, curve)


def _step_mse(compact, examples, targets, pad, cfg: AdapterTrainConfig):
    """One stage-2 training step's MSE (with grad) over ``examples``."""
    passes.count("train")
    return final_mse(compact, examples, targets, pad, len(examples), cfg.skip_first, grad=True, shared=True,
                     weights=cfg.loss)


def _end_to_end(compact, examples, final, tr_idx, val_idx, adapters, cfg: AdapterTrainConfig, pad, curve):
    tr = [examples[i] for i in tr_idx]
    va, va_t = [examples[i] for i in val_idx], [final[i] for i in val_idx]
    gen = np.random.default_rng(cfg.seed)

    def batches():
        perm = gen.permutation(len(tr))
        for s in range(0, len(perm), cfg.sample_batch):
            b = [int(i) for i in perm[s : s + cfg.sample_batch]]
            yield lambda b=b: _step_mse(compact, [tr[i] for i in b], [final[tr_idx[i]] for i in b], pad, cfg)

    _fit(adapters, cfg.stage2_lr, cfg.stage2_epochs, batches,
         lambda: final_mse(compact, va, va_t, pad, cfg.sample_batch, cfg.skip_first, shared=True,
                           weights=cfg.loss).item(), cfg, curve,
         "stage2", "all", "stage 2", desc="stage 2", shared=True)
