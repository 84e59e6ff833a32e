"""The study's stages: methods of ``Study``, each computing one thing for one model (and dataset), cached
under results_dir/name/ by ``store.Stages`` and keyed by everything that decides it. Models and data load
lazily (a fully cached rerun loads nothing); ``runner.py`` calls the stages in order."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from layerviz import arch, metrics, store
from layerviz import importance as imp
from layerviz.bench import BenchConfig, run_bench, with_k
from layerviz.compact import AdaptConfig, load_compact, run_adapt
from layerviz.data import CandidateConfig, candidates_for, load
from layerviz.evaluate import TaskEvaluator, pick_calibration, popularity_scores
from layerviz.finetune import check_base
from layerviz.finetune import finetune as run_finetune
from layerviz.models import PRESETS, load_model
from layerviz.selection import (
    FIXED,
    SubsetScorer,
    fixed_layers,
    importance_order,
    load_reference,
    select,
)
from layerviz.store import Stages, slug
from layerviz.study.baseline_stages import BaselineStages
from layerviz.study.config import StudyConfig
from layerviz.study.depth import map_reference, without_lower_third


class Study(BaselineStages):
    """Executes a StudyConfig; every stage cached under results_dir/name/."""

    def __init__(self, cfg: StudyConfig, report=print, use_cache: bool = True):
        self.stages = Stages(cfg.folder, report, use_cache)
        self.cfg, self.report = cfg, self.stages.report  # under torchrun rank 0 alone reports (Stages decides)
        self._models, self._preps = {}, {}  # (spec, tuned) -> (model, tokenizer); dataset -> Prepared

    # -- shared resources, loaded lazily (a fully cached rerun loads nothing)
    def release(self) -> None:  # drop the model held in memory
        self._models.clear()

    @property
    def finetuning(self) -> bool:
        """Whether the study analyses a fine-tuned recommender (the config has a finetune section)."""
        return bool(self.cfg.finetune)

    def ft_config(self, spec: str):
        return self.cfg.finetune_config(spec)

    def shared(self, model: str, dataset: str) -> dict:
        """The shared settings (``Settings``) every stage's config gets from the study."""
        return self.cfg.settings(model, dataset)

    def label(self, spec: str, zeroshot: bool = False) -> str:
        """The name results are cached under: the spec, or spec+ft-<key> for the fine-tuned recommender."""
        if zeroshot or not self.finetuning:
            return spec
        key = {k: v for k, v in asdict(self.ft_config(spec)).items() if k != "results_dir"}
        return f"{spec}+ft-{store.config_hash(key)[:8]}"

    def ft_folder(self, spec: str) -> Path:
        return self.stages.root / slug(spec) / slug(self.cfg.domain_a) / "finetune" / "model"

    def model(self, spec: str, zeroshot: bool = False):
        """(model, tokenizer) that the stages analyse: the fine-tuned recommender unless ``zeroshot``."""
        tuned = self.finetuning and not zeroshot
        key = (spec, tuned)
        if key not in self._models:
            if tuned:
                self.finetune(spec)
                base = self.model(spec, zeroshot=True)[0]
                check_base(self.ft_folder(spec), base)  # a reused folder must come from this very base
            self._models.clear()  # one model in memory at a time
            source = str(self.ft_folder(spec)) if tuned else spec
            self._models[key] = load_model(source, device=self.cfg.device, dtype=self.cfg.dtype, seed=self.cfg.seed)
        return self._models[key]

    def prep(self, dataset: str):
        c = self.cfg
        if dataset not in self._preps:
            self._preps[dataset] = load(dataset, "auto", c.prep_config(), report=None)
        return self._preps[dataset]

    def evaluator(self, spec: str, dataset: str, split: str, users: int, zeroshot: bool = False, cold: bool = False):
        prep = self.prep(dataset)
        cands, _ = candidates_for(prep, CandidateConfig(self.cfg.negatives, "uniform", users, split, self.cfg.seed,
                                                        cold), self.cfg.candidates_dir)
        calibration = self.calibration(spec, dataset, zeroshot)["choice"]
        return TaskEvaluator(prep, cands, self.model(spec, zeroshot)[1], split=split,
                             max_title_tokens=self.cfg.max_title_tokens, calibration=calibration), cands

    def popularity(self, dataset: str, cands: pd.DataFrame) -> pd.DataFrame:
        """Per-user metrics of the popularity baseline on these candidate lists."""
        scores, pos = np.stack(popularity_scores(self.prep(dataset), cands)), cands["pos_index"].to_numpy()
        return metrics.per_user(metrics.pessimistic_ranks(scores, pos))

    def n_layers(self, spec: str) -> int:
        return PRESETS[spec].num_layers if spec in PRESETS else arch.num_layers(self.model(spec, zeroshot=True)[0])

    def k(self, spec: str) -> int:
        return self.cfg.k_of(self.n_layers(spec))

    def _key(self, spec: str, *parts, zeroshot: bool = False):
        c = self.cfg
        return [asdict(c.prep_config()), c.max_title_tokens, c.negatives, c.seed, c.dtype,
                self.label(spec, zeroshot), c.calibration, c.calibration_users, *parts]

    def criterion(self, spec: str, dataset: str) -> dict:
        """The criterion ordering importance_greedy/top_k: the config's, or the most valid one ('auto')."""
        if self.cfg.criterion != "auto":
            return {"criterion": self.cfg.criterion, "auto": False}
        validity = self.importance(spec, self.cfg.domain_a)["validity"]  # needs the ablation: on domain A
        return {**imp.choose_criterion(validity), "auto": True, "dataset": self.cfg.domain_a}

    # -- stages
    def finetune(self, spec: str) -> dict:
        """The base model fine-tuned on domain A's training split (a plain HF folder under the stage)."""
        fcfg = self.ft_config(spec)

        def compute(folder):
            base, tok = self.model(spec, zeroshot=True)
            shutil.rmtree(folder / "model", ignore_errors=True)  # stale: this stage is being (re)computed
            res = run_finetune(fcfg, base, tok, out=folder / "model", report=self.report)
            return {"summary": res.summary, "curves": res.curves}

        return self.stages(f"{slug(spec)}/{slug(self.cfg.domain_a)}/finetune",
                           {k: v for k, v in asdict(fcfg).items() if k != "results_dir"}, compute)

    def calibration(self, spec: str, dataset: str, zeroshot: bool = False) -> dict:
        """none or pmi: the config's, or ('auto') chosen on validation users for the zero-shot model and 'none'
        for the fine-tuned one, whose rank objective is a softmax over raw title log-likelihoods."""
        c = self.cfg
        if c.calibration != "auto":
            return {"choice": c.calibration, "valid_ndcg@10": None}
        if self.finetuning and not zeroshot:  # the recommender scores as it was trained: raw likelihoods
            return {"choice": "none", "valid_ndcg@10": None}
        suffix = "-zeroshot" if zeroshot and self.finetuning else ""

        def compute(folder):
            model, tok = self.model(spec, zeroshot)
            choice, record = pick_calibration(model, tok, self.prep(dataset), "auto", c.calibration_users, c.negatives,
                                              c.seed, c.max_title_tokens, c.results_dir)
            return {"calibration": record}

        return self.stages(f"{slug(spec)}/{slug(dataset)}/calibration{suffix}", self._key(spec, dataset, zeroshot=zeroshot),
                           compute)["calibration"]

    def importance(self, spec: str, dataset: str, ablation: bool = True, zeroshot: bool = False) -> dict:
        over = dict(self.cfg.importance) if ablation else {**self.cfg.importance, "ablation": False}
        if not ablation and over.get("fusion_weights") == "fit":  # no ground truth here: domain A's fitted weights
            over["fusion_weights"] = self.importance(spec, self.cfg.domain_a, zeroshot=zeroshot)["fusion"]
        needs_scorer = ablation and over.get("ablation_users", imp.ImportanceConfig.ablation_users) > 0
        calibration = self.calibration(spec, dataset, zeroshot)["choice"] if needs_scorer else "none"
        icfg = imp.ImportanceConfig(**self.shared(self.label(spec, zeroshot), dataset), calibration=calibration, **over)

        def compute(folder):
            model, tok = self.model(spec, zeroshot)
            res = imp.run_importance(icfg, model, tok, report=None)
            return {"importance": res.table, "validity": res.validity, "fusion": res.fusion_weights}

        suffix = "-zeroshot" if zeroshot and self.finetuning else ""
        return self.stages(f"{slug(spec)}/{slug(dataset)}/importance{suffix}", asdict(icfg), compute)

    def selection(self, spec: str, dataset: str, strategy: str) -> dict:
        k = self.k(spec)
        crit = self.criterion(spec, dataset) if strategy in ("importance_greedy", "top_k") else None

        def compute(folder):
            ev, _ = self.evaluator(spec, dataset, "valid", self.cfg.select_users)
            model, tok = self.model(spec)
            table = None
            if crit is not None:
                table = self.importance(spec, dataset, ablation=dataset == self.cfg.domain_a)["importance"]
            cal = imp.build_calibration(self.prep(dataset), tok, self.cfg.importance.get("samples", 16), seed=self.cfg.seed,
                                        max_title_tokens=self.cfg.max_title_tokens) if strategy == "contiguous_block" else None
            s = select(strategy, model, ev, k=k, importance=table, seed=self.cfg.seed, calibration=cal,
                       criterion=crit["criterion"] if crit else "fused")
            doc = {**s.to_json(), "model": spec, "dataset": dataset, "calibration": ev.cfg.calibration}
            if crit is not None:
                doc["criterion_choice"] = crit
            return {"selection": doc, "trace": s.trace}

        return self.stages(f"{slug(spec)}/{slug(dataset)}/select-{strategy}",
                           self._key(spec, dataset, strategy, k, self.cfg.select_users, self.cfg.importance,
                                     crit and crit["criterion"]), compute)

    def zeroshot(self, spec: str, dataset: str) -> dict:
        """The zero-shot model on the test users (every metric per user, its own calibration) and popularity."""
        cfg = self.cfg

        def compute(folder):
            ev, cands = self.evaluator(spec, dataset, "test", cfg.eval_users, zeroshot=True)
            m = ev.metrics(self.model(spec, zeroshot=True)[0])
            pop = self.popularity(dataset, cands)
            cols = {**{f"zeroshot:{k}": m[k].to_numpy() for k in m.columns},
                    **{f"popularity:{k}": pop[k].to_numpy() for k in pop.columns}}
            return {"per_user": pd.DataFrame(cols), "meta": {"calibration": ev.cfg.calibration,
                                                               "users": cands["user_id"].tolist()}}

        return self.stages(f"{slug(spec)}/{slug(dataset)}/zeroshot", self._key(spec, dataset, cfg.eval_users,
                                                                                  zeroshot=True), compute)

    def tuned_on(self, spec: str, dataset: str) -> dict:
        """The fine-tuned full model on another dataset's test users (cross-domain), every metric per user."""
        cfg = self.cfg

        def compute(folder):
            ev, cands = self.evaluator(spec, dataset, "test", cfg.eval_users)
            m = ev.metrics(self.model(spec)[0])
            return {"per_user": pd.DataFrame({f"full:{k}": m[k].to_numpy() for k in m.columns}),
                    "meta": {"calibration": ev.cfg.calibration, "users": cands["user_id"].tolist()}}

        return self.stages(f"{slug(spec)}/{slug(dataset)}/finetuned-full", self._key(spec, dataset, cfg.eval_users),
                           compute)

    def evaluation(self, spec: str) -> dict:
        """Test metrics (every metric, per user) of the full model, popularity and plain-dropping variants.

        Variants: the primary and the ``eval_strategies`` selections, the paper plan's reference list mapped
        onto this depth, and the model without its lower third. Adapters are measured by the adapters stage.
        """
        cfg, n = self.cfg, self.n_layers(spec)
        ref = load_reference()["selections"][cfg.reference]
        variants = {"full": list(range(n)),
                    f"select:{cfg.primary}": self.selection(spec, cfg.domain_a, cfg.primary)["selection"]["layers"],
                    "drop_lower_third": without_lower_third(n),
                    "reference_mapped": map_reference(ref["layers"], ref["real_num_layers"], n)}
        for s in cfg.eval_strategies:
            if s != cfg.primary:
                variants[f"select:{s}"] = self.selection(spec, cfg.domain_a, s)["selection"]["layers"]

        def compute(folder):
            model, _ = self.model(spec)
            ev, cands = self.evaluator(spec, cfg.domain_a, "test", cfg.eval_users)
            cols, rows = {}, []
            for name, layers in variants.items():
                with arch.keep_layers(model, layers):
                    m = ev.metrics(model)
                cols.update({f"{name}:{metric}": m[metric].to_numpy() for metric in m.columns})
                rows.append({"variant": name, "layers": layers, "k": len(layers)})
            pop = self.popularity(cfg.domain_a, cands)
            cols.update({f"popularity:{metric}": pop[metric].to_numpy() for metric in pop.columns})
            rows.append({"variant": "popularity", "layers": [], "k": 0})
            chance = {"variant": "chance", "n_candidates": cfg.negatives + 1,
                      **metrics.chance(cfg.negatives + 1)}
            return {"per_user": pd.DataFrame(cols), "variants": pd.DataFrame(rows), "chance": chance}

        return self.stages(f"{slug(spec)}/{slug(cfg.domain_a)}/evaluation",
                           self._key(spec, cfg.eval_users, variants, "all-metrics"), compute)

    def curves(self, spec: str, dataset: str) -> dict:
        """RQ2 traces: validation NDCG@10 of every fixed-k strategy at k' = 1..k (and the full model).

        ``top_k`` at k' is the importance order's first k' layers, which is exactly what the greedy loop
        scores at step k'; its points are taken from the greedy trace where that ran to k'.
        """
        cfg, n, k = self.cfg, self.n_layers(spec), self.k(spec)
        fixed = [s for s in cfg.strategies if s in FIXED]
        sels = {s: self.selection(spec, dataset, s) for s in cfg.strategies}
        table = (self.importance(spec, dataset, ablation=dataset == cfg.domain_a)["importance"]
                 if "top_k" in fixed else None)
        crit = self.criterion(spec, dataset)["criterion"] if table is not None else None

        def compute(folder):
            model, _ = self.model(spec)
            ev, _ = self.evaluator(spec, dataset, "valid", cfg.select_users)
            scorer = SubsetScorer(model, ev)
            for sel in sels.values():  # same users and candidates: subsets the selections scored are not rescored
                scorer.remember(sel["trace"])

            def point(strategy: str, layers: list[int]) -> dict:  # score and 95% CI over the validation users
                return {"strategy": strategy, "k": len(layers), "layers": layers, "score": scorer(layers),
                        **scorer.interval(layers)}

            rows = [point("full", list(range(n)))]
            if "importance_greedy" in sels:
                rows += [point("importance_greedy", t["layers"].tolist())
                         for _, t in sels["importance_greedy"]["trace"].iterrows()]
            order = importance_order(table, crit, True, n) if table is not None else None
            rows += [point(s, fixed_layers(s, n, kk, order if s == "top_k" else None))
                     for s in fixed for kk in range(1, k + 1)]
            return {"curves": pd.DataFrame(rows)}

        return self.stages(f"{slug(spec)}/{slug(dataset)}/curves",
                           self._key(spec, dataset, k, fixed, cfg.select_users, cfg.importance, crit,
                                     {s: v["selection"]["layers"] for s, v in sels.items()}), compute)

    def adapters(self, spec: str, dataset: str, layers: list[int], measured: dict | None = None) -> dict:
        """Adapters trained on ``layers``; retention against the full model on the test users.

        ``measured`` ({"full": per-user metrics, "drop": per-user metrics of ``layers`` without adapters}),
        when another stage has scored them on these very users and candidates, is reused instead of
        scoring the same thing twice (the outputs are the same: the test in test_study checks it).
        """
        acfg = AdaptConfig(**self.shared(self.label(spec), dataset), layers=layers, users=self.cfg.eval_users,
                           calibration=self.calibration(spec, dataset)["choice"], **self.cfg.adapters)

        def compute(folder):
            model, tok = self.model(spec)
            res = run_adapt(acfg, out=folder / "adapt", model=model, tokenizer=tok, use_cache=False, report=None,
                            measured=measured)
            return {k: res[k] for k in ("summary", "retention", "curve", "placement", "per_user")}

        return self.stages(f"{slug(spec)}/{slug(dataset)}/adapters", asdict(acfg), compute)

    def bench(self, spec: str, selection_layers: list[int]) -> dict:
        bcfg = with_k(BenchConfig(**self.shared(self.label(spec), self.cfg.domain_a), **self.cfg.bench),
                      len(selection_layers))  # the headline's k is always measured
        if self.finetuning:  # made before: rank 0 benches alone, with no collective inside (torchrun)
            self.finetune(spec)

        def compute(folder):
            sel = folder / "selection.json"
            store.write_json(sel, {"layers": selection_layers})
            bcfg.selection = str(sel)
            if self.finetuning:  # the workers load the fine-tuned folder (the key names its label)
                bcfg.model = str(self.ft_folder(spec))
            self._models.clear()  # the workers load their own copy; keep the parent's memory low
            return {"bench": run_bench(bcfg, report=self.report)}

        return self.stages(f"{slug(spec)}/bench", [asdict(bcfg), selection_layers], compute, main_only=True)

    def transfer(self, spec: str, a_adapt_stage: str, a_layers: list[int], b_adapt: dict) -> dict:
        """A's selection (plain and with A's adapters) evaluated on domain B's test users."""
        cfg = self.cfg

        def compute(folder):
            model, _ = self.model(spec)
            ev, cands = self.evaluator(spec, cfg.domain_b, "test", cfg.eval_users)
            with arch.keep_layers(model, a_layers):
                plain = ev(model)
            compact = load_compact(self.stages.root / a_adapt_stage / "adapt" / "compact", base=model)
            adapted = ev(compact)
            pop = self.popularity(cfg.domain_b, cands)
            return {"per_user": pd.DataFrame({"a_selection_plain": plain, "a_selection_adapters": adapted,
                                              "popularity": pop["ndcg@10"].to_numpy()})}

        return self.stages(f"{slug(spec)}/{slug(cfg.domain_b)}/transfer",
                           self._key(spec, a_layers, a_adapt_stage, b_adapt["summary"]["layers"],
                                     cfg.eval_users), compute)
