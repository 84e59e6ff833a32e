"""The compact recommender's stages (a mixin of ``Study``): adapters on kept layers (RQ3), A's compact model on
the transfer dataset (transfer), every LLM system on the cold-start test set, and the bench (RQ4). Each: config, compute,
cost."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import pandas as pd

from layerviz import arch, store
from layerviz.bench import configurations, layers_for_k, run_bench, with_k
from layerviz.compression.compact import load_compact
from layerviz.compression.config import AdaptConfig, AdapterTrainConfig, parse_objective
from layerviz.compression.retention import control_config, run_adapt
from layerviz.progress import progress
from layerviz.settings import BenchConfig
from layerviz.store import slug
from layerviz.study.baseline_stages import metric_columns
from layerviz.study.stage_base import Scored


@dataclass
class ColdStage(Scored):
    """The main dataset's cold-start test set: the recommender, ``variants`` and ``adapters`` (``Scored``), and the
    zero-shot model with its own calibration."""

    zeroshot_calibration: str | None = None
    """The zero-shot model's calibration (None: the study does not fine-tune, no zero-shot side)."""


@dataclass
class BenchStage:
    """What the bench measures: its BenchConfig (the headline's k included) and the selection it times."""

    bench: dict
    layers: list


@dataclass
class HealVariantsStage:
    """RQ3's comparison: one adapter run (AdaptConfig as a dict) per variant, selection and k, with its labels."""

    runs: list


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` on top, mappings (policy, train, heal) merged one level down."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


VARIANT_SUMMARY = ("objective", "heal_mode", "valid_ndcg@10", "full_ndcg@10", "control_ndcg@10", "train_seconds",
                   "heal_seconds", "adapter_params", "params_pct_of_base", "prefill_time_added_pct", "exportable")
"""What the RQ3 comparison keeps of each run's summary."""


class CompactStages:
    """Stages that ``Study`` inherits (they use ``StageBase``'s resources and ``stage``)."""

    def adapt_config(self, spec: str, dataset: str, layers: list[int], over: dict | None = None) -> AdaptConfig:
        """The adapter run on ``layers``: the adapters section, with a variant's ``over``rides on top."""
        return AdaptConfig(**self.shared(self.label(spec), dataset), layers=layers, users=self.cfg.eval_users,
                           calibration=self.calibration(spec, dataset)["choice"],
                           **merged(self.cfg.adapters, over or {}))

    def adapters(self, spec: str, dataset: str, layers: list[int]) -> dict:
        """Adapters trained on ``layers`` (and healed, as the adapters section says); retention against the full
        model on the test users, agreement with its scores, and with healing the control."""
        acfg = self.adapt_config(spec, dataset, layers)

        def compute(folder):
            model, tok = self.model(spec)
            res = run_adapt(acfg, out=folder / "adapt", model=model, tokenizer=tok, use_cache=False, report=None)
            return {k: res[k] for k in ("summary", "retention", "curve", "placement", "per_user", "heal_curve")
                    if k in res}

        return self.stage(f"{slug(spec)}/{slug(dataset)}/adapters", acfg, compute, dataset,
                          lambda at: self.adapters_cost(at, spec, dataset, len(layers), acfg), spec,
                          planned={"summary": {"layers": layers}})

    def adapters_cost(self, at: tuple, spec: str, dataset: str, k: int, acfg: AdaptConfig, full: bool = True) -> None:
        """Teacher states; validation at drop, stage 1, stage 2 and around each epoch; stage 2's training; with
        healing, its steps, validations and the control; the test scoring of the full model and each step."""
        p, n, c = self.planner, self.planner.shape(spec).n, self.cfg
        t, healing = AdapterTrainConfig(**acfg.train), acfg.healing()
        m, tokens, target = p.data[dataset].probes(acfg.samples)
        val = max(1, int(round(m * t.val_fraction)))
        train, e2 = m - val, 0 if healing else t.stage2_epochs
        exact = e2 <= t.patience  # early stopping needs `patience` epochs without progress
        p.prompts(at, "probe", m + (val if healing else 0), tokens, target)
        checks = 2 + (1 if e2 else 0) + (1 if healing else 0)
        p.prompts(at, "probe", val * (checks + (1 + e2 if e2 else 0)) + train * e2, tokens, target, k, exact)
        p.prompts(at, "backward", train * e2, tokens, target, k, exact, factor=2.0)
        p.add(at, "train", e2 * math.ceil(train / t.sample_batch), exact=exact)
        test = p.data[dataset].users("test", c.eval_users, c.negatives)
        p.scoring(at, test, [n] * full + [k, k] + [k] * (1 if e2 or healing else 0), p.priors(False))
        if not healing:  # the final model's validation NDCG@10 (healing measured it already)
            p.scoring(at, p.data[dataset].users("valid", acfg.valid_users, c.negatives), [k], p.priors(False))
        if healing:
            self.heal_cost(at, dataset, acfg, [k])
            control = (spec, dataset, acfg.users, acfg.valid_users, json.dumps(control_config(acfg).__dict__, sort_keys=True))
            if acfg.control and "task" in parse_objective(acfg.objective) and control not in p.shared_work:
                p.shared_work.add(control)  # computed once, then read from results_dir/adapt-control
                self.heal_cost(at, dataset, acfg, [n])
                p.scoring(at, test, [n], p.priors(False))

    def heal_cost(self, at: tuple, dataset: str, acfg: AdaptConfig, size: list[int]) -> None:
        """Healing (or the control's training) of a model of ``size`` layers: its steps and validations."""
        p, h = self.planner, acfg.heal_config()
        exact = h.max_seconds is None and h.patience is None
        evals = 1 + sum(1 for s in range(1, h.steps + 1) if s % h.eval_every == 0 or s == h.steps)
        u = p.data[dataset].users("valid", acfg.valid_users, self.cfg.negatives)
        p.scoring(at, u, size * evals, p.priors(False), exact=exact)
        examples = h.steps * h.batch_size
        one = p.shape(at[0]).forward(u.prefix_tokens, 0, size[0]) + (1 + h.train_negatives) * p.shape(at[0]).forward(
            u.title_tokens, u.title_tokens, size[0])
        tokens = examples * (u.prefix_tokens + (1 + h.train_negatives) * u.title_tokens)
        p.add(at, "train", h.steps, examples * one, tokens, exact)
        p.add(at, "backward", examples, 2 * examples * one, tokens, exact)

    def layers_at(self, spec: str, selection: str, k: int) -> list[int] | None:
        """The kept layers of ``selection`` ('primary': the primary strategy, 'first_k') at ``k``: the primary
        strategy's own selection at its k, a step of its trace at a smaller k, None where it has none."""
        if selection == "first_k":
            return list(range(k))
        sel = self.selection(spec, self.cfg.dataset, self.cfg.primary)
        if len(sel["selection"]["layers"]) == k or sel.get("trace") is None:
            return list(sel["selection"]["layers"]) if len(sel["selection"]["layers"]) == k else list(range(k))
        steps = [list(t) for t in sel["trace"]["layers"] if len(t) == k]
        return steps[-1] if steps else None

    def heal_runs(self, spec: str) -> list[dict]:
        """Every (variant, selection, k) adapter run that RQ3's comparison makes for ``spec`` (``rq3`` section)."""
        r, a = self.cfg.rq3, self.cfg.dataset
        runs = []
        for k in r.get("ks") or [self.k(spec)]:
            for selection in r.get("selections", ["primary", "first_k"]):
                layers = self.layers_at(spec, selection, k)
                if layers is None:
                    continue
                runs += [{"variant": name, "selection": selection, "k": k, "layers": [int(i) for i in layers],
                          "adapt": self.adapt_config(spec, a, layers, over)}
                         for name, over in sorted(r["variants"].items())]  # a mapping's order is not part of the key
        return runs

    def heal_variants(self, spec: str) -> dict:
        """RQ3: every adapter variant (objective, healing) on the primary selection and first_k at each k of the
        rq3 section, on the main dataset's test users: retention (against the full model and the control), agreement,
        and the validation NDCG@10 that picks a variant."""
        runs, a = self.heal_runs(spec), self.cfg.dataset
        config = HealVariantsStage([{**{k: v for k, v in r.items() if k != "adapt"}, "adapt": asdict(r["adapt"])}
                                    for r in runs])

        def compute(folder):
            model, tok = self.model(spec)
            full = self.evaluator(spec, a, "test", self.cfg.eval_users)[0].scores(model)
            rows, summaries, per_user = [], [], {}
            for r in progress(runs, desc="RQ3 variants", unit="run"):
                res = run_adapt(r["adapt"], out=folder / f"{r['selection']}-k{r['k']}-{slug(r['variant'])}", model=model,
                                tokenizer=tok, report=None, full_scores=full, save=False)
                tags = {"variant": r["variant"], "selection": r["selection"], "k": r["k"]}
                rows.append(res["retention"].assign(**tags))
                final = res["retention"]["stage"].iloc[-1]
                for stage in ("drop", final):  # per user: the paired comparisons of the RQ3 table
                    per_user[f"{r['selection']}|{r['k']}|{r['variant']}|{stage}"] = res["per_user"][f"{stage}:ndcg@10"]
                summaries.append({**tags, "layers": r["layers"], **{c: res["summary"].get(c) for c in VARIANT_SUMMARY}})
            return {"retention": pd.concat(rows, ignore_index=True), "summary": pd.DataFrame(summaries),
                    "per_user": pd.DataFrame(per_user)}

        def cost(at):  # the full model's test scores once, then every run
            p, c = self.planner, self.cfg
            p.scoring(at, p.data[a].users("test", c.eval_users, c.negatives), [p.shape(spec).n], p.priors(False))
            for r in runs:
                self.adapters_cost(at, spec, a, len(r["layers"]), r["adapt"], full=False)

        return self.stage(f"{slug(spec)}/{slug(a)}/heal_variants", config, compute, a, cost, spec)

    def adapt_folder(self, spec: str, dataset: str):
        """The compact model the adapters stage of ``spec`` on ``dataset`` saved."""
        return self.stages.root / f"{slug(spec)}/{slug(dataset)}/adapters" / "adapt" / "compact"

    def transfer(self, spec: str, a_layers: list[int]) -> dict:
        """A's selection (plain and with A's adapters) evaluated on the transfer dataset's test users."""
        cfg, b = self.cfg, self.cfg.transfer_dataset
        config = self.scored(spec, b, cfg.eval_users, calibration=self.calibration(spec, b)["choice"],
                             variants={"a_selection_plain": a_layers},
                             adapters=asdict(self.adapt_config(spec, cfg.dataset, a_layers)))

        def compute(folder):
            model, _ = self.model(spec)
            ev, cands = self.evaluator(spec, b, "test", cfg.eval_users)
            with arch.keep_layers(model, a_layers):
                plain = ev(model)
            adapted = ev(load_compact(self.adapt_folder(spec, cfg.dataset), base=model))
            pop = self.popularity(b, cands)
            return {"per_user": pd.DataFrame({"a_selection_plain": plain, "a_selection_adapters": adapted,
                                              "popularity": pop["ndcg@10"].to_numpy()})}

        def cost(at):
            p, k = self.planner, len(a_layers)
            p.scoring(at, p.data[b].users("test", cfg.eval_users, cfg.negatives), [k, k], p.priors(False))

        return self.stage(f"{slug(spec)}/{slug(b)}/transfer", config, compute, b, cost, spec)

    def cold(self, spec: str, layers: list[int]) -> dict:
        """The main dataset's cold-start test set: the zero-shot model, the fine-tuned one, and ``layers`` with the
        adapters of the adapters stage (the study's compact recommender), every metric per user."""
        c, a = self.cfg, self.cfg.dataset
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
        bcfg = with_k(BenchConfig(**self.shared(self.label(spec), self.cfg.dataset), **self.cfg.bench),
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

        return self.stage(f"{slug(spec)}/bench", BenchStage(asdict(bcfg), selection_layers), compute, self.cfg.dataset,
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
        u = p.data[self.cfg.dataset].users("test", 1, self.cfg.negatives)
        p.scoring(at, u, [s for s in sizes for _ in range(rounds + b.qps_queries)], priors=True, exact=False)
