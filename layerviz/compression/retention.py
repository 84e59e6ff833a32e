"""RQ3: a compact recommender trained and measured, the work of ``layerviz adapt`` and the study's adapters stage.

``run_adapt`` builds a compact model on the kept layers, fits its adapters to the full model's hidden states
(``adapters.train_adapters``: stage 1 per gap; stage 2 end to end on a hidden-state objective), and, when the
objective includes the task or distillation or the heal mode trains more than the adapters, heals it on the
training windows (``heal.heal``) instead of stage 2. After each step it scores the test users: NDCG@5/@10 with
CIs, retention against the full model (paired bootstrap), agreement with the full model's candidate scores
(top-1 and Kendall's tau), and the validation MSE of the final hidden state (a diagnostic: it never chooses).
With ``control``, the full model is trained for as long on the same data and task loss, and retention is also
reported against it. The cost of the adapters is measured: parameters, FLOPs, prefill time against plain
dropping, training and healing time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerviz import arch, metrics, store
from layerviz.compression.adapters import (
    final_mse,
    teacher_states,
    train_adapters,
)
from layerviz.compression.compact import CompactLM, build_compact
from layerviz.compression.config import (
    AdaptConfig,
    AdapterPolicy,
    AdapterTrainConfig,
    HealConfig,
    objective_label,
    parse_objective,
)
from layerviz.compression.heal import heal
from layerviz.data import load
from layerviz.data.prompts import build_probes
from layerviz.errors import NonFiniteLossError
from layerviz.evaluate import task_evaluator
from layerviz.models import fingerprint, load_model
from layerviz.scoring import pad_right

METRICS = ("ndcg@5", "ndcg@10")


def _ci_columns(row: dict, name: str, values: np.ndarray, seed: int) -> None:
    row[name], row[f"{name}_low"], row[f"{name}_high"] = metrics.bootstrap_ci(values, seed=seed)


class _Retention:
    """``train_adapters``' on_stage callback (and the heal step's): each step's NDCG@5/@10 on the test users with
    CIs, retention against the full model, and agreement with its candidate scores -> ``rows``, ``per_user``."""

    def __init__(self, evaluator, compact, full_scores: np.ndarray, seed: int, report):
        self.evaluator, self.compact, self.full_scores, self.seed, self.report = (
            evaluator, compact, full_scores, seed, report)
        self.full = evaluator.metrics(None, full_scores)
        self.rows: list[dict] = []
        self.per_user = {f"full:{m}": self.full[m].to_numpy() for m in METRICS}

    def __call__(self, stage: str, mse: float, nmse: float, seconds: float) -> None:
        scores = self.evaluator.scores(self.compact)
        got, agree = self.evaluator.metrics(None, scores), metrics.agreement(self.full_scores, scores)
        row = {"stage": stage, "val_mse": mse, "val_nmse": nmse, "train_seconds": seconds}
        for m in METRICS:
            self.per_user[f"{stage}:{m}"] = got[m].to_numpy()
            _ci_columns(row, m, got[m], self.seed)
            r, rlo, rhi = metrics.ratio_ci(got[m], self.full[m], seed=self.seed)
            suffix = "" if m == "ndcg@10" else "@5"
            row.update({f"retention{suffix}": r, f"retention{suffix}_low": rlo, f"retention{suffix}_high": rhi})
        for a in ("top1", "kendall_tau"):
            self.per_user[f"{stage}:{a}"] = agree[a].to_numpy()
            _ci_columns(row, a, agree[a], self.seed)
        self.rows.append(row)
        if self.report:
            self.report(f"  {stage:>6}: val MSE {mse:.4g}, NDCG@10 {row['ndcg@10']:.4f}, retention {row['retention']:.3f} "
                        f"[{row['retention_low']:.3f}, {row['retention_high']:.3f}], top-1 agreement {row['top1']:.2f}, "
                        f"tau {row['kendall_tau']:.2f}")

    def against_control(self, control: pd.DataFrame) -> None:
        """Retention of every step against the full model trained for as long (``control``: its per-user metrics)."""
        self.per_user["control:ndcg@10"] = control["ndcg@10"].to_numpy()
        for row in self.rows:
            r, lo, hi = metrics.ratio_ci(self.per_user[f"{row['stage']}:ndcg@10"], control["ndcg@10"], seed=self.seed)
            row.update({"retention_control": r, "retention_control_low": lo, "retention_control_high": hi})


@torch.no_grad()
def prefill_overhead(compact: CompactLM, model, examples, pad: int, runs: int = 5) -> dict:
    """Prefill seconds of the compact model with its adapters against plain dropping of the same layers (adapters
    off), interleaved ``runs`` times on the same prompts -> medians and the added share in %."""
    ids, mask = pad_right([e.ids for e in examples], pad, arch.input_device(model))
    times: dict[str, list[float]] = {"adapters": [], "plain": []}
    for _ in range(runs + 1):  # the first round warms up
        for name in times:
            if name == "adapters":
                t0 = time.perf_counter()
                arch.run_decoder(compact, ids, mask)
            else:
                with arch.keep_layers(model, compact.kept_layers):
                    t0 = time.perf_counter()
                    arch.run_decoder(model, ids, mask)
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v[1:])) for k, v in times.items()}
    return {"prefill_s_adapters": med["adapters"], "prefill_s_plain": med["plain"],
            "prefill_time_added_pct": 100 * (med["adapters"] / med["plain"] - 1)}


def control_config(cfg: AdaptConfig) -> HealConfig:
    """How the control trains the full model: the healing's budget and settings, with LoRA (or, for mode 'last',
    its last layers and head) in place of the adapters it lacks."""
    hcfg = cfg.heal_config()
    return HealConfig(**{**asdict(hcfg), "mode": "last" if hcfg.mode == "last" else "lora"})


def control_metrics(cfg: AdaptConfig, prep, model, tokenizer, evaluator, validate, report) -> tuple[pd.DataFrame, dict]:
    """The full model trained for as long as the healing (same steps, windows, task loss, early stopping; LoRA, or
    its last layers for mode 'last'), scored on the test users -> (per-user metrics, summary). Cached under
    results_dir/adapt-control: every variant of one model, data and budget shares it."""
    ccfg = control_config(cfg)
    key = store.config_hash("adapt-control", asdict(ccfg), prep.fingerprint, fingerprint(model),
                            [cfg.users, cfg.valid_users, cfg.negatives, cfg.seed, evaluator.cfg.calibration,
                             cfg.history_len, cfg.max_title_tokens])
    folder = Path(cfg.results_dir) / "adapt-control" / f"{store.slug(cfg.model)}-{key}"

    def compute(folder: Path) -> dict:
        trained, curve = heal(model, prep, tokenizer, "task", ccfg, validate, history_len=cfg.history_len,
                              max_title_tokens=cfg.max_title_tokens, seed=cfg.seed + 1000, report=report)
        per_user = evaluator.metrics(trained)
        return {"per_user": per_user, "curve": curve,
                "summary": {"mode": ccfg.mode, "steps": int(curve.step.max()), "best_step": curve.attrs["best_step"],
                            "seconds": curve.attrs["seconds"], "valid_ndcg@10": curve.attrs["valid_ndcg"]}}

    out, _ = store.cached(folder, key, compute, marker="done.json")
    return out["per_user"], out["summary"]


def _heal_step(cfg: AdaptConfig, compact: CompactLM, model, prep, tokenizer, validate, retention, mse_of,
               report) -> pd.DataFrame:
    """Healing on the training windows, then the 'heal' row of ``retention`` -> the heal curve."""
    t0 = time.perf_counter()
    _, curve = heal(compact, prep, tokenizer, cfg.objective, cfg.heal_config(), validate, teacher=model,
                    history_len=cfg.history_len, max_title_tokens=cfg.max_title_tokens, seed=cfg.seed + 1000,
                    report=report)
    mse, nmse = mse_of()
    retention("heal", mse, nmse, time.perf_counter() - t0)
    return curve


def _mse_of(compact, model, cal, tcfg: AdapterTrainConfig, pad: int):
    """-> a function giving the compact model's validation MSE (and relative MSE) of the final hidden state on the
    held-out probe prompts, as train_adapters reports it."""
    rng = np.random.default_rng(tcfg.seed)
    order = rng.permutation(len(cal.examples))
    va = [cal.examples[i] for i in sorted(order[:max(1, int(round(len(cal.examples) * tcfg.val_fraction)))])]
    n = arch.num_layers(model)
    target = teacher_states(model, va, [n], pad, skip_first=tcfg.skip_first)[n]
    energy = torch.cat(target).pow(2).mean().item()

    def mse_of() -> tuple[float, float]:
        with torch.no_grad():
            mse = final_mse(compact, va, target, pad, tcfg.sample_batch, tcfg.skip_first).item()
        return mse, mse / energy

    return mse_of


def _adapt(cfg: AdaptConfig, policy: AdapterPolicy, tcfg: AdapterTrainConfig, prep, model, tokenizer, folder: Path,
           report, full_scores: np.ndarray | None = None, save: bool = True) -> tuple[dict, CompactLM]:
    """The adapters trained on ``cfg``'s layers (and healed) and measured (``run_adapt``'s work) -> (outputs, compact
    model). A non-finite loss saves the last good state first, then raises."""
    layers, pad, healing = cfg.kept(arch.num_layers(model)), tokenizer.pad_token_id, cfg.healing()
    cal = build_probes(prep, tokenizer, cfg.samples, "valid", "likelihood", cfg.max_title_tokens, cfg.seed)
    evaluator, _ = task_evaluator(cfg, prep, model, tokenizer, cfg.users, "test", cfg.calibration)
    compact = build_compact(model, layers, policy, seed=cfg.seed, share=cfg.heal_config().mode == "adapters")
    full_scores = evaluator.scores(model) if full_scores is None else full_scores
    retention, error, heal_curve = _Retention(evaluator, compact, full_scores, cfg.seed, report), None, None
    valid, _ = task_evaluator(cfg, prep, model, tokenizer, cfg.valid_users, "valid", evaluator.cfg.calibration)
    if healing:
        tcfg = AdapterTrainConfig(**{**asdict(tcfg), "stage2_epochs": 0})  # healing takes stage 2's place
    try:
        curve = train_adapters(compact, model, cal, tcfg, pad=pad, report=None, on_stage=retention)
        if healing:
            heal_curve = _heal_step(cfg, compact, model, prep, tokenizer, valid, retention,
                                    _mse_of(compact, model, cal, tcfg, pad), report)
    except NonFiniteLossError as e:
        error, curve = e, pd.DataFrame()
    if save or error is not None:
        compact.save(folder / "compact", overwrite=True)
    if error is not None:
        raise NonFiniteLossError(f"{error} The last good state is saved in {folder / 'compact'}.") from error
    control = None
    if healing and cfg.control and "task" in parse_objective(cfg.objective):
        control, control_summary = control_metrics(cfg, prep, model, tokenizer, evaluator, valid, report)
        retention.against_control(control)
    summary = _summary(cfg, compact, retention, curve, heal_curve, control, model, cal, pad)
    summary["valid_ndcg@10"] = (heal_curve.attrs["valid_ndcg"] if heal_curve is not None
                                else float(np.mean(valid(compact))))  # what a choice between variants may read
    if control is not None:
        summary.update({f"control_{k}": v for k, v in control_summary.items()})
    outputs = {"summary": summary, "retention": pd.DataFrame(retention.rows), "curve": curve,
               "placement": compact.placement(),
               "per_user": pd.DataFrame({k: np.asarray(v) for k, v in retention.per_user.items()})}
    if heal_curve is not None:
        outputs["heal_curve"] = heal_curve
    return outputs, compact


def _summary(cfg: AdaptConfig, compact: CompactLM, retention: _Retention, curve, heal_curve, control, model, cal,
             pad: int) -> dict:
    """The run's summary: layers, the full model's NDCG@10 with CI (and the control's), chance, objective, times,
    and the adapters' cost (parameters, FLOPs, prefill time against plain dropping)."""
    full = retention.full
    summary = {"model": cfg.model, "layers": compact.kept_layers, "k": len(compact.kept_layers),
               "n_layers": compact.n_base_layers, "objective": objective_label(parse_objective(cfg.objective)),
               "heal_mode": cfg.heal_config().mode if cfg.healing() else "none",
               "full_ndcg@5": float(full["ndcg@5"].mean()),
               "chance_ndcg@10": metrics.chance(cfg.negatives + 1)["ndcg@10"],
               "train_seconds": curve.attrs.get("train_seconds", float("nan")),
               "heal_seconds": heal_curve.attrs["seconds"] if heal_curve is not None else 0.0,
               "heal_best_step": heal_curve.attrs["best_step"] if heal_curve is not None else None,
               "calibration": retention.evaluator.cfg.calibration, **compact.overhead(),
               "exportable": all(a.kind in ("identity", "fold") for a in compact.adapters()),
               **prefill_overhead(compact, model, cal.examples[:8], pad)}
    _ci_columns(summary, "full_ndcg@10", full["ndcg@10"], cfg.seed)
    if control is not None:
        _ci_columns(summary, "control_ndcg@10", control["ndcg@10"], cfg.seed)
    return summary


def run_adapt(cfg: AdaptConfig, out: str | Path | None = None, model=None, tokenizer=None, use_cache: bool = True,
              report=print, full_scores: np.ndarray | None = None, save: bool = True) -> dict:
    """Build, train (and heal) and evaluate a compact model; write it and its tables to ``out`` -> outputs.

    Retention (compact / full NDCG@10 on the test users, paired bootstrap CI), agreement with the full model and the
    validation MSE of the pre-norm final hidden state are measured before training (plain layer dropping), after
    stage 1, after stage 2 or healing; with a control, retention against the full model trained for as long too.
    The validation users' NDCG@10 of the final model is in the summary (``valid_ndcg@10``): what chooses between
    variants. ``full_scores``: the full model's test scores when the caller has them; ``save``: keep the compact
    model (in ``out``/compact; a run that fails keeps its last good state anyway).
    """
    policy, tcfg = AdapterPolicy(**cfg.policy), AdapterTrainConfig(**{"seed": cfg.seed, **cfg.train})  # bad input: now
    cfg.healing()  # the objective and heal settings are checked before anything runs
    prep = load(cfg.dataset, cfg.format, cfg.prep_config(), report=report)
    key = store.config_hash("adapt", {k: v for k, v in asdict(cfg).items() if k != "results_dir"},
                            prep.fingerprint, store.versions()["layerviz"])
    folder = Path(out) if out else Path(cfg.results_dir) / "adapt" / f"{cfg.model.replace('/', '_')}-{key}"
    made = {}

    def compute(folder: Path) -> dict:
        nonlocal model, tokenizer
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        outputs, made["compact"] = _adapt(cfg, policy, tcfg, prep, model, tokenizer, folder, report, full_scores,
                                          save)
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
