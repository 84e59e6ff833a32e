"""The layer-selection stages (a mixin of ``Study``): each strategy's selection and its RQ2 curve on the
validation users, and the test evaluation of the full model, popularity and plain-dropping variants.
Each: config, compute, cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd

from layerviz import arch, metrics
from layerviz.compression.selection import (
    FIXED,
    SubsetScorer,
    fixed_layers,
    importance_order,
    load_reference,
    select,
)
from layerviz.data.prompts import build_probes
from layerviz.depth import map_reference, without_lower_third
from layerviz.store import slug
from layerviz.study.cost import Planner
from layerviz.study.stage_base import Scored

ORDERED = ("importance_greedy", "top_k")
"""Strategies that follow an importance order (its criterion and the importance stage's config decide them)."""


@dataclass
class SelectionStage(Scored):
    """A selection: the strategy on the validation users (``Scored``), at k layers."""

    strategy: str = ""
    k: int = 0
    criterion: str | None = None
    """The criterion ordering the layers (importance_greedy, top_k), else None."""
    importance: dict | None = None
    """The config of the importance stage whose table gives that order (or, contiguous_block, the probe
    samples' settings), else None."""


@dataclass
class CurvesStage(Scored):
    """RQ2 curves: every fixed-k strategy at k' = 1..k on the validation users (``Scored``)."""

    k: int = 0
    fixed: list = field(default_factory=list)
    criterion: str | None = None
    importance: dict | None = None
    selections: dict = field(default_factory=dict)
    """Each strategy's selected layers (their traces are reused)."""


class SelectStages:
    """Stages that ``Study`` inherits (they use ``StageBase``'s resources and ``stage``)."""

    def selection_config(self, spec: str, dataset: str, strategy: str) -> SelectionStage:
        crit = self.criterion(spec, dataset)["criterion"] if strategy in ORDERED else None
        uses_table = strategy in ORDERED or strategy == "contiguous_block"
        icfg = self.importance_config(spec, dataset, ablation=dataset == self.cfg.dataset) if uses_table else None
        return SelectionStage(**self.shared(self.label(spec), dataset), users=self.cfg.select_users, split="valid",
                              calibration=self.calibration(spec, dataset)["choice"], strategy=strategy,
                              k=self.k(spec), criterion=crit, importance=icfg and asdict(icfg))

    def selection(self, spec: str, dataset: str, strategy: str) -> dict:
        config, c = self.selection_config(spec, dataset, strategy), self.cfg

        def compute(folder):
            ev, _ = self.evaluator(spec, dataset, "valid", c.select_users)
            model, tok = self.model(spec)
            table = None
            if config.criterion is not None:
                table = self.importance(spec, dataset, ablation=dataset == c.dataset)["importance"]
            cal = build_probes(self.prep(dataset), tok, c.importance.get("samples", 16), seed=c.seed,
                                        max_title_tokens=c.max_title_tokens) if strategy == "contiguous_block" else None
            s = select(strategy, model, ev, k=config.k, importance=table, seed=c.seed, probes=cal,
                       criterion=config.criterion or "fused")
            doc = {**s.to_json(), "model": spec, "dataset": dataset, "calibration": ev.cfg.calibration}
            if config.criterion is not None:
                doc["criterion_choice"] = self.criterion(spec, dataset)
            return {"selection": doc, "trace": s.trace}

        def cost(at):
            p = self.planner
            sizes, exact = Planner.subsets(strategy, p.shape(spec).n, config.k)
            p.add(at, "subset", len(sizes), exact=exact)
            p.scoring(at, p.data[dataset].users("valid", c.select_users, c.negatives), sizes, p.priors(False), exact)
            if strategy == "contiguous_block":  # angular distances over the importance samples
                p.prompts(at, "probe", *p.data[dataset].probes(config.importance["samples"]))

        return self.stage(f"{slug(spec)}/{slug(dataset)}/select-{strategy}", config, compute, dataset, cost, spec,
                          planned={"selection": {"layers": list(range(config.k))}, "trace": None})

    def variants(self, spec: str) -> dict[str, list[int]]:
        """The evaluation stage's variants: the full model, the primary and ``eval_strategies`` selections, the
        paper plan's reference list mapped onto this depth, and the model without its lower third."""
        cfg, n = self.cfg, self.n_layers(spec)
        ref = load_reference()["selections"][cfg.reference]
        variants = {"full": list(range(n)),
                    f"select:{cfg.primary}": self.selection(spec, cfg.dataset, cfg.primary)["selection"]["layers"],
                    "drop_lower_third": without_lower_third(n),
                    "reference_mapped": map_reference(ref["layers"], ref["real_num_layers"], n)}
        for s in cfg.eval_strategies:
            if s != cfg.primary:
                variants[f"select:{s}"] = self.selection(spec, cfg.dataset, s)["selection"]["layers"]
        return variants

    def evaluation(self, spec: str) -> dict:
        """Test metrics (every metric, per user) of the full model, popularity and plain-dropping variants.
        Adapters are measured by the adapters stage."""
        cfg, variants = self.cfg, self.variants(spec)
        config = self.scored(spec, cfg.dataset, cfg.eval_users, variants=variants,
                             calibration=self.calibration(spec, cfg.dataset)["choice"])

        def compute(folder):
            model, _ = self.model(spec)
            ev, cands = self.evaluator(spec, cfg.dataset, "test", cfg.eval_users)
            cols, rows = {}, []
            for name, layers in variants.items():
                with arch.keep_layers(model, layers):
                    m = ev.metrics(model)
                cols.update({f"{name}:{metric}": m[metric].to_numpy() for metric in m.columns})
                rows.append({"variant": name, "layers": layers, "k": len(layers)})
            pop = self.popularity(cfg.dataset, cands)
            cols.update({f"popularity:{metric}": pop[metric].to_numpy() for metric in pop.columns})
            rows.append({"variant": "popularity", "layers": [], "k": 0})
            chance = {"variant": "chance", "n_candidates": cfg.negatives + 1,
                      **metrics.chance(cfg.negatives + 1)}
            return {"per_user": pd.DataFrame(cols), "variants": pd.DataFrame(rows), "chance": chance}

        def cost(at):
            p = self.planner
            p.scoring(at, p.data[cfg.dataset].users("test", cfg.eval_users, cfg.negatives),
                      [len(v) for v in variants.values()], p.priors(False))

        planned = pd.DataFrame(columns=[f"{v}:{m}" for v in variants for m in ("ndcg@5", "ndcg@10")])
        return self.stage(f"{slug(spec)}/{slug(cfg.dataset)}/evaluation", config, compute, cfg.dataset, cost, spec,
                          planned={"per_user": planned})

    def curves(self, spec: str, dataset: str) -> dict:
        """RQ2 traces: validation NDCG@10 of every fixed-k strategy at k' = 1..k (and the full model).

        ``top_k`` at k' is the importance order's first k' layers, which is exactly what the greedy loop
        scores at step k'; its points are taken from the greedy trace where that ran to k'.
        """
        cfg, n, k = self.cfg, self.n_layers(spec), self.k(spec)
        fixed = [s for s in cfg.strategies if s in FIXED]
        sels = {s: self.selection(spec, dataset, s) for s in cfg.strategies}
        icfg = self.importance_config(spec, dataset, ablation=dataset == cfg.dataset) if "top_k" in fixed else None
        crit = self.criterion(spec, dataset)["criterion"] if icfg is not None else None
        config = CurvesStage(**self.shared(self.label(spec), dataset), users=cfg.select_users, split="valid",
                             calibration=self.calibration(spec, dataset)["choice"], k=k, fixed=fixed, criterion=crit,
                             importance=icfg and asdict(icfg),
                             selections={s: v["selection"]["layers"] for s, v in sels.items()})

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
            table = self.importance(spec, dataset, ablation=dataset == cfg.dataset)["importance"] if crit else None
            order = importance_order(table, crit, True, n) if table is not None else None
            rows += [point(s, fixed_layers(s, n, kk, order if s == "top_k" else None))
                     for s in fixed for kk in range(1, k + 1)]
            return {"curves": pd.DataFrame(rows)}

        def cost(at):  # the full model and every fixed strategy below k (each one's k is in its own selection)
            p = self.planner
            sizes = [n] + [kk for _ in fixed for kk in range(1, k)]
            p.add(at, "subset", len(sizes), exact=False)
            p.scoring(at, p.data[dataset].users("valid", cfg.select_users, cfg.negatives), sizes, p.priors(False),
                      exact=False)

        return self.stage(f"{slug(spec)}/{slug(dataset)}/curves", config, compute, dataset, cost, spec)
