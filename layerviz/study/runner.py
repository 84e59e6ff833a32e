"""The stages in order: ``layerviz run CONFIG``, ``notebook_study`` and ``open_study`` all come here.

Per dataset: SASRec and the test positives' slices (model-free, computed once). Per model on the main dataset:
fine-tuning (if configured) and the zero-shot side, importance, every selection strategy, the test
evaluation (full model, popularity, plain-dropping variants), adapters on the primary selection, RQ2 curves, with cold_items the cold-start test
set, calibration records; per cross-domain model, on the transfer dataset: B's own selection and adapters and A's
selection evaluated on B; then bench. The stage outputs are collected into a ``StudyResult`` and the
tables (and findings.md) are written next to the stages.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerviz import notebook_params, parallel, store
from layerviz.store import StageMissing
from layerviz.study.config import StudyConfig, describe_base, smoke_config
from layerviz.study.cost import CPU_TFLOPS, Planner
from layerviz.study.findings import markdown
from layerviz.study.hypotheses import hypotheses
from layerviz.study.result import FINE_TUNED, StudyResult, collect
from layerviz.study.rq3 import rq3_table
from layerviz.study.stages import Study
from layerviz.study.tables import (
    cold_table,
    cross_domain,
    cross_model,
    finetune_table,
    headline,
    slices_table,
    thirds_table,
    variants_table,
)


def run_model(study: Study, spec: str, cross_domain_model: bool, bench: bool = True) -> dict:
    """Every stage of one model (the bench last, unless ``bench`` is false), in order -> the stage outputs."""
    cfg, r = study.cfg, {}
    a, b = cfg.dataset, cfg.transfer_dataset
    r["baselines"] = {d: study.baselines(d) for d in ([a, b] if cross_domain_model else [a])}
    if study.finetuning:  # the zero-shot side first: one model switch per model
        r["finetune"] = study.finetune(spec)
        r["zeroshot"] = {d: study.zeroshot(spec, d) for d in ([a, b] if cross_domain_model else [a])}
        r["calibration_zeroshot"] = {d: study.calibration(spec, d, zeroshot=True) for d in r["zeroshot"]}
        r["importance_zeroshot"] = study.importance(spec, a, zeroshot=True)
    r["importance"] = study.importance(spec, a)
    r["selections"] = {s: study.selection(spec, a, s) for s in cfg.strategies}
    primary = r["selections"][cfg.primary]["selection"]["layers"]
    r["evaluation"] = study.evaluation(spec)
    r["adapters"] = study.adapters(spec, a, primary)
    r["curves"] = study.curves(spec, a)
    if spec in cfg.rq3_models():
        r["heal_variants"] = study.heal_variants(spec)
    if cfg.cold_items:
        r["cold"] = study.cold(spec, primary)
    r["calibration"] = {d: study.calibration(spec, d) for d in ([a, b] if cross_domain_model else [a])}
    if cross_domain_model:
        r["b_importance"] = study.importance(spec, b, ablation=False)
        r["b_selection"] = study.selection(spec, b, cfg.primary)
        if study.finetuning:
            r["tuned_b"] = study.tuned_on(spec, b)
        r["b_adapters"] = study.adapters(spec, b, r["b_selection"]["selection"]["layers"])
        r["transfer"] = study.transfer(spec, primary)
    if bench:
        r["bench"] = study.bench(spec, primary)
    return r


def _model_stages(raw: dict, spec: str, cross_domain_model: bool, threads: int) -> None:
    """One model's stages but the bench, in a worker process of ``run`` (results go to the stage cache)."""
    os.environ["LAYERVIZ_PROGRESS"] = "0"  # two processes' bars would garble each other
    torch.set_num_threads(threads)
    run_model(Study(StudyConfig.from_dict(raw), lambda msg: print(msg, flush=True)), spec, cross_domain_model,
              bench=False)


def run_parallel(study: Study, cd_models: list[str]) -> None:
    """``cfg.jobs`` models' stages at once, each process with cores/jobs threads; the benches are left to
    ``run``, which then finds every other stage cached. A failing model raises after the others finish."""
    cfg = study.cfg
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    if study.report:
        study.report(f"{len(cfg.models)} models, {cfg.jobs} at a time ({threads} thread(s) each); benches after")
    with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(_model_stages, asdict(cfg), spec, spec in cd_models, threads) for spec in cfg.models]
        for job in jobs:
            job.result()


def all_tables(res: StudyResult) -> dict[str, pd.DataFrame]:
    """Every table the study writes (the finetune table only when the study fine-tunes)."""
    tables = {"headline": headline(res), "thirds": thirds_table(res), "cross_model": cross_model(res),
              "cross_domain": cross_domain(res), "variants": variants_table(res), "hypotheses": hypotheses(res)}
    if res.base == FINE_TUNED:
        tables["finetune"] = finetune_table(res)
    tables["slices"] = slices_table(res)
    if res.config.cold_items:
        tables["cold"] = cold_table(res)
    if len(res.heal_variants):
        tables["rq3"] = rq3_table(res)
    return tables


def write_tables(cfg: StudyConfig, tables: dict[str, pd.DataFrame]) -> None:
    """Each table as parquet and CSV (and the headline as LaTeX) next to the stages, atomically."""
    for name, df in tables.items():
        store.write_parquet(cfg.folder / f"{name}.parquet", df)
        store.atomic_write(cfg.folder / f"{name}.csv", lambda tmp, df=df: df.to_csv(tmp, index=False))
    store.atomic_write(cfg.folder / "headline.tex", lambda tmp: Path(tmp).write_text(
        tables["headline"].to_latex(index=False, float_format="%.2f", escape=True)))


def run(study: Study) -> StudyResult:
    """Run (or resume) every stage of ``study`` -> its ``StudyResult``; tables and manifest written."""
    cfg = study.cfg
    cd_models = cfg.cross_domain_models if cfg.cross_domain_models is not None else cfg.models[:1]
    if cfg.jobs > 1 and len(cfg.models) > 1 and study.stages.use_cache and study.stages.compute:
        run_parallel(study, cd_models)
    outputs = {spec: run_model(study, spec, spec in cd_models) for spec in cfg.models}
    study.release()
    res = collect(cfg, outputs)
    res.tables = all_tables(res)
    if parallel.is_main() and study.stages.compute:  # under torchrun rank 0 writes; a reader writes nothing
        write_tables(cfg, res.tables)
        store.atomic_write(cfg.folder / "findings.md", lambda tmp: Path(tmp).write_text(markdown(res)))
        store.write_json(cfg.folder / "manifest.json", store.manifest(
            cfg, cfg.seed, stages_run=study.stages.ran, stages_cached=study.stages.skipped,
            processes=parallel.world_size(), commit=store.git_commit()))
    parallel.barrier()
    return res


def walk(cfg: StudyConfig) -> Planner:
    """Every stage of ``cfg`` in ``run_model``'s order, none run -> the Planner with each stage's cost rows and
    cache key (``keys``: what decides whether a rerun recomputes the stage). No weights are loaded."""
    planner = Planner(cfg)
    study = Study(cfg, report=None, planner=planner)
    cd = cfg.cross_domain_models if cfg.cross_domain_models is not None else cfg.models[:1]
    for spec in cfg.models:
        run_model(study, spec, spec in cd)
    return planner


def plan(config: StudyConfig | str, tflops: float | None = None) -> pd.DataFrame:
    """The cost of every stage of a study, without loading any weights -> one row per stage and pass kind.

    ``run_model`` walks the stages, each recording its own cost (a ``Planner``) instead of running. Columns:
    model, dataset, stage, kind (``passes.KINDS``), passes, exact (false: an upper bound), tokens, flops,
    seconds (at ``tflops`` TFLOP/s; default ``CPU_TFLOPS`` on CPU, NaN on a GPU, whose throughput must be
    given). The config is validated first, with the errors of ``layerviz run``.
    """
    cfg = config if isinstance(config, StudyConfig) else StudyConfig.from_yaml(config)
    if tflops is None:
        tflops = CPU_TFLOPS if cfg.device == "cpu" else float("nan")  # no default throughput on a GPU
    if not (tflops > 0 or np.isnan(tflops)):
        raise ValueError(f"tflops must be positive, got {tflops}")
    planner = walk(cfg)
    df = pd.DataFrame(planner.rows, columns=["model", "dataset", "stage", "kind", "passes", "exact", "tokens", "flops"])
    df["seconds"] = df["flops"] / (tflops * 1e12)
    df.attrs["tflops"] = tflops
    return df


def run_study(path_or_cfg, report=print) -> StudyResult:
    """``layerviz run CONFIG``: validate first, then run (or resume) every stage."""
    cfg = path_or_cfg if isinstance(path_or_cfg, StudyConfig) else StudyConfig.from_yaml(path_or_cfg)
    return run(Study(cfg, report))


def notebook_study(config: str | Path | None, smoke: bool = False, results_dir: str = "results",
                   device: str | None = None, overrides: dict | None = None, use_cache: bool = True,
                   models: list[str] | None = None, dataset: str | None = None,
                   compute: bool = False) -> StudyResult:
    """The study of ``config`` (or the CI smoke study), with overrides -> its ``StudyResult``.

    ``models`` and ``dataset`` (the main dataset) are shorthands for those overrides. Finished stages are loaded
    from ``results_dir``; a missing one raises ``StageMissing`` unless ``compute`` (then it is computed and
    cached, and the tables are written, as ``layerviz run`` does).
    """
    over = dict(overrides or {})
    if models:
        over["models"] = [models] if isinstance(models, str) else list(models)
        over.setdefault("cross_domain_models", over["models"][:1])
    if dataset:
        over["dataset"] = dataset
    if smoke:
        cfg = smoke_config(results_dir=results_dir, **over)
    else:
        raw = asdict(StudyConfig.from_yaml(config)) if config else {}
        cfg = StudyConfig.from_dict({**raw, **over, "results_dir": results_dir},
                                    where=f"{config or 'defaults'} with notebook overrides")
    if device is not None:
        cfg.device = device
    return run(Study(cfg, report=print if compute else None, use_cache=use_cache, compute=compute))


def pick_models(res: StudyResult, model: str | None) -> list[str]:
    """The study's models, or just ``model`` (refused with the choices if it is not one of them)."""
    names = res.models
    if model is None:
        return names
    if model not in names:
        raise ValueError(f"MODEL={model!r} is not in this study; its models: {', '.join(names)} "
                         "(set MODELS to run a study of another model)")
    return [model]


def _missing(p: dict, e: StageMissing) -> StageMissing:
    """The error a reading notebook shows: which stage, and the command that computes the study."""
    plain = not (p["SMOKE"] or p["MODELS"] or p["DATASET"] or p["OVERRIDES"])
    how = (f"compute it from a shell with\n    layerviz run {Path(p['CONFIG']).resolve()} --results-dir "
           f"{Path(p['RESULTS_DIR']).resolve()}\nor set COMPUTE = True in this notebook's parameters"
           if plain else "this notebook's MODELS/DATASET/OVERRIDES/SMOKE make a study that `layerviz run CONFIG` "
           "does not run: set COMPUTE = True in its parameters to compute it here")
    return StageMissing(e.name, e.root, how)


def open_study(params: dict) -> tuple[StudyResult, list[str]]:
    """What every notebook does first, from its parameters (``globals()``; names and defaults in
    ``layerviz.notebook_params``): the study's result and the models to show; prints what the study is.
    It only reads finished stages unless COMPUTE; a missing stage raises with the command that computes it."""
    p = notebook_params.with_defaults(params)
    try:
        res = notebook_study(p["CONFIG"], p["SMOKE"], p["RESULTS_DIR"], p["DEVICE"], p["OVERRIDES"], p["USE_CACHE"],
                             models=p["MODELS"], dataset=p["DATASET"], compute=p["COMPUTE"])
    except StageMissing as e:
        raise _missing(p, e) from None
    cfg = res.config
    print(f"study {cfg.name!r}: models {', '.join(res.models)}; dataset {cfg.dataset}, transfer to {cfg.transfer_dataset}; "
          f"k = round(L x {cfg.k_fraction}); results in {cfg.folder}")
    print(describe_base(cfg))
    return res, pick_models(res, p["MODEL"])
