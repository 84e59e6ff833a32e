"""Fine-tune the LLM recommender for the task: LoRA (peft) or full, on the training split only.

Objectives, all on the scorers' own prompts (``scoring.Prompt``):

* ``rank``: softmax cross-entropy over the likelihood scorer's scores (mean title log-prob) of
  the positive and ``negatives`` sampled items. It optimises the ranking the evaluation measures.
  The history is encoded once per example and its KV cache shared by the candidates, with
  gradients flowing through the shared prefix (``scoring.shared_prefix_scores``).
* ``next_title``: language-model loss on the next item's title tokens given the history prompt.
* ``yesno``: TALLRec-style binary cross-entropy on log P(Yes) - log P(No) for the positive and
  the sampled negatives.

Training examples are sliding windows over each user's *training* sequence (history = the items
before position t, target = the item at t); negatives are never items the user interacted with.
Validation NDCG@10 on a fixed set of validation users is measured every ``eval_every`` steps and
the best state is kept (step 0, the zero-shot model, included: fine-tuning never makes it worse on
validation). The result is a plain HF model folder: LoRA is merged with ``merge_and_unload``, so
``arch``, layer surgery, importance, selection, compact models and the scorers work on it unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from layerviz import arch, parallel, passes, store
from layerviz.compact import fingerprint
from layerviz.data import CandidateConfig, candidates_for, load
from layerviz.errors import NonFiniteLossError
from layerviz.evaluate import TaskEvaluator
from layerviz.models import load_model, save_weights
from layerviz.progress import progress
from layerviz.scoring import Prompt, ScoringConfig, batched_prefix_scores, pad_right, token_logprobs
from layerviz.settings import Settings

OBJECTIVES = ("rank", "next_title", "yesno")
MANIFEST = "layerviz_finetune.json"
LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


# ----------------------------------------------------------------------------- data


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

    def __init__(self, prep, windows: pd.DataFrame, cfg: FinetuneConfig):
        self.windows, self.cfg = windows, cfg
        self.items = prep.items["item_id"].to_numpy()
        self.code = {it: i for i, it in enumerate(self.items)}
        self.seen = {u: {self.code[i] for i in s if i in self.code} for u, s in prep.seen_by_user().items()}
        self.per_step = cfg.batch_size * cfg.grad_accum

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.windows))

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
        rng = np.random.default_rng([self.cfg.seed, step, j, 7])
        banned = self.seen.get(user, set())
        free = len(self.items) - len(banned)
        if free < self.cfg.train_negatives:
            raise ValueError(f"user {user} has only {free} unseen items for {self.cfg.train_negatives} negatives; "
                             "lower train_negatives")
        picked: list[int] = []
        while len(picked) < self.cfg.train_negatives:
            for d in rng.integers(0, len(self.items), 2 * self.cfg.train_negatives + 4).tolist():
                if d not in banned and d not in picked:
                    picked.append(d)
                    if len(picked) == self.cfg.train_negatives:
                        break
        return self.items[picked].tolist()


# ----------------------------------------------------------------------------- losses


def rank_loss(model, text: Prompt, histories: list[list[str]], positives: list[str],
              negatives: list[list[str]]) -> torch.Tensor:
    """Mean softmax CE of each positive among [positive] + its negatives, on the likelihood scorer's scores.

    The histories are encoded once each (one left-padded pass) and their KV caches shared by the
    candidates (``scoring.batched_prefix_scores``); gradients flow through the shared prefixes.
    """
    scores = batched_prefix_scores(model, text, histories, [[p, *n] for p, n in zip(positives, negatives, strict=True)])
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))


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
    scores = scores.view(len(histories), -1)
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=dev))


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


def batch_loss(model, text: Prompt, titles: dict, examples: list[dict], objective: str) -> torch.Tensor:
    """Mean loss of a micro-batch: one forward for next_title, a prefix and a suffix pass for rank/yesno."""
    if objective == "next_title":
        return next_title_loss(model, text, [[titles[i] for i in e["history"]] for e in examples],
                               [titles[e["target"]] for e in examples])
    fn = rank_loss if objective == "rank" else yesno_loss
    return fn(model, text, [[titles[i] for i in e["history"]] for e in examples], [titles[e["target"]] for e in examples],
              [[titles[i] for i in e["negatives"]] for e in examples])


# ----------------------------------------------------------------------------- model preparation


def linear_names(model) -> list[str]:
    """Names (last component) of the Linear modules inside the decoder layers: what LoRA can target."""
    names = {n.rsplit(".", 1)[-1] for n, m in arch.layers(model).named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def prepare_trainable(base, cfg: FinetuneConfig):
    """A deep copy of ``base`` set up for training -> (wrapper, inner HF model, trainable params).

    The base model is never modified. LoRA goes through peft; the inner model is the plain HF
    causal LM with LoRA layers injected, which every layerviz function accepts.
    """
    work = copy.deepcopy(base)
    if cfg.full:
        for p in work.parameters():
            p.requires_grad_(True)
        return work, work, [p for p in work.parameters()]
    from peft import LoraConfig, get_peft_model  # heavy import, needed only for LoRA

    available = linear_names(work)
    targets = cfg.target_modules
    if targets != ["all-linear"]:
        missing = [t for t in targets if t not in available]
        if missing:
            raise ValueError(f"LoRA target modules {missing} do not exist in {type(base).__name__}'s layers; "
                             f"available: {', '.join(available)} (or 'all-linear')")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else list(targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # LoRA A matrices are random: seeded
        peft_model = get_peft_model(work, lcfg)
    for p in peft_model.parameters():  # fp32 trainable weights, also when the base is bf16
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model, peft_model.get_base_model(), [p for p in peft_model.parameters() if p.requires_grad]


def merged(wrapper, cfg: FinetuneConfig):
    """The plain HF model with LoRA merged into its weights (full fine-tuning: the model itself)."""
    if cfg.full:
        model = wrapper
    else:
        model = wrapper.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------- checkpoints and output


def _trainable_state(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in params.items()}


def _load_trainable(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def partial_path(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoint (next to the output folder)."""
    return out.parent / f".{out.name}.partial.pt"


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a fine-tuned model folder (raises if the folder is not one)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a layerviz fine-tuned model folder (no {MANIFEST})")
    return json.loads(path.read_text())


def check_base(folder: str | Path, base) -> None:
    """Refuse to reuse a fine-tuned folder whose recorded base differs from ``base``."""
    want, have = read_manifest(folder)["base_fingerprint"], fingerprint(base)
    if want != have:
        raise ValueError(f"{folder} was fine-tuned from another base model (fingerprint {want}, this base {have}). "
                         "Fine-tune again (--overwrite) or load the base it was made from.")


def _check_out(out: Path | None, overwrite: bool) -> None:
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
                              "or choose another --out")


def _publish(model, tokenizer, out: Path, manifest: dict, curves: pd.DataFrame) -> None:
    """Write the folder under a temp name, then rename: a killed run never leaves a half-written model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_weights(model, tokenizer, tmp)
        curves.to_csv(tmp / "curves.csv", index=False)
        store.write_json(tmp / MANIFEST, manifest)
        if out.exists():
            old = out.parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    """The fine-tuned (merged) model, its training curves and a summary.

    ``curves``: one row per optimizer step (step, seconds, examples, train_loss, lr, valid_ndcg@10 where
    validation ran, NaN elsewhere); step 0 is the zero-shot model on the validation users.
    """

    model: torch.nn.Module
    curves: pd.DataFrame
    summary: dict
    folder: Path | None = None


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def planned_steps(cfg: FinetuneConfig, n_windows: int) -> int:
    """Optimizer steps the schedule plans for (the LR decays to 0 there)."""
    per_epoch = math.ceil(n_windows / (cfg.batch_size * cfg.grad_accum))
    options = [s for s in (cfg.max_steps, math.ceil(cfg.epochs * per_epoch) if cfg.epochs else None) if s]
    return min(options) if options else per_epoch


class Trainer:
    """One fine-tuning run in the steps ``finetune`` takes: set up (here), resume, train (step by step, each
    evaluation deciding the best state and early stopping), finish and publish."""

    def __init__(self, cfg: FinetuneConfig, model, tokenizer, out: Path | None, overwrite: bool, report):
        cfg.validate()
        _check_out(out, overwrite)
        self.cfg, self.out, self.report = cfg, out, report
        self.prep = load(cfg.dataset, cfg.format, cfg.prep_config(), report=None)
        self.windows = training_windows(self.prep, cfg.history_len, cfg.min_history)
        parallel.check_enough(cfg.batch_size, "examples per micro-batch (batch_size)")  # torchrun: each gets some
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        self.tokenizer, self.base_fp = tokenizer, fingerprint(model)
        self.key = store.config_hash("finetune", {k: v for k, v in asdict(cfg).items() if k != "results_dir"},
                                     self.prep.fingerprint, self.base_fp)
        self.wrapper, self.inner, self.params = prepare_trainable(model, cfg)
        self.named = {n: p for n, p in self.wrapper.named_parameters() if p.requires_grad}
        self.total = planned_steps(cfg, len(self.windows))
        self.opt = torch.optim.AdamW(self.params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, cfg.warmup_steps, self.total))
        self.text = Prompt(tokenizer, ScoringConfig(domain=self.prep.domain, max_title_tokens=cfg.max_title_tokens))
        self.titles, self.schedule = self.prep.titles(), Schedule(self.prep, self.windows, cfg)
        cands, _ = candidates_for(self.prep, CandidateConfig(cfg.negatives, "uniform", cfg.eval_users, "valid",
                                                             cfg.seed), cfg.candidates_dir)
        self.evaluator = TaskEvaluator(self.prep, cands, tokenizer, split="valid", calibration="none",
                                       scorer="yesno" if cfg.objective == "yesno" else "likelihood",
                                       max_title_tokens=cfg.max_title_tokens)
        on_gpu = arch.input_device(model).type == "cuda"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu
                         else torch.autocast("cpu", enabled=False))
        if cfg.gradient_checkpointing:
            self.inner.gradient_checkpointing_enable()
            if hasattr(self.wrapper, "enable_input_require_grads"):
                self.wrapper.enable_input_require_grads()
        self.state = {"step": 0, "elapsed": 0.0, "curves": [], "best": None, "best_step": 0, "bad_evals": 0,
                      "examples": 0}
        self.ckpt = partial_path(out) if out is not None else None
        self.t_start = 0.0

    def validate_now(self) -> float:
        self.inner.eval()
        with self.autocast:
            return float(np.mean(self.evaluator(self.inner)))

    def resume(self, overwrite: bool) -> None:
        """Continue from the checkpoint next to ``out`` when it was made with this very config and base."""
        ckpt, report = self.ckpt, self.report
        if ckpt is None or not ckpt.exists() or overwrite:
            return
        saved = torch.load(ckpt, weights_only=False)
        if saved["base_fingerprint"] != self.base_fp:
            raise ValueError(f"{ckpt} was made from another base model (fingerprint {saved['base_fingerprint']}, "
                             f"this base {self.base_fp}); pass --overwrite to restart from this base")
        if saved["key"] != self.key:
            if report:
                report(f"finetune: {ckpt} was made with other settings; restarting")
            return
        _load_trainable(self.named, saved["params"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.state = saved["state"]
        if report:
            report(f"finetune: resuming from step {self.state['step']} ({ckpt})")

    def save_checkpoint(self) -> None:
        if self.ckpt is None:
            return
        blob = {"key": self.key, "base_fingerprint": self.base_fp, "params": _trainable_state(self.named),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "state": self.state}
        store.atomic_write(self.ckpt, lambda tmp: torch.save(blob, tmp))

    def start(self) -> None:
        """Step 0 (unless resumed): the zero-shot model on the validation users, the first best state."""
        cfg, state = self.cfg, self.state
        if not state["curves"]:
            t0 = time.perf_counter()
            ndcg = self.validate_now()
            state["elapsed"] += time.perf_counter() - t0
            state["curves"].append({"step": 0, "seconds": state["elapsed"], "examples": 0, "train_loss": np.nan,
                                    "lr": 0.0, "valid_ndcg@10": ndcg})
            state["best"], state["best_ndcg"] = _trainable_state(self.named), ndcg
        if self.report:
            self.report(f"finetune {cfg.model} ({'full' if cfg.full else f'LoRA r={cfg.lora_r}'}, {cfg.objective}): "
                        f"{len(self.windows):,} training windows, {self.total} planned steps; validation NDCG@10 "
                        f"before {state['curves'][0]['valid_ndcg@10']:.4f} ({cfg.eval_users} users)")

    def step(self, step: int) -> None:
        """One optimizer step over ``grad_accum`` micro-batches; a non-finite loss saves the last good state and
        raises NonFiniteLossError naming the step."""
        cfg, state = self.cfg, self.state
        self.inner.train(cfg.lora_dropout > 0)
        examples = self.schedule.examples(step)
        passes.count("train")
        step_loss = 0.0
        for m in range(cfg.grad_accum):
            micro = examples[m * cfg.batch_size:(m + 1) * cfg.batch_size]
            part = parallel.shard(len(micro))  # under torchrun: this process's share, its loss weighted by it
            passes.count("backward", len(part))
            with self.autocast:
                loss = batch_loss(self.inner, self.text, self.titles, micro[part.start:part.stop], cfg.objective)
                if len(part) < len(micro):
                    loss = loss * (len(part) / len(micro))
            if not torch.isfinite(loss):
                self.opt.zero_grad(set_to_none=True)
                self.save_checkpoint()
                raise NonFiniteLossError(
                    f"non-finite training loss at step {step} (micro-batch {m}); the last good state (step "
                    f"{state['step']}) is saved in {self.ckpt or 'memory only: no --out'}. Lower the learning rate "
                    f"(now {cfg.peak_lr:g}) or check the model's dtype.")
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        if parallel.active():  # data parallel: the gradients of every process's share summed (as DDP does)
            parallel.all_reduce_grads(self.params)
            step_loss = parallel.all_sum(step_loss)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        state["step"], state["examples"] = step + 1, state["examples"] + len(examples)
        state["curves"].append({"step": step + 1, "seconds": time.perf_counter() - self.t_start,
                                "examples": state["examples"], "train_loss": step_loss,
                                "lr": self.sched.get_last_lr()[0], "valid_ndcg@10": np.nan})  # one row per step

    def evaluate(self, early_stop: bool = True) -> bool:
        """Validation NDCG@10 now, on the last curve row; a better one becomes the best state -> whether
        early stopping ends the run (``patience`` evaluations without improvement)."""
        state, cfg = self.state, self.cfg
        ndcg = state["curves"][-1]["valid_ndcg@10"] = self.validate_now()
        state["elapsed"] = state["curves"][-1]["seconds"] = time.perf_counter() - self.t_start
        if ndcg > state["best_ndcg"]:
            state["best"], state["best_ndcg"], state["best_step"], state["bad_evals"] = (
                _trainable_state(self.named), ndcg, state["step"], 0)
        else:
            state["bad_evals"] += 1
        if not early_stop:
            return False
        self.save_checkpoint()
        return cfg.patience is not None and state["bad_evals"] >= cfg.patience

    def train(self, stop_after: int | None) -> str:
        """Steps from the current one to the planned total, evaluating every ``eval_every`` -> why it stopped.
        ``stop_after`` (tests) raises KeyboardInterrupt after that many steps, as a kill would."""
        cfg = self.cfg
        self.t_start = time.perf_counter() - self.state["elapsed"]
        for ran, step in enumerate(progress(range(self.state["step"], self.total), desc=f"finetune {cfg.objective}",
                                            unit="step"), start=1):
            if cfg.max_seconds is not None and time.perf_counter() - self.t_start >= cfg.max_seconds:
                return f"time budget ({cfg.max_seconds:g} s)"
            self.step(step)
            if ((step + 1) % cfg.eval_every == 0 or step + 1 == self.total) and self.evaluate():
                return f"early stop: {cfg.patience} evaluations without improvement"
            if stop_after is not None and ran >= stop_after:
                raise KeyboardInterrupt(f"stop_after={stop_after}")
        return "planned steps done"

    def finish(self, stopped: str) -> FinetuneResult:
        """The best state merged into a plain model, its summary and curves (published when ``out`` is given)."""
        cfg, state = self.cfg, self.state
        state["elapsed"] = time.perf_counter() - self.t_start
        if np.isnan(state["curves"][-1]["valid_ndcg@10"]):  # steps after the last evaluation (time budget)
            self.evaluate(early_stop=False)
        _load_trainable(self.named, state["best"])
        result_model = merged(self.wrapper, cfg)
        curves = pd.DataFrame(state["curves"])
        summary = {"base": cfg.model, "objective": cfg.objective, "method": "full" if cfg.full else "lora",
                   "steps": state["step"], "planned_steps": self.total, "best_step": state["best_step"],
                   "examples": state["examples"], "windows": len(self.windows), "stopped": stopped,
                   "valid_ndcg@10_before": float(curves["valid_ndcg@10"].iloc[0]),
                   "valid_ndcg@10_after": float(state["best_ndcg"]), "eval_users": cfg.eval_users,
                   "seconds": float(curves["seconds"].iloc[-1]), "lr": cfg.peak_lr,
                   "trainable_params": int(sum(p.numel() for p in self.params))}
        if self.report:
            self.report(f"finetune: {state['step']} steps ({stopped}), {state['examples']} examples in "
                        f"{summary['seconds']:.0f} s; validation NDCG@10 {summary['valid_ndcg@10_before']:.4f} -> "
                        f"{summary['valid_ndcg@10_after']:.4f} (best step {state['best_step']})")
        if self.out is not None:
            self.publish(result_model, summary, curves)
        return FinetuneResult(result_model, curves, summary, self.out)

    def publish(self, result_model, summary: dict, curves: pd.DataFrame) -> None:
        out = self.out
        manifest = store.manifest(self.cfg, self.cfg.seed, base=self.cfg.model, base_fingerprint=self.base_fp,
                                  finetuned_fingerprint=fingerprint(result_model),
                                  data_fingerprint=self.prep.fingerprint, key=self.key, summary=summary,
                                  curves=self.state["curves"])
        _publish(result_model, self.tokenizer, out, manifest, curves)
        if self.ckpt is not None and self.ckpt.exists():
            self.ckpt.unlink()
        if self.report:
            self.report(f"wrote {out} (load it with load_model({str(out)!r}) or --model {out})")


def finetune(cfg: FinetuneConfig, model=None, tokenizer=None, out: str | Path | None = None,
             overwrite: bool = False, report=print, stop_after: int | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.dataset``'s training windows -> FinetuneResult (base model untouched).

    With ``out``, a checkpoint is saved next to it at every evaluation, a rerun of the same config
    resumes from it, and the merged model is published atomically as a plain HF folder.
    ``stop_after`` (tests) raises KeyboardInterrupt after that many steps, as a kill would.
    """
    run = Trainer(cfg, model, tokenizer, Path(out) if out is not None else None, overwrite, report)
    run.resume(overwrite)
    run.start()
    return run.finish(run.train(stop_after))
