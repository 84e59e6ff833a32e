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
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerviz import arch, parallel, passes, store
from layerviz.data import CandidateConfig, candidates_for, load
from layerviz.data.prompts import Prompt, PromptConfig
from layerviz.evaluate import TaskEvaluator
from layerviz.models import FINETUNE_MANIFEST, fingerprint, load_model, save_weights
from layerviz.settings import FinetuneConfig
from layerviz.training import (
    BestState,
    Loop,
    Schedule,
    batch_loss,
    inject_lora,
    merge_lora,
    restore,
    snapshot,
    training_windows,
)

# ----------------------------------------------------------------------------- model preparation


def prepare_trainable(base, cfg: FinetuneConfig):
    """A deep copy of ``base`` set up for training -> (the model to train, its LoRA tuner or None, the trained
    parameters). The base model is never modified; LoRA goes through peft (``training.inject_lora``)."""
    work = copy.deepcopy(base)
    if cfg.full:
        for p in work.parameters():
            p.requires_grad_(True)
        return work, None, list(work.parameters())
    tuner, params = inject_lora(work, cfg.target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.seed)
    return work, tuner, params


def merged(work, tuner):
    """The plain HF model with LoRA merged into its weights (full fine-tuning: the model itself), frozen."""
    model = merge_lora(tuner) if tuner is not None else work
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------- checkpoints and output


def partial_path(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoint (next to the output folder)."""
    return out.parent / f".{out.name}.partial.pt"


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
        store.write_json(tmp / FINETUNE_MANIFEST, manifest)
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


CHECKPOINT_FORMAT = 2
"""Checkpoints of another format are not resumed (the run restarts)."""


class Trainer:
    """One fine-tuning run in the steps ``finetune`` takes: set up (here), resume, train (``training.Loop``: steps,
    validation every ``eval_every``, the best state kept, early stopping), finish and publish."""

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
        self.inner, self.tuner, self.params = prepare_trainable(model, cfg)
        self.total = planned_steps(cfg, len(self.windows))
        self.opt = torch.optim.AdamW(self.params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, cfg.warmup_steps, self.total))
        self.text = Prompt(tokenizer, PromptConfig(self.prep.domain, cfg.max_title_tokens))
        self.titles = self.prep.titles()
        self.schedule = Schedule(self.prep, self.windows, cfg.seed, cfg.batch_size * cfg.grad_accum,
                                 cfg.train_negatives)
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
            self.inner.enable_input_require_grads()
        self.ckpt = partial_path(out) if out is not None else None
        self.best = BestState(self.params, patience=cfg.patience)
        self.loop = Loop(self.best, self.opt, self.validate_now, clip=cfg.max_grad_norm, shared=True,
                         scheduler=self.sched, on_fail=self.save_on_failure,
                         hint=f"Lower the learning rate (now {cfg.peak_lr:g}) or check the model's dtype.")
        self.step_done, self.examples = 0, 0

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
        if saved["key"] != self.key or saved.get("format") != CHECKPOINT_FORMAT:
            if report:
                report(f"finetune: {ckpt} was made with other settings; restarting")
            return
        restore(self.params, saved["params"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.best.load_state_dict(saved["best"])
        self.loop.rows, self.step_done, self.examples = saved["rows"], saved["step"], saved["examples"]
        self.loop.t0 = time.perf_counter() - saved["elapsed"]
        if report:
            report(f"finetune: resuming from step {self.step_done} ({ckpt})")

    def save_checkpoint(self) -> None:
        if self.ckpt is None:
            return
        blob = {"format": CHECKPOINT_FORMAT, "key": self.key, "base_fingerprint": self.base_fp,
                "params": snapshot(self.params), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "best": self.best.state_dict(), "rows": self.loop.rows,
                "step": self.step_done, "examples": self.examples, "elapsed": self.loop.elapsed()}
        store.atomic_write(self.ckpt, lambda tmp: torch.save(blob, tmp))

    def save_on_failure(self) -> str:
        """Before a non-finite loss restores the best state: the last good one, checkpointed -> what to say."""
        self.save_checkpoint()
        return f"; the last good state (step {self.step_done}) is saved in {self.ckpt or 'memory only: no --out'}"

    def start(self) -> None:
        """Step 0 (unless resumed): the zero-shot model on the validation users, the first best state."""
        cfg = self.cfg
        if not self.loop.rows:
            self.loop.start({"seconds": 0.0, "examples": 0, "train_loss": np.nan, "lr": 0.0})
            self.loop.rows[0]["seconds"] = self.loop.elapsed()
        if self.report:
            self.report(f"finetune {cfg.model} ({'full' if cfg.full else f'LoRA r={cfg.lora_r}'}, {cfg.objective}): "
                        f"{len(self.windows):,} training windows, {self.total} planned steps; validation NDCG@10 "
                        f"before {self.loop.rows[0]['valid_ndcg@10']:.4f} ({cfg.eval_users} users)")

    def step(self, step: int) -> dict:
        """Optimizer step ``step`` (1-based) over ``grad_accum`` micro-batches -> its curve row."""
        cfg = self.cfg
        self.inner.train(cfg.lora_dropout > 0)
        examples = self.schedule.examples(step - 1)
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
            self.loop.backward(loss / cfg.grad_accum, f"step {step} (micro-batch {m})")
            step_loss += float(loss.detach()) / cfg.grad_accum
        if parallel.active():
            step_loss = parallel.all_sum(step_loss)
        self.loop.apply()
        self.step_done, self.examples = step, self.examples + len(examples)
        return {"seconds": self.loop.elapsed(), "examples": self.examples, "train_loss": step_loss,
                "lr": self.sched.get_last_lr()[0]}

    def train(self, stop_after: int | None) -> str:
        """Steps from the current one to the planned total, validating every ``eval_every`` -> why it stopped.
        ``stop_after`` (tests) raises KeyboardInterrupt after that many steps, as a kill would."""
        cfg, ran = self.cfg, [0]

        def after(step: int, validated: bool) -> None:
            if validated:
                self.loop.rows[-1]["seconds"] = self.loop.elapsed()
                self.save_checkpoint()
            ran[0] += 1
            if stop_after is not None and ran[0] >= stop_after:
                raise KeyboardInterrupt(f"stop_after={stop_after}")

        return self.loop.run(range(self.step_done + 1, self.total + 1), self.step, eval_every=cfg.eval_every,
                             last=self.total, max_seconds=cfg.max_seconds, after=after,
                             desc=f"finetune {cfg.objective}", done="planned steps done")

    def finish(self, stopped: str) -> FinetuneResult:
        """The best state merged into a plain model, its summary and curves (published when ``out`` is given)."""
        cfg = self.cfg
        curves = self.loop.finish()
        curves.loc[curves.index[-1], "seconds"] = self.loop.elapsed()  # its validation included, as at every other
        result_model = merged(self.inner, self.tuner)
        summary = {"base": cfg.model, "objective": cfg.objective, "method": "full" if cfg.full else "lora",
                   "steps": self.step_done, "planned_steps": self.total, "best_step": self.best.at,
                   "examples": self.examples, "windows": len(self.windows), "stopped": stopped,
                   "valid_ndcg@10_before": float(curves["valid_ndcg@10"].iloc[0]),
                   "valid_ndcg@10_after": float(self.best.value), "eval_users": cfg.eval_users,
                   "seconds": float(curves["seconds"].iloc[-1]), "lr": cfg.peak_lr,
                   "trainable_params": int(sum(p.numel() for p in self.params))}
        if self.report:
            self.report(f"finetune: {self.step_done} steps ({stopped}), {self.examples} examples in "
                        f"{summary['seconds']:.0f} s; validation NDCG@10 {summary['valid_ndcg@10_before']:.4f} -> "
                        f"{summary['valid_ndcg@10_after']:.4f} (best step {self.best.at})")
        if self.out is not None:
            self.publish(result_model, summary, curves)
        return FinetuneResult(result_model, curves, summary, self.out)

    def publish(self, result_model, summary: dict, curves: pd.DataFrame) -> None:
        out = self.out
        manifest = store.manifest(self.cfg, self.cfg.seed, base=self.cfg.model, base_fingerprint=self.base_fp,
                                  finetuned_fingerprint=fingerprint(result_model),
                                  data_fingerprint=self.prep.fingerprint, key=self.key, summary=summary,
                                  curves=self.loop.rows)
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
