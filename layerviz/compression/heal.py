"""RQ3: heal a compact recommender with the task's own loss, by distillation, or both.

After the adapters are fitted to hidden states (``layerviz.compression.adapters``), ``heal`` trains on the recommender's
training windows (the fine-tuning data, ``training.training_windows``) with a weighted objective:

* ``task``: the ``rank`` objective of fine-tuning, softmax cross-entropy over the compact model's likelihood
  scores of the positive and sampled negatives, the history shared through the KV cache;
* ``distill``: KL(teacher || student) between the full model's and the compact model's softmax over the same
  candidates at temperature T (times T^2, as Hinton et al.);
* ``mse``, ``cosine``: the final pre-norm hidden state of the history prompt against the full model's.

What trains (``mode``): the adapters only (``adapters``), also LoRA on the kept layers (``lora``, through peft,
merged afterwards), or also the last kept layers, the final norm and the LM head (``last``, as "Reassessing
layer pruning" does). The budget is in steps or seconds; the validation users' NDCG@10 is measured at step 0
and every ``eval_every`` steps, and the best state is kept (step 0 included). The same function trains the full
model for as long on the same data and objective: the fair control of a healed compact model.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from layerviz import arch, passes
from layerviz.compression.adapters import hidden_loss, loss_mask
from layerviz.compression.compact import CompactLM
from layerviz.compression.config import (
    HIDDEN_LOSSES,
    HealConfig,
    objective_label,
    parse_objective,
)
from layerviz.data.prompts import Prompt, PromptConfig
from layerviz.models import fingerprint
from layerviz.scoring import batched_prefix_scores, pad_right
from layerviz.training import (
    BestState,
    Frozen,
    Loop,
    Schedule,
    inject_lora,
    merge_lora,
    softmax_ce,
    training_windows,
)


def check_teacher(teacher, student, tokenizer, teacher_tokenizer=None) -> None:
    """A distillation teacher must be the compact model's own base, read with the same tokenizer."""
    want = student.base["fingerprint"] if isinstance(student, CompactLM) else fingerprint(student)
    have = fingerprint(teacher)
    if have != want:
        raise ValueError(f"the distillation teacher (fingerprint {have}) is not the model the compact model was built "
                         f"from (fingerprint {want}): distil from that very model")
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError("the distillation teacher's tokenizer differs from the compact model's: the candidate "
                         "scores would not be comparable; use the tokenizer the base model was loaded with")


def trainable(student, cfg: HealConfig) -> tuple[object, list, list, list[str], object]:
    """Set ``student`` up for healing -> (the model to train, the parameters trained at ``lr`` (adapters, LoRA),
    those trained at lr / 10 (mode 'last': pretrained weights), the weight-name prefixes healing changes, the LoRA
    tuner or None). LoRA and 'last' need weights of their own: a compact model must have been built with
    share=False; a full model (the control) is deep-copied here."""
    if isinstance(student, CompactLM) and cfg.mode != "adapters" and student.base.get("shared", True):
        raise ValueError(f"heal mode {cfg.mode!r} changes the kept layers: build the compact model with share=False "
                         "so that the base model's weights stay as they are")
    if not isinstance(student, CompactLM) and cfg.mode == "adapters":
        raise ValueError("a full model has no adapters to heal: train it with heal mode 'lora' or 'last'")
    model = student if isinstance(student, CompactLM) else copy.deepcopy(student)
    params = [p for a in model.adapters() for p in a.parameters()] if isinstance(model, CompactLM) else []
    hf = model.hf if isinstance(model, CompactLM) else model
    if cfg.mode == "lora":
        tuner, lora = inject_lora(hf, list(cfg.target_modules), cfg.lora_r, cfg.lora_alpha, seed=0)
        return model, params + lora, [], ["model.layers."], tuner
    if cfg.mode == "last":
        n = arch.num_layers(hf)
        keep = list(range(max(0, n - cfg.last_layers), n))
        mods = [arch.layers(hf)[i] for i in keep] + [arch.final_norm(hf), arch.lm_head(hf)]
        extra = [p for m in mods for n_, p in m.named_parameters() if not _is_adapter(n_)]
        return model, params, extra, [f"model.layers.{i}." for i in keep] + ["model.norm.", "lm_head."], None
    return model, params, [], [], None


def _is_adapter(name: str) -> bool:
    return any(part in ("before", "after", "fold") for part in name.split("."))


# ----------------------------------------------------------------------------- the objective


class Batches:
    """The training windows' examples of each step (``training.Schedule``: a pure function of seed and step) and
    their titles and prompts."""

    def __init__(self, prep, tokenizer, cfg: HealConfig, history_len: int, max_title_tokens: int, seed: int):
        self.windows = training_windows(prep, history_len)
        self.schedule = Schedule(prep, self.windows, seed, cfg.batch_size, cfg.train_negatives)
        self.titles = prep.titles()
        self.text = Prompt(tokenizer, PromptConfig(prep.domain, max_title_tokens))

    def step(self, step: int) -> tuple[list[list[str]], list[list[str]]]:
        """(histories, candidates with the positive first) of one step, as titles."""
        ex, t = self.schedule.examples(step), self.titles
        return ([[t[i] for i in e["history"]] for e in ex],
                [[t[e["target"]], *[t[i] for i in e["negatives"]]] for e in ex])


def _final_states(model, text: Prompt, histories: list[list[str]]) -> torch.Tensor:
    """The pre-final-norm hidden states of the history prompts' tokens (the first left out), rows concatenated."""
    dev = arch.input_device(model)
    ids, mask = pad_right([text.likelihood_prefix(h) for h in histories], text.tok.pad_token_id, dev)
    with arch.capture(model, ["resid_final"]) as caught:
        arch.run_decoder(model, ids, mask)
    return caught["resid_final"][loss_mask(mask, True)].float()


def heal_loss(model, teacher, text: Prompt, histories, candidates, weights: dict, temperature: float
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted objective of one batch -> (loss with grad, each term's value)."""
    terms: dict[str, torch.Tensor] = {}
    if "task" in weights or "distill" in weights:
        s = batched_prefix_scores(model, text, histories, candidates)
        if "task" in weights:
            terms["task"] = softmax_ce(s)
        if "distill" in weights:
            with torch.no_grad():
                t = batched_prefix_scores(teacher, text, histories, candidates).float()
            terms["distill"] = F.kl_div(F.log_softmax(s.float() / temperature, -1), F.log_softmax(t / temperature, -1),
                                        log_target=True, reduction="batchmean") * temperature ** 2
    hidden = {k: w for k, w in weights.items() if k in HIDDEN_LOSSES}
    if hidden:
        pred = _final_states(model, text, histories)
        with torch.no_grad():
            target = _final_states(teacher, text, histories)
        for k in hidden:
            terms[k] = hidden_loss(pred, target, {k: 1.0}) / len(pred)
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, {k: float(v.detach()) for k, v in terms.items()}


# ----------------------------------------------------------------------------- training


def _optimizer(fast: list, slow: list, cfg: HealConfig) -> torch.optim.Optimizer:
    """AdamW: adapters and LoRA at ``lr``, the pretrained weights of mode 'last' at lr / 10."""
    groups = [{"params": fast, "lr": cfg.lr}, {"params": slow, "lr": cfg.lr / 10}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def _train(model, fast: list, slow: list, loss_of, validate, cfg: HealConfig, report) -> pd.DataFrame:
    """The healing loop (``training.Loop``): steps within the budget, validation every ``eval_every`` steps, the
    best state (step 0 included) restored at the end -> the curve."""
    best = BestState(fast + slow, patience=cfg.patience)
    loop = Loop(best, _optimizer(fast, slow, cfg), lambda: float(np.mean(validate(model))), clip=cfg.clip,
                what="healing", hint=f"Lower heal lr (now {cfg.lr:g}) or the distillation temperature.")

    def step(s: int) -> dict:
        passes.count("train")
        passes.count("backward", cfg.batch_size)
        loss, terms = loss_of(s - 1)
        loop.step(loss, f"step {s}")
        return {"seconds": loop.elapsed(), "loss": float(loss.detach()), **terms}

    loop.start({"seconds": 0.0, "loss": np.nan})
    stopped = loop.run(range(1, cfg.steps + 1), step, eval_every=cfg.eval_every, last=cfg.steps,
                       max_seconds=cfg.max_seconds, desc="heal")
    curve = loop.finish()
    curve.attrs.update(best_step=best.at, stopped=stopped, valid_ndcg=best.value)
    if report:
        report(f"heal: {loop.rows[-1]['step']} steps ({stopped}) in {curve.attrs['seconds']:.0f} s; validation "
               f"NDCG@10 {loop.rows[0]['valid_ndcg@10']:.4f} -> {best.value:.4f} (best step {best.at})")
    return curve


def heal(student, prep, tokenizer, objective: str | dict, cfg: HealConfig, validate, teacher=None, *,
         history_len: int, max_title_tokens: int, seed: int = 0, report=None) -> tuple[object, pd.DataFrame]:
    """Heal ``student`` (a CompactLM, or a full model: the control) -> (the healed model, its curve).

    ``validate(model)`` returns the validation users' NDCG@10 (per user); the best state by its mean is kept.
    The curve has one row per step: step, seconds, loss, each objective term, valid_ndcg@10 (where measured);
    ``curve.attrs`` holds best_step, stopped, seconds and valid_ndcg. LoRA is merged into the weights at the end.
    A compact model comes back itself (``base['healed']`` names the weights healing changed); a full model
    comes back as a trained copy (the given one is never modified).
    """
    weights = parse_objective(objective)
    if set(weights) - {"task"}:
        if teacher is None:
            raise ValueError(f"objective {objective_label(weights)} compares with the full model: pass it as teacher")
        check_teacher(teacher, student, tokenizer)
    batches = Batches(prep, tokenizer, cfg, history_len, max_title_tokens, seed)
    model, fast, slow, prefixes, tuner = trainable(student, cfg)
    model.eval()

    def loss_of(step: int):
        return heal_loss(model, teacher, batches.text, *batches.step(step), weights, cfg.temperature)

    with Frozen(model, fast + slow):
        curve = _train(model, fast, slow, loss_of, validate, cfg, report)
    if tuner is not None:
        merge_lora(tuner)
    if isinstance(model, CompactLM) and prefixes:
        model.base["healed"] = prefixes
    return model, curve
