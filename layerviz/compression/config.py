"""The compression jobs' configs: what decides importance (RQ1), selection (RQ2) and a compact model's adapters,
their training and healing (RQ3). Torch-free: the CLI's flags come from these fields, and `--help` answers at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from layerviz.settings import LLAMA_LIKE_TARGETS, Settings

KINDS = ("identity", "linear", "residual", "mlp", "fold")
HIDDEN_LOSSES = ("mse", "cosine")
"""Objectives on hidden states (the adapters' stage 1 and stage 2); ``task`` and ``distill`` are in heal."""
OBJECTIVES = (*HIDDEN_LOSSES, "task", "distill")
MODES = ("adapters", "lora", "last")
DEFAULT_FUSION = {"fisher_sum": 1.0, "block_influence": 1.0, "attn_item_mass": 1.0}


def check_weights(weights: dict, allowed: tuple, what: str) -> dict:
    """Objective weights {name: w >= 0, sum > 0} with names from ``allowed`` -> the dict with the zero terms left
    out; raise naming the problem and the fix."""
    unknown = sorted(set(weights) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; use one or more of {', '.join(allowed)} "
                         "(a weighted sum: e.g. task=1,distill=0.5)")
    bad = {k: w for k, w in weights.items() if not isinstance(w, int | float) or not math.isfinite(w) or w < 0}
    if bad:
        raise ValueError(f"{what} weights must be finite and >= 0, got {bad}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{what} weights sum to 0 ({weights}): give at least one term a positive weight")
    return {k: float(w) for k, w in weights.items() if w > 0}


def parse_objective(objective: str | dict) -> dict[str, float]:
    """'task+distill', 'task=1,distill=0.5', 'mse' or {'task': 1, 'distill': 0.5} -> checked weights."""
    if isinstance(objective, str):
        weights = {}
        for part in objective.replace("+", ",").split(","):
            name, _, w = part.strip().partition("=")
            try:
                weights[name.strip()] = float(w) if w else 1.0
            except ValueError:
                raise ValueError(f"objective weight {w!r} of {name!r} is not a number (e.g. task=1,distill=0.5)") from None
        objective = weights
    return check_weights(dict(objective), OBJECTIVES, "adapter objective")


def objective_label(weights: dict) -> str:
    """'task+distill', 'task+0.5*distill': how tables name an objective."""
    return "+".join(k if w == 1 else f"{w:g}*{k}" for k, w in weights.items())


@dataclass
class HealConfig:
    """How a compact model is healed on the training windows (``adapters: {heal: {...}}`` in a study)."""

    mode: str = "adapters"
    """What trains: 'adapters' (only), 'lora' (also LoRA on the kept layers) or 'last' (also the last kept
    layers, the final norm and the LM head)."""
    steps: int = 30
    """Optimizer steps (the budget; ``max_seconds`` may end it sooner)."""
    max_seconds: float | None = None
    """Stop after this many seconds (validation included); None: steps only."""
    lr: float = 1e-3
    """AdamW learning rate (adapters, LoRA; the 'last' weights get lr / 10)."""
    batch_size: int = 4
    """Training windows per step."""
    train_negatives: int = 7
    """Sampled negatives per window (task and distill rank 1 + these)."""
    temperature: float = 2.0
    """Distillation temperature T."""
    eval_every: int = 10
    """Validation NDCG@10 every this many steps (and at the end)."""
    patience: int | None = None
    """Stop after this many validations without improvement (None: run the budget)."""
    lora_r: int = 8
    """LoRA rank (mode 'lora')."""
    lora_alpha: int = 16
    """LoRA alpha (scale alpha / r)."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LIKE_TARGETS))
    """Linear modules of the kept layers that LoRA adapts."""
    last_layers: int = 2
    """Mode 'last': how many of the last kept layers train."""
    clip: float = 1.0
    """Gradient-norm clipping."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown heal mode {self.mode!r}; use one of {', '.join(MODES)}")
        for name in ("steps", "batch_size", "train_negatives", "eval_every", "lora_r", "last_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"heal {name}={getattr(self, name)!r}: give a positive integer")
        if not self.temperature > 0:
            raise ValueError(f"heal temperature must be > 0, got {self.temperature}")


@dataclass
class AdapterPolicy:
    """Which adapter goes in which gap (defaults: the paper's policy, in rank-64 form)."""

    linear_max_gap: int = 3
    """Gaps of 1..linear_max_gap skipped layers get a linear adapter; larger ones a residual one."""
    rank: int | None = 64
    """Low-rank form with this rank; None for full-rank adapters."""
    boundary: str | None = "mlp"
    """Kind for a gap whose kept ends lie in different depth thirds; None: no special rule."""
    embedding: str | None = "mlp"
    """Kind for a gap that starts at the embedding; None: no special rule."""
    tail: bool = True
    """Also place an adapter after the last kept layer when layers after it were skipped."""
    force: str | None = None
    """One kind for every non-empty gap (e.g. 'identity' = plain layer dropping); None: the policy."""

    def __post_init__(self):
        for name in ("boundary", "embedding", "force"):
            v = getattr(self, name)
            if v is not None and v not in KINDS:
                raise ValueError(f"unknown adapter type {v!r} for {name}; use one of {', '.join(KINDS)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1 or None (full rank), got {self.rank}")
        if self.linear_max_gap < 0:
            raise ValueError(f"linear_max_gap must be >= 0, got {self.linear_max_gap}")


@dataclass
class AdapterTrainConfig:
    """How adapters are trained (shared by `layerviz adapt`, `layerviz run` configs and notebooks)."""
    init: str = "identity"
    """Stage-1 start: 'identity' (the adapters' own init) or 'lstsq' (closed-form bridge first)."""
    stage1_epochs: int = 20
    """Local training epochs per adapter (0: skip the gradient steps of stage 1)."""
    stage2_epochs: int = 3
    """End-to-end epochs on the final hidden state (0: no stage 2)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    stage2_lr: float = 2e-4
    """AdamW learning rate in stage 2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (pulls towards 0, not the identity; the default reg does that)."""
    reg: float = 1e-4
    """lambda: weight of each adapter's squared distance from the identity map."""
    clip: float = 1.0
    """Gradient-norm clipping."""
    patience: int = 3
    """Early stopping: epochs without a better validation MSE."""
    token_batch: int = 2048
    """Stage 1: tokens per step."""
    sample_batch: int = 4
    """Stage 2: prompts per step."""
    val_fraction: float = 0.25
    """Share of the probe prompts held out for validation and early stopping."""
    skip_first: bool = True
    """Leave the first position out of the MSE: its attention-sink state has huge norms that would dominate."""
    loss: dict = field(default_factory=lambda: {"mse": 1.0})
    """Weights of the hidden-state objective both stages minimize: mse and/or cosine (1 - cos), summed."""
    seed: int = 0

    def __post_init__(self):
        self.loss = check_weights(self.loss, HIDDEN_LOSSES, "hidden-state objective")
        if self.init not in ("identity", "lstsq"):
            raise ValueError(f"unknown adapter init {self.init!r}; use 'identity' or 'lstsq'")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class ImportanceConfig(Settings):
    """What decides an importance run (shared by the CLI, `layerviz run` configs and notebooks)."""

    samples: int = 128
    """Probe prompts (seeded validation users)."""
    loss: str = "likelihood"
    """Probe loss: 'likelihood' (NLL of the positive title) or 'yesno'."""
    batch_size: int = 1
    """Probe batch size; 1 gives the exact per-sample empirical Fisher."""
    normalization: str = "minmax"
    """'minmax' or 'rank'."""
    fusion_weights: dict | str = field(default_factory=lambda: dict(DEFAULT_FUSION))
    """Weights of the fused score over normalized criteria, or 'fit': fitted on the probe (validation)
    examples against the loss ablation (needs ``ablation``), with a cross-fitted validity row. Fixed by default,
    so that fused profiles stay comparable across models, domains and zero-shot vs fine-tuned."""
    ablation: bool = True
    """Also measure the single-layer ablation ground truth and the validity table."""
    ablation_users: int = 32
    """Validation users for the ablation NDCG@10 (1 + ablation_negatives candidates each); 0: loss only."""
    ablation_negatives: int = 19
    """Negatives per ablation user (fewer than the evaluation's, to keep L ablated passes cheap)."""
    scorer: str = "likelihood"
    """Scorer for the ablation NDCG@10."""
    calibration: str = "auto"
    """Likelihood calibration of the ablation NDCG@10: 'auto' (chosen on validation users), 'none' or 'pmi'."""


@dataclass
class SelectConfig(Settings):
    """What decides a selection run (shared by the CLI, `layerviz run` configs and notebooks)."""

    strategy: str = "importance_greedy"
    """One of STRATEGIES."""
    criterion: str = "auto"
    """Importance criterion ordering importance_greedy / top_k; 'auto': the most valid against the loss ablation."""
    highest: bool = True
    """top_k keeps the highest values of the criterion (ShortGPT keeps the highest Block Influence)."""
    k: int | None = 8
    """Layers to keep (importance_greedy: an upper bound; None lets saturation decide)."""
    budget: int | None = None
    """Maximum number of subset evaluations."""
    window: int = 3
    """Saturation: this many consecutive small improvements stop importance_greedy."""
    threshold: float = 0.01
    """Saturation: a relative improvement below this is small."""
    protect_ends: bool = True
    """backward_greedy never removes the first and last layer (SLEB)."""
    evaluator: str = "task"
    """'task' (validation NDCG@10), 'fidelity' (-KL to the full model) or 'hidden_mse'."""
    users: int = 32
    """Validation users the evaluator scores (1 + negatives candidates each)."""
    calibration: str = "auto"
    """Likelihood calibration of the task evaluator: 'auto' (chosen on validation users), 'none' or 'pmi'."""
    reference: str | None = None
    """strategy 'reference': key in data/reference_selections.json (e.g. llama3-8b)."""
    importance: dict = field(default_factory=dict)
    """Overrides for the ImportanceConfig whose table orders importance_greedy / top_k."""


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
    """Overrides of AdapterTrainConfig (init, stage1_epochs, stage2_epochs, lr, reg, ...)."""
    samples: int = 64
    """Probe prompts (validation targets of seeded users) for training; a share is held out."""
    users: int = 100
    """Test users for the NDCG@10 retention (1 + negatives candidates each)."""
    calibration: str = "auto"
    """Likelihood calibration of the retention NDCG: 'auto' (chosen on validation users), 'none' or 'pmi'."""
    objective: str = "mse"
    """What the adapters learn: mse, cosine (hidden states), task (the ranking loss on training windows),
    distill (KL to the full model's candidate distribution), or a weighted sum: 'task+distill', 'task=1,mse=0.1'.
    With task or distill, healing on the training windows replaces stage 2."""
    heal: dict = field(default_factory=dict)
    """Overrides of HealConfig: mode (adapters, lora, last), steps, max_seconds, lr, eval_every, ... A mode other
    than 'adapters' heals also with a hidden-state objective."""
    valid_users: int = 40
    """Validation users (1 + negatives candidates) whose NDCG@10 early-stops healing and picks its best state."""
    control: bool = True
    """When healing trains on the task, also train the full model for as long (same steps, data and task loss;
    LoRA, or its last layers for mode 'last') and report retention against it too: the fair control."""

    def kept(self, n_layers: int) -> list[int]:
        """The layer list from ``layers`` or ``selection`` (checked against the model)."""
        from layerviz.arch import validate_layers  # heavy (torch): not for `--help`

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
            return validate_layers(sel["layers"], n_layers)
        return validate_layers(self.layers, n_layers)


    def heal_config(self) -> HealConfig:
        return HealConfig(**self.heal)

    def healing(self) -> bool:
        """Whether this run heals on the training windows (task or distill in the objective, or a heal mode that
        trains more than the adapters)."""
        return bool({"task", "distill"} & set(parse_objective(self.objective))) or self.heal_config().mode != "adapters"
