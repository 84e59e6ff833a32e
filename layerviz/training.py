"""One training loop for every job that trains: fine-tuning, adapter fitting, healing and SASRec.

What the four share is written here once; each job brings its loss, its trainable parameters and its
validation:

* the recommender's training data: sliding windows over each user's *training* sequence (``training_windows``),
  which windows and negatives each step trains on (``Schedule``: a pure function of seed and step, so resumable),
  and the losses on the scorers' own prompts (``rank_loss``, ``yesno_loss``, ``next_title_loss``);
* ``BestState``: the best validation value and the trainable state that gave it (the state before any training
  included), patience counted in evaluations or in epochs, and one improvement rule (``improves``);
* ``Loop``: units (optimizer steps or epochs) within a budget, validation at a cadence, gradient clipping, the
  gradients of several processes summed, and the non-finite-loss guard (it restores the best state and raises
  ``NonFiniteLossError`` naming the step);
* ``Frozen``: every parameter but the trained ones frozen for the length of a ``with`` block;
* one LoRA path on peft: ``inject_lora`` (peft's ``LoraModel``, in place) and ``merge_lora`` (its
  ``merge_and_unload``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from layerviz import arch, parallel
from layerviz.data.prompts import Prompt
from layerviz.errors import NonFiniteLossError
from layerviz.progress import progress
from layerviz.scoring import batched_prefix_scores, pad_right, token_logprobs

REL_MARGIN = 1e-4
"""The improvement rule's margin: a validation value improves on the best by more than 1e-4 of it (relative, as
PyTorch's ReduceLROnPlateau decides by default). Ties and changes of rounding size never count as progress."""


# ----------------------------------------------------------------------------- the best state and patience


def improves(value: float, best: float | None, bigger: bool = True) -> bool:
    """The one improvement rule: ``value`` beats ``best`` by more than REL_MARGIN x |best| (None: anything does)."""
    if best is None:
        return True
    margin = REL_MARGIN * abs(best)
    return value > best + margin if bigger else value < best - margin


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A CPU copy of each tensor (what a best state or a checkpoint keeps)."""
    return [p.detach().cpu().clone() for p in params]


@torch.no_grad()
def restore(params: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    """Copy a snapshot back into the tensors it was taken from (device and dtype of the target)."""
    for p, s in zip(params, state, strict=True):
        p.copy_(s.to(p.device, p.dtype))


class BestState:
    """The best validation value seen, where (step or epoch), and a snapshot of the trained tensors then.

    The first observation (the state before any training, by convention) is always the first best, whatever its
    value: a run never ends worse on validation than it started. ``patience`` stops a run after that many
    evaluations without improvement (``unit='evaluations'``) or that many epochs after the best one
    (``unit='epochs'``); None never stops early.
    """

    UNITS = ("evaluations", "epochs")

    def __init__(self, params: list[torch.Tensor], *, bigger: bool = True, patience: int | None = None,
                 unit: str = "evaluations", metric: str = "validation NDCG@10", at: str = "step"):
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience={patience!r}: give a positive integer (or None to never stop early)")
        if unit not in self.UNITS:
            raise ValueError(f"unknown patience unit {unit!r}; use one of {', '.join(self.UNITS)}")
        self.params, self.bigger, self.patience, self.unit = list(params), bigger, patience, unit
        self.metric, self.at_name = metric, at
        self.value: float | None = None
        self.at, self.bad, self.state = 0, 0, None

    def observe(self, value: float, at: int) -> bool:
        """Record the validation ``value`` at step/epoch ``at``; a better one keeps the state -> whether patience
        has run out. A non-finite value restores the best state and raises."""
        if not math.isfinite(value):
            self.fail(f"non-finite {self.metric} ({value}) at {self.at_name} {at}", "")
        if self.state is None or improves(value, self.value, self.bigger):
            self.value, self.at, self.state, self.bad = value, at, snapshot(self.params), 0
        else:
            self.bad += 1
        return self.exhausted(at)

    def exhausted(self, at: int) -> bool:
        if self.patience is None:
            return False
        return (self.bad if self.unit == "evaluations" else at - self.at) >= self.patience

    def restore(self) -> None:
        if self.state is not None:
            restore(self.params, self.state)

    def describe(self) -> str:
        """e.g. 'step 4, validation NDCG@10 0.5123'."""
        return f"{self.at_name} {self.at}, {self.metric} {self.value:.4g}" if self.state is not None else "none yet"

    def fail(self, what: str, hint: str) -> None:
        """Restore the best state and raise NonFiniteLossError saying what happened, what was restored, and the fix."""
        self.restore()
        restored = f"the best state so far ({self.describe()}) was restored" if self.state is not None else \
            "no validated state to restore yet"
        raise NonFiniteLossError(f"{what}; {restored}. {hint}".strip())

    def state_dict(self) -> dict:
        return {"value": self.value, "at": self.at, "bad": self.bad, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.at, self.bad, self.state = d["value"], d["at"], d["bad"], d["state"]


# ----------------------------------------------------------------------------- the loop


class Loop:
    """Train in units (optimizer steps or epochs), validating at a cadence; the best state is kept.

    ``step(loss, where)`` is one optimizer step: the non-finite guard, backward, the gradients of every process
    summed (``shared``), clipping (``clip``; None: none), the optimizer and the LR schedule. ``run`` calls
    ``train(unit) -> row`` for each unit and ``validate() -> value`` after every ``eval_every``-th and the last
    one, within ``max_seconds``; ``rows`` holds one row per unit (unit 0: before training), the validation value
    under ``column`` where measured. ``on_fail`` runs before the best state is restored on a non-finite loss.
    """

    def __init__(self, best: BestState, optimizer: torch.optim.Optimizer, validate: Callable[[], float], *,
                 clip: float | None = None, shared: bool = False, scheduler=None, column: str = "valid_ndcg@10",
                 what: str = "training", hint: str = "", on_fail: Callable[[], str] | None = None):
        self.best, self.opt, self.validate, self.clip, self.shared = best, optimizer, validate, clip, shared
        self.sched, self.column, self.what, self.hint, self.on_fail = scheduler, column, what, hint, on_fail
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def check(self, loss: torch.Tensor, where: str) -> None:
        """Raise on a non-finite loss (after ``on_fail``), with the best state restored."""
        if torch.isfinite(loss).all():
            return
        self.opt.zero_grad(set_to_none=True)
        extra = self.on_fail() if self.on_fail else ""
        self.best.fail(f"non-finite {self.what} loss at {where} (value {float(loss.detach())}){extra}", self.hint)

    def backward(self, loss: torch.Tensor, where: str) -> None:
        """Guard, then accumulate the gradients of ``loss`` (a micro-batch's share of a step)."""
        self.check(loss, where)
        loss.backward()

    def apply(self) -> None:
        """The optimizer step on the accumulated gradients: summed over processes, clipped, applied, cleared."""
        if self.shared and parallel.active():  # data parallel: every process's share summed (as DDP does)
            parallel.all_reduce_grads(self.params)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor, where: str) -> None:
        """One optimizer step on one loss."""
        self.opt.zero_grad(set_to_none=True)
        self.backward(loss, where)
        self.apply()

    def evaluate(self, at: int) -> bool:
        """Validate now into the last row -> whether patience has run out."""
        value = self.rows[-1][self.column] = float(self.validate())
        return self.best.observe(value, at)

    def start(self, row: dict | None = None) -> None:
        """Unit 0: the state before training, validated: the first best state."""
        self.rows.append({self.best.at_name: 0, **(row or {}), self.column: np.nan})
        self.evaluate(0)

    def run(self, units: Iterable[int], train: Callable[[int], dict], *, eval_every: int = 1, last: int | None = None,
            max_seconds: float | None = None, after: Callable[[int, bool], None] | None = None,
            desc: str | None = None, unit: str = "step", done: str = "budget done") -> str:
        """``train(u) -> row`` for each unit, validating every ``eval_every``-th and the ``last`` one, within
        ``max_seconds``; ``after(u, validated)`` runs after each unit -> why it stopped."""
        for u in progress(units, desc=desc, unit=unit) if desc else units:
            if max_seconds is not None and self.elapsed() >= max_seconds:
                return f"time budget ({max_seconds:g} s)"
            self.rows.append({self.best.at_name: u, **train(u), self.column: np.nan})
            validated = u % eval_every == 0 or u == last
            stop = validated and self.evaluate(u)
            if after is not None:
                after(u, validated)
            if stop:
                return f"early stop: {self.best.patience} {self.best.unit} without improvement"
        return done

    def finish(self) -> pd.DataFrame:
        """Validate the last unit if it was not, restore the best state -> the curve (one row per unit)."""
        if self.rows and np.isnan(self.rows[-1][self.column]):
            self.evaluate(self.rows[-1][self.best.at_name])
        self.best.restore()
        curve = pd.DataFrame(self.rows)
        curve.attrs.update(best_at=self.best.at, best_value=self.best.value, seconds=self.elapsed())
        return curve


class Frozen:
    """Freeze every parameter of ``model`` except ``trainable``; restore the requires_grad flags on exit."""

    def __init__(self, model, trainable):
        self.model, self.trainable = model, {id(p) for p in trainable}

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(id(p) in self.trainable)

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------- LoRA on peft


def linear_names(model) -> list[str]:
    """Names (last component) of the Linear modules inside the decoder layers: what LoRA can target."""
    names = {n.rsplit(".", 1)[-1] for n, m in arch.layers(model).named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def inject_lora(model, targets: list[str], r: int, alpha: int, dropout: float = 0.0, seed: int = 0):
    """LoRA injected in place into the decoder layers' ``targets`` (or ['all-linear']) through peft's ``LoraModel``
    -> (the tuner, to merge with ``merge_lora``; the LoRA parameters, in fp32 also on a bf16 base)."""
    from peft import LoraConfig, LoraModel  # heavy import, needed only for LoRA

    available = linear_names(model)
    missing = [t for t in targets if t not in available] if targets != ["all-linear"] else []
    if missing:
        raise ValueError(f"LoRA target modules {missing} do not exist in {type(model).__name__}'s layers; "
                         f"available: {', '.join(available)} (or 'all-linear')")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                     target_modules="all-linear" if targets == ["all-linear"] else list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA's A matrices are random: seeded
        tuner = LoraModel(model, cfg, "default")
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
    return tuner, params


def merge_lora(tuner):
    """Each LoRA folded into its base Linear, the plain Linears put back (peft's ``merge_and_unload``) -> the model."""
    return tuner.merge_and_unload()


# ----------------------------------------------------------------------------- the recommender's training data


def training_windows(prep, history_len: int, min_history: int = 1) -> pd.DataFrame:
    """Sliding windows over each user's training sequence: user_id, target, history (item ids, oldest first).

    Only ``split == 'train'`` events are used, so no validation or test target is ever a training
    target or part of a training history.
    """
    train = prep.events[prep.events["split"] == "train"]
    rows = []
    for u, seq in train.groupby("user_id", sort=True)["item_id"]:
        items = seq.tolist()
        for t in range(min_history, len(items)):
            rows.append((u, items[t], items[max(0, t - history_len):t]))
    if not rows:
        raise ValueError(
            f"{prep.name}: the training set is empty after the protocol: no user has {min_history + 1} or more "
            f"training positives ({prep.events['user_id'].nunique()} users, "
            f"{int((prep.events['split'] == 'train').sum())} training events). Lower kcore or "
            "positive_threshold, lower min_history, or use more data."
        )
    return pd.DataFrame(rows, columns=["user_id", "target", "history"])


class Schedule:
    """Which windows and negatives each step trains on: a pure function of (seed, step), so resumable."""

    def __init__(self, prep, windows: pd.DataFrame, seed: int, per_step: int, negatives: int):
        self.windows, self.seed, self.per_step, self.n_negatives = windows, seed, per_step, negatives
        self.items = prep.items["item_id"].to_numpy()
        self.code = {it: i for i, it in enumerate(self.items)}
        self.seen = {u: {self.code[i] for i in s if i in self.code} for u, s in prep.seen_by_user().items()}

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def examples(self, step: int) -> list[dict]:
        """The step's examples: user_id, target, history, negatives (item ids)."""
        out = []
        for j in range(self.per_step):
            flat = step * self.per_step + j
            epoch, pos = divmod(flat, len(self.windows))
            w = self.windows.iloc[int(self.order(epoch)[pos])]
            out.append({"user_id": w["user_id"], "target": w["target"], "history": list(w["history"]),
                        "negatives": self.negatives(w["user_id"], step, j)})
        return out

    def negatives(self, user, step: int, j: int) -> list:
        """Uniform negatives among items the user never interacted with (seeded by step and slot)."""
        rng = np.random.default_rng([self.seed, step, j, 7])
        banned = self.seen.get(user, set())
        free = len(self.items) - len(banned)
        if free < self.n_negatives:
            raise ValueError(f"user {user} has only {free} unseen items for {self.n_negatives} negatives; "
                             "lower train_negatives")
        picked: list[int] = []
        while len(picked) < self.n_negatives:
            for d in rng.integers(0, len(self.items), 2 * self.n_negatives + 4).tolist():
                if d not in banned and d not in picked:
                    picked.append(d)
                    if len(picked) == self.n_negatives:
                        break
        return self.items[picked].tolist()


# ----------------------------------------------------------------------------- losses


def softmax_ce(scores: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of column 0 (the positive) in each row of candidate scores."""
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))


def rank_loss(model, text: Prompt, histories: list[list[str]], positives: list[str],
              negatives: list[list[str]]) -> torch.Tensor:
    """Mean softmax CE of each positive among [positive] + its negatives, on the likelihood scorer's scores.

    The histories are encoded once each (one left-padded pass) and their KV caches shared by the
    candidates (``scoring.batched_prefix_scores``); gradients flow through the shared prefixes.
    """
    return softmax_ce(batched_prefix_scores(model, text, histories,
                                            [[p, *n] for p, n in zip(positives, negatives, strict=True)]))


def rank_loss_naive(model, text: Prompt, histories: list[list[str]], positives: list[str],
                    negatives: list[list[str]]) -> torch.Tensor:
    """Reference for ``rank_loss``: each history repeated in front of each of its candidates, one padded batch."""
    dev = arch.input_device(model)
    rows = []  # (prefix ids, title ids) per candidate, example-major
    for h, p, negs in zip(histories, positives, negatives, strict=True):
        prefix = text.likelihood_prefix(h)
        rows += [(prefix, text.title_ids(t)) for t in [p, *negs]]
    ids, mask = pad_right([a + b for a, b in rows], text.tok.pad_token_id, dev)
    hidden, _ = arch.run_decoder(model, ids, mask)
    r_idx = torch.cat([torch.full((len(t),), r, device=dev) for r, (_, t) in enumerate(rows)])
    pos = torch.cat([torch.arange(len(a) - 1, len(a) + len(t) - 1, device=dev) for a, t in rows])
    tgt = torch.tensor([i for _, t in rows for i in t], device=dev)
    lp = token_logprobs(model, hidden[r_idx, pos], tgt)
    scores = torch.zeros(len(rows), device=dev).index_add(0, r_idx, lp) / torch.tensor(
        [len(t) for _, t in rows], device=dev)
    return softmax_ce(scores.view(len(histories), -1))


def yesno_loss(model, text: Prompt, histories: list[list[str]], positives: list[str],
               negatives: list[list[str]]) -> torch.Tensor:
    """Binary CE on log P(Yes) - log P(No): positives labelled Yes, negatives No (classes weighted equally)."""
    margin = batched_prefix_scores(model, text, histories, [[p, *n] for p, n in zip(positives, negatives, strict=True)],
                                   "yesno")
    labels = torch.zeros_like(margin)
    labels[:, 0] = 1.0
    per = F.binary_cross_entropy_with_logits(margin, labels, reduction="none")
    return (0.5 * (per[:, 0] + per[:, 1:].mean(1))).mean()


def next_title_loss(model, text: Prompt, histories: list[list[str]], targets: list[str]) -> torch.Tensor:
    """Mean NLL of each target title's tokens given its history prompt (one padded batch), averaged."""
    dev = arch.input_device(model)
    prefixes = [text.likelihood_prefix(h) for h in histories]
    titles = [text.title_ids(t) for t in targets]
    ids, mask = pad_right([p + t for p, t in zip(prefixes, titles, strict=True)], text.tok.pad_token_id, dev)
    hidden, _ = arch.run_decoder(model, ids, mask)
    rows = torch.cat([torch.full((len(t),), r, device=dev) for r, t in enumerate(titles)])
    pos = torch.cat([torch.arange(len(p) - 1, len(p) + len(t) - 1, device=dev)
                     for p, t in zip(prefixes, titles, strict=True)])
    tgt = torch.tensor([i for t in titles for i in t], device=dev)
    nll = -token_logprobs(model, hidden[rows, pos], tgt)
    per_example = torch.zeros(len(titles), device=dev).index_add(0, rows, nll) / torch.tensor(
        [len(t) for t in titles], device=dev)
    return per_example.mean()


OBJECTIVES = {"rank": rank_loss, "yesno": yesno_loss}
"""The candidate-list objectives by name (``next_title`` reads no negatives)."""


def batch_loss(model, text: Prompt, titles: dict, examples: list[dict], objective: str) -> torch.Tensor:
    """Mean loss of a micro-batch: one forward for next_title, a prefix and a suffix pass for rank/yesno."""
    histories = [[titles[i] for i in e["history"]] for e in examples]
    if objective == "next_title":
        return next_title_loss(model, text, histories, [titles[e["target"]] for e in examples])
    return OBJECTIVES[objective](model, text, histories, [titles[e["target"]] for e in examples],
                                 [[titles[i] for i in e["negatives"]] for e in examples])
