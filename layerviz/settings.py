"""The settings every job shares, with one set of defaults, and the configs of the top-level jobs.

``EvalConfig``, ``FinetuneConfig`` and ``BenchConfig`` (here), ``ImportanceConfig``, ``SelectConfig`` and
``AdaptConfig`` (``compression.config``) inherit ``Settings``; the CLI builds each command's flags from these fields
and their docstrings (``layerviz.cli``), and a study sets them once for all its stages (``StudyConfig``). The
modules holding configs import neither torch nor pandas: `layerviz CMD --help` answers at once.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path


@dataclass
class Settings:
    """Model, data protocol, candidates, seed and device: what every job needs to know."""

    model: str = "smollm2-135m"
    """Model preset (`layerviz models`), hub id, local folder or .gguf file."""
    dataset: str = "synthetic-electronics"
    """A real dataset name (ml-100k, ml-1m: `layerviz data list`), a SYNTHETIC one (synthetic-electronics,
    synthetic-movies: for tests), a folder of official or RecBole atomic files, or a file."""
    format: str = "auto"
    """Dataset format (auto: detected from the files; recbole for atomic files)."""
    title_field: str | None = None
    """RecBole atomic files: the .item field holding titles (None: title, movie_title, item_name or name)."""
    item_noun: str | None = None
    """What the prompts call the items ('movies', 'products', 'games', ...; 'game/games' gives the singular).
    None: the dataset's default (movies for MovieLens, products for Amazon, items for RecBole files)."""
    cold_items: float = 0.0
    """Item cold start: this seeded fraction of items (in (0, 0.5]) is removed from training entirely; 0: off."""
    positive_threshold: float = 4.0
    """Protocol: a rating counts as a positive interaction when it is at least this."""
    kcore: int = 5
    """Protocol: users and items are filtered to at least this many positives (k-core)."""
    history_len: int = 20
    """Protocol: the most recent positives shown to the model as the user's history."""
    max_title_tokens: int = 32
    """Each title is cut to this many tokens (prompt length, and the LM-head work per candidate)."""
    negatives: int = 19
    """Sampled negatives per candidate list: each user ranks 1 positive + this many (19 or 99)."""
    seed: int = 0
    """Fixes users, candidates, sampling and training order."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (None: float32 on CPU, bfloat16 on CUDA)."""
    results_dir: str = "results"
    """Where caches, candidate lists and results live (candidates under results_dir/candidates)."""

    def prep_config(self):
        """The protocol these settings describe (a ``PrepConfig``: threshold, k-core, history length, noun, titles,
        cold start)."""
        from layerviz.data.prepare import PrepConfig  # heavy (pandas): not for `--help`

        return PrepConfig(self.positive_threshold, self.kcore, self.history_len, self.item_noun, self.title_field,
                          self.cold_items, self.seed)

    @property
    def candidates_dir(self) -> Path:
        """The seeded candidate lists' folder (shared by every job of this results_dir)."""
        return Path(self.results_dir) / "candidates"


SHARED = tuple(f.name for f in fields(Settings))
"""The names of the shared settings."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal after it), over the class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(inspect.getsource(klass).lstrip())
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:], strict=False):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


# ----------------------------------------------------------------------------- the top-level jobs' configs

CALIBRATIONS = ("auto", "none", "pmi")
"""Likelihood calibration: 'none' (raw mean title log-prob), 'pmi' (minus the title's prior), 'auto' (the better
of the two on validation users)."""
LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The Linear modules of a LLaMA/Qwen3/Gemma3 decoder layer: LoRA's default targets."""
OBJECTIVES = ("rank", "next_title", "yesno")
"""Fine-tuning objectives (``training``'s losses)."""


@dataclass
class EvalConfig(Settings):
    """Everything that decides an evaluation's numbers (shared by the CLI, configs and notebooks)."""

    scorer: str = "likelihood"
    """'likelihood', 'yesno' or 'embedding'."""
    calibration: str = "auto"
    """likelihood scorer: 'auto' (the better of none/pmi by NDCG@10 on validation users), 'pmi' or 'none'."""
    calibration_users: int = 100
    """Validation users on which calibration='auto' chooses (1 + negatives candidates each)."""
    sampler: str = "uniform"
    """Negative sampler: 'uniform' or 'popularity'."""
    users: int | None = 200
    """Users to evaluate (seeded sample); None for all."""
    split: str = "test"
    """'test' (last item) or 'valid' (second to last)."""
    batch_size: int | None = None
    """Candidates per forward pass; None picks one (and backs off on CUDA OOM)."""
    full_ranking: bool = False
    """With the embedding scorer, also rank every item (not just the sampled candidates)."""
    baselines: list[str] = field(default_factory=lambda: ["popularity"])
    """Baselines scored on the same candidate lists: popularity, sasrec (trained here on the training split,
    early-stopped on validation users). Chance is always reported."""
    cold: bool = False
    """Evaluate the cold-start test set: test users whose positive is a cold item (needs cold_items)."""

    def candidate_config(self):
        """The candidate lists these settings describe (a ``CandidateConfig``)."""
        from layerviz.data.candidates import CandidateConfig  # heavy (pandas): not for `--help`

        return CandidateConfig(self.negatives, self.sampler, self.users, self.split, self.seed, self.cold)

    def scoring_config(self, domain: str):
        """How these settings score (a ``ScoringConfig``)."""
        from layerviz.scoring import ScoringConfig  # heavy (torch): not for `--help`

        return ScoringConfig(self.scorer, domain, self.max_title_tokens, self.batch_size, self.calibration)


@dataclass
class FinetuneConfig(Settings):
    """What decides a fine-tuning run (shared by ``layerviz finetune``, study configs and notebooks)."""

    objective: str = "rank"
    """'rank' (softmax CE over candidate scores), 'next_title' (LM loss on the title) or 'yesno'."""
    full: bool = False
    """Full fine-tuning of every weight instead of LoRA (small models)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout (0 keeps training deterministic)."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LIKE_TARGETS))
    """Linear modules LoRA adapts (names inside each decoder layer), or ['all-linear']."""
    lr: float | None = None
    """Peak learning rate; None: 1e-3 with LoRA, 3e-5 full (few steps need a bold LoRA rate)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear warm-up steps, then linear decay to 0 at the planned last step."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    batch_size: int = 4
    """Training examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    train_negatives: int = 7
    """Sampled negatives per training example for 'rank' and 'yesno'."""
    max_steps: int | None = 100
    """Optimizer steps (None: one epoch, or ``epochs``)."""
    epochs: float | None = None
    """Passes over the training windows; with max_steps too, the smaller wins."""
    max_seconds: float | None = None
    """Stop training after this many seconds (evaluation time included); None: no time limit."""
    eval_every: int = 25
    """Validation NDCG@10 every this many steps (and at the end)."""
    eval_users: int = 32
    """Fixed validation users for early stopping (1 + negatives candidates each)."""
    patience: int | None = None
    """Stop after this many evaluations without improvement (None: never stop early)."""
    min_history: int = 1
    """Windows need at least this many earlier items."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (CUDA memory; next_title only, see validate)."""

    def validate(self) -> None:
        """Refuse settings that would fail later, naming the setting and the fix."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        for name in ("batch_size", "grad_accum", "train_negatives", "eval_every", "eval_users", "lora_r", "history_len",
                     "min_history"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: give a positive integer")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: give at least 1 (or None for one epoch)")
        if self.gradient_checkpointing and self.objective != "next_title":
            raise ValueError("gradient_checkpointing works with objective 'next_title' only: 'rank' and 'yesno' "
                             "share the history through the KV cache, which HF disables under checkpointing")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (3e-5 if self.full else 1e-3)


@dataclass
class BenchConfig(Settings):
    """What the efficiency benchmark measures (shared by `layerviz bench`, `layerviz run` and notebooks)."""

    ks: list[int] = field(default_factory=lambda: [4, 8, 12, 16])
    """The k (kept layers) to measure (those >= L are skipped, and those whose FLOP bound is below ``min_bound``)."""
    min_bound: float = 1.0
    """Skip a k (other than the selection's) whose FLOP bound is below this: a speedup that can be at most
    a few percent cannot be told from 1 within a prefill's IQR (demo: Gemma-3-270M's k = 16 of 18, 1.04x)."""
    selection: str | None = None
    """selection.json whose layers are used at its k; other k use evenly spaced layers."""
    adapters: bool = True
    """Also measure compact models with the default adapter policy (rank ``rank``)."""
    adapter_k: list[int] | None = None
    """The k measured with adapters (None: every k)."""
    rank: int | None = 64
    """Adapter rank of the with-adapter variants (None: full rank)."""
    runs: int = 7
    """Timed rounds; each runs every configuration once, in turn (medians and IQRs reported)."""
    warmup: int = 1
    """Untimed rounds before the timed ones."""
    prefill_batch: int = 4
    """Prompts per prefill forward."""
    seq_len: int = 128
    """Tokens per prefill prompt (also the context of the bound's attention term)."""
    qps_queries: int = 3
    """Queries scored back to back for the throughput."""
    isolate: bool = True
    """CPU: measure each configuration's peak memory in its own process (timings always share one)."""
    memory_jobs: int = 2
    """CPU: memory processes run at once (after the timings; each reads only its own peak, so the numbers
    do not change). Their time is mostly single-threaded loading; lower it if two model copies do not fit."""
