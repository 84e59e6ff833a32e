"""The compact recommender's stages (a mixin of ``Study``): adapters on kept layers (RQ3), A's compact model on
domain B (transfer), every LLM system on the cold-start test set, and the bench (RQ4). Each: config, compute,
cost."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd

from layerviz import arch, store
from layerviz.adapters import TrainConfig
from layerviz.bench import BenchConfig, configurations, layers_for_k, run_bench, with_k
from layerviz.compact import AdaptConfig, load_compact, run_adapt
from layerviz.store import slug
from layerviz.study.baseline_stages import metric_columns
from layerviz.study.stage_base import Scored


@dataclass
class ColdStage(Scored):
    """Domain A's cold-start test set: the recommender, ``variants`` and ``adapters`` (``Scored``), and the
    zero-shot model with its own calibration."""

    zeroshot_calibration: str | None = None
    """The zero-shot model's calibration (None: the study does not fine-tune, no zero-shot side)."""


@dataclass
class BenchStage:
    """What the bench measures: its BenchConfig (the headline's k included) and the selection it times."""

    bench: dict
    layers: list


class CompactStages:
    """Stages that ``Study`` inherits (they use ``StageBase``'s resources and ``stage``)."""

    def adapt_config(self, spec: str, dataset: str, layers: list[int]) -> AdaptConfig:
        return AdaptConfig(**self.shared(self.label(spec), dataset), layers=layers, users=self.cfg.eval_users,
                           calibration=self.calibration(spec, dataset)["choice"], **self.cfg.adapters)

    def adapters(self, spec: str, dataset: str, layers: list[int], measured: dict | None = None) -> dict:
        """Adapters trained on ``layers``; retention against the full model on the test users.

        ``measured`` ({"full": per-user metrics, "drop": per-user metrics of ``layers`` without adapters}),
        when another stage has scored them on these very users and candidates, is reused instead of
        scoring the same thing twice (the outputs are the same: the test in test_study checks it).
        """
        acfg = self.adapt_config(spec, dataset, layers)

        def compute(folder):
            model, tok = self.model(spec)
            res = run_adapt(acfg, out=folder / "adapt", model=model, tokenizer=tok, use_cache=False, report=None,
                            measured=measured)
            return {k: res[k] for k in ("summary", "retention", "curve", "placement", "per_user")}

        return self.stage(f"{slug(spec)}/{slug(dataset)}/adapters", acfg, compute, dataset,
                          lambda at: self.adapters_cost(at, spec, dataset, len(layers), len(measured or {})), spec,
                          planned={"summary": {"layers": layers}})

    def adapters_cost(self, at: tuple, spec: str, dataset: str, k: int, measured: int) -> None:
        """Teacher states; validation at drop, stage 1, stage 2 and around each epoch; stage 2's training; the test
        scoring of what ``measured`` (how many of full, drop) another stage did not score already."""
        p, n, c = self.planner, self.planner.shape(spec).n, self.cfg
        t = TrainConfig(**c.adapters.get("train", {}))
        m, tokens, target = p.data[dataset].calibration(c.adapters.get("samples", AdaptConfig.samples))
        val = max(1, int(round(m * t.val_fraction)))
        train, e2 = m - val, t.stage2_epochs
        exact = e2 <= t.patience  # early stopping needs `patience` epochs without progress
        p.prompts(at, "calibration", m, tokens, target)
        p.prompts(at, "calibration", val * (3 + (1 + e2 if e2 else 0)) + train * e2, tokens, target, k, exact)
        p.prompts(at, "backward", train * e2, tokens, target, k, exact, factor=2.0)
        p.add(at, "train", e2 * math.ceil(train / t.sample_batch), exact=exact)
        sizes = [n] * (measured < 1) + [k] * (measured < 2) + [k] * (2 if e2 else 1)
        p.scoring(at, p.data[dataset].users("test", c.eval_users, c.negatives), sizes, p.priors(False))

    def adapt_folder(self, spec: str, dataset: str):
        """The compact model the adapters stage of ``spec`` on ``dataset`` saved."""
        return self.stages.root / f"{slug(spec)}/{slug(dataset)}/adapters" / "adapt" / "compact"

    def transfer(self, spec: str, a_layers: list[int]) -> dict:
        """A's selection (plain and with A's adapters) evaluated on domain B's test users."""
        cfg, b = self.cfg, self.cfg.domain_b
        config = self.scored(spec, b, cfg.eval_users, calibration=self.calibration(spec, b)["choice"],
                             variants={"a_selection_plain": a_layers},
                             adapters=asdict(self.adapt_config(spec, cfg.domain_a, a_layers)))

        def compute(folder):
            model, _ = self.model(spec)
            ev, cands = self.evaluator(spec, b, "test", cfg.eval_users)
            with arch.keep_layers(model, a_layers):
                plain = ev(model)
            adapted = ev(load_compact(self.adapt_folder(spec, cfg.domain_a), base=model))
            pop = self.popularity(b, cands)
            return {"per_user": pd.DataFrame({"a_selection_plain": plain, "a_selection_adapters": adapted,
                                              "popularity": pop["ndcg@10"].to_numpy()})}

        def cost(at):
            p, k = self.planner, len(a_layers)
            p.scoring(at, p.data[b].users("test", cfg.eval_users, cfg.negatives), [k, k], p.priors(False))

        return self.stage(f"{slug(spec)}/{slug(b)}/transfer", config, compute, b, cost, spec)

    def cold(self, spec: str, layers: list[int]) -> dict:
        """Domain A's cold-start test set: the zero-shot model, the fine-tuned one, and ``layers`` with the
        adapters of the adapters stage (the study's compact recommender), every metric per user."""
        c, a = self.cfg, self.cfg.domain_a
        zs = self.calibration(spec, a, zeroshot=True)["choice"] if self.finetuning else None
        config = ColdStage(**self.shared(self.label(spec), a), users=c.eval_users, cold=True,
                           calibration=self.calibration(spec, a)["choice"], variants={"compact:plain": layers},
                           adapters=asdict(self.adapt_config(spec, a, layers)), zeroshot_calibration=zs)

        def compute(folder):
            cands = self.cold_candidates(a)
            ev, _ = self.evaluator(spec, a, "test", c.eval_users, zeroshot=True, cold=True)
            cols = metric_columns("zeroshot", ev.metrics(self.model(spec, zeroshot=True)[0])) if self.finetuning else {}
            ev, _ = self.evaluator(spec, a, "test", c.eval_users, cold=True)
            model = self.model(spec)[0]
            cols.update(metric_columns("full", ev.metrics(model)))
            with arch.keep_layers(model, layers):
                cols.update(metric_columns("compact:plain", ev.metrics(model)))
            cols.update(metric_columns("compact:adapters", ev.metrics(load_compact(self.adapt_folder(spec, a), base=model))))
            return {"per_user": pd.DataFrame(cols), "meta": {"users": cands["user_id"].tolist()}}

        def cost(at):  # the adapters count as no layers, as in transfer
            p, n, k = self.planner, self.planner.shape(spec).n, len(layers)
            u = p.data[a].users("test", c.eval_users, c.negatives, True)
            if self.finetuning:
                p.scoring(at, u, [n], p.priors(True))
            p.scoring(at, u, [n, k, k], p.priors(False))

        return self.stage(f"{slug(spec)}/{slug(a)}/cold", config, compute, a, cost, spec)

    def bench(self, spec: str, selection_layers: list[int]) -> dict:
        """Timed prefills and queries of the full model and its k-layer variants (RQ4), on rank 0 alone."""
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

        return self.stage(f"{slug(spec)}/bench", BenchStage(asdict(bcfg), selection_layers), compute, self.cfg.domain_a,
                          lambda at: self.bench_cost(at, spec, bcfg, len(selection_layers)), spec, main_only=True)

    def bench_cost(self, at: tuple, spec: str, b: BenchConfig, k: int) -> None:
        """Timed rounds of every configuration (prefills and one scored query each), then the throughput queries;
        on CPU the memory of each is measured in processes of their own (not counted)."""
        p, sh = self.planner, self.planner.shape(spec)
        sizes = [c["k"] for c in configurations(sh.n, b, layers_for_k(k, sh.n), sh.costs)]
        rounds = b.warmup + b.runs + (0 if b.isolate and self.cfg.device == "cpu" else 1)  # + one memory pass each
        seqs = rounds * b.prefill_batch
        p.add(at, "prefill", seqs * len(sizes), sum(seqs * sh.forward(b.seq_len, b.seq_len, s) for s in sizes),
              seqs * b.seq_len * len(sizes), exact=False)
        u = p.data[self.cfg.domain_a].users("test", 1, self.cfg.negatives)
        p.scoring(at, u, [s for s in sizes for _ in range(rounds + b.qps_queries)], priors=True, exact=False)
