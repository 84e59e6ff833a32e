"""The stages of one recommender as a whole (a mixin of ``Study``): fine-tuning, the calibration choice, the
zero-shot and fine-tuned model on the test users, per-layer importance (RQ1). Each: config, compute, cost."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass

import pandas as pd

from layerviz.compression import importance as imp
from layerviz.evaluate import calibration_config, calibration_to_use
from layerviz.finetune import finetune as run_finetune
from layerviz.finetune import planned_steps
from layerviz.store import slug


@dataclass
class FinetuneStage:
    """What decides the fine-tuned recommender: its FinetuneConfig (without where results live)."""

    finetune: dict


class ModelStages:
    """Stages that ``Study`` inherits (they use ``StageBase``'s resources and ``stage``)."""

    def finetune(self, spec: str) -> dict:
        """The base model fine-tuned on the main dataset's training split (a plain HF folder under the stage)."""
        fcfg, a = self.ft_config(spec), self.cfg.dataset

        def compute(folder):
            base, tok = self.model(spec, zeroshot=True)
            shutil.rmtree(folder / "model", ignore_errors=True)  # stale: this stage is being (re)computed
            res = run_finetune(fcfg, base, tok, out=folder / "model", report=self.report)
            return {"summary": res.summary, "curves": res.curves}

        def cost(at):  # validation evaluations, then the training steps (forward and backward)
            p, sh = self.planner, self.planner.shape(spec)
            steps = planned_steps(fcfg, p.data[a].windows(fcfg.history_len, fcfg.min_history))
            evals = 1 + sum(1 for s in range(1, steps + 1) if s % fcfg.eval_every == 0 or s == steps)
            exact = fcfg.max_seconds is None and fcfg.patience is None  # a time cap or early stop ends it sooner
            u = p.data[a].users("valid", fcfg.eval_users, fcfg.negatives)  # their token counts stand for the windows'
            p.scoring(at, u, [sh.n] * evals, exact=exact)
            examples = steps * fcfg.batch_size * fcfg.grad_accum
            one = sh.forward(u.prefix_tokens, 0) + (1 + fcfg.train_negatives) * sh.forward(u.title_tokens,
                                                                                           u.title_tokens)
            tokens = examples * (u.prefix_tokens + (1 + fcfg.train_negatives) * u.title_tokens)
            p.add(at, "train", steps, examples * one, tokens, exact)
            p.add(at, "backward", examples, 2 * examples * one, tokens, exact)

        config = FinetuneStage({k: v for k, v in asdict(fcfg).items() if k != "results_dir"})
        return self.stage(f"{slug(spec)}/{slug(a)}/finetune", config, compute, a, cost, spec)

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
            _, record = calibration_to_use(model, tok, self.prep(dataset), calibration_config(
                "auto", c.calibration_users, c.negatives, c.seed, c.max_title_tokens, c.results_dir), report=None)
            return {"calibration": record}

        def cost(at):  # raw scores, then every title's prior once
            p = self.planner
            u = p.data[dataset].users("valid", c.calibration_users, c.negatives)
            p.scoring(at, u, [p.shape(spec).n])
            tokens = u.empty_tokens + u.title_tokens
            p.add(at, "prior", u.titles, u.titles * p.shape(spec).forward(tokens, u.title_tokens), u.titles * tokens,
                  exact=False)

        config = self.scored(spec, dataset, c.calibration_users, zeroshot, split="valid", calibration="auto")
        return self.stage(f"{slug(spec)}/{slug(dataset)}/calibration{suffix}", config, compute, dataset, cost, spec,
                          planned={"calibration": {"choice": "auto"}})["calibration"]

    def zeroshot(self, spec: str, dataset: str) -> dict:
        """The zero-shot model on the test users (every metric per user, its own calibration) and popularity."""
        cfg = self.cfg
        config = self.scored(spec, dataset, cfg.eval_users, zeroshot=True,
                             calibration=self.calibration(spec, dataset, zeroshot=True)["choice"])

        def compute(folder):
            ev, cands = self.evaluator(spec, dataset, "test", cfg.eval_users, zeroshot=True)
            m = ev.metrics(self.model(spec, zeroshot=True)[0])
            pop = self.popularity(dataset, cands)
            cols = {**{f"zeroshot:{k}": m[k].to_numpy() for k in m.columns},
                    **{f"popularity:{k}": pop[k].to_numpy() for k in pop.columns}}
            return {"per_user": pd.DataFrame(cols), "meta": {"calibration": ev.cfg.calibration,
                                                               "users": cands["user_id"].tolist()}}

        def cost(at):
            p = self.planner
            p.scoring(at, p.data[dataset].users("test", cfg.eval_users, cfg.negatives), [p.shape(spec).n],
                      p.priors(True))

        return self.stage(f"{slug(spec)}/{slug(dataset)}/zeroshot", config, compute, dataset, cost, spec)

    def tuned_on(self, spec: str, dataset: str) -> dict:
        """The fine-tuned full model on another dataset's test users (cross-domain), every metric per user."""
        cfg = self.cfg
        config = self.scored(spec, dataset, cfg.eval_users, calibration=self.calibration(spec, dataset)["choice"])

        def compute(folder):
            ev, cands = self.evaluator(spec, dataset, "test", cfg.eval_users)
            m = ev.metrics(self.model(spec)[0])
            return {"per_user": pd.DataFrame({f"full:{k}": m[k].to_numpy() for k in m.columns}),
                    "meta": {"calibration": ev.cfg.calibration, "users": cands["user_id"].tolist()}}

        def cost(at):
            p = self.planner
            p.scoring(at, p.data[dataset].users("test", cfg.eval_users, cfg.negatives), [p.shape(spec).n])

        return self.stage(f"{slug(spec)}/{slug(dataset)}/finetuned-full", config, compute, dataset, cost, spec,
                          planned={"per_user": pd.DataFrame(columns=["full:ndcg@5", "full:ndcg@10"])})

    def importance_config(self, spec: str, dataset: str, ablation: bool = True,
                          zeroshot: bool = False) -> imp.ImportanceConfig:
        """The importance stage's config (ablation off: the main dataset's fitted fusion weights, if 'fit')."""
        over_ = dict(self.cfg.importance) if ablation else {**self.cfg.importance, "ablation": False}
        if not ablation and over_.get("fusion_weights") == "fit":  # no ground truth here: the main dataset's fitted weights
            over_["fusion_weights"] = self.importance(spec, self.cfg.dataset, zeroshot=zeroshot)["fusion"]
        needs_scorer = ablation and over_.get("ablation_users", imp.ImportanceConfig.ablation_users) > 0
        calibration = self.calibration(spec, dataset, zeroshot)["choice"] if needs_scorer else "none"
        return imp.ImportanceConfig(**self.shared(self.label(spec, zeroshot), dataset), calibration=calibration,
                                    **over_)

    def importance(self, spec: str, dataset: str, ablation: bool = True, zeroshot: bool = False) -> dict:
        icfg = self.importance_config(spec, dataset, ablation, zeroshot)

        def compute(folder):
            model, tok = self.model(spec, zeroshot)
            res = imp.run_importance(icfg, model, tok, report=None)
            return {"importance": res.table, "validity": res.validity, "fusion": res.fusion_weights}

        def cost(at):
            self.importance_cost(at, spec, dataset, icfg, zeroshot)

        suffix = "-zeroshot" if zeroshot and self.finetuning else ""
        return self.stage(f"{slug(spec)}/{slug(dataset)}/importance{suffix}", icfg, compute, dataset, cost, spec,
                          planned={"validity": None, "fusion": None, "importance": None})

    def importance_cost(self, at: tuple, spec: str, dataset: str, icfg: imp.ImportanceConfig, zeroshot: bool) -> None:
        """The hook pass over the probe prompts (and its backward), then skipping each layer in turn."""
        p, n_layers, ablation = self.planner, self.planner.shape(spec).n, icfg.ablation
        n, tokens, target = p.data[dataset].probes(icfg.samples)
        p.prompts(at, "probe", n * (2 if ablation else 1), tokens, target)  # + the unablated pass
        p.prompts(at, "backward", n, tokens, target, factor=2.0)  # the Fisher criteria
        if ablation:  # skipping layer i re-runs layers i+1..L-1 only: (L-1)/2 layers on average
            p.prompts(at, "ablation", n * n_layers, tokens, target, (n_layers - 1) / 2)
            if icfg.ablation_users:
                u = p.data[dataset].users("valid", icfg.ablation_users, icfg.ablation_negatives)
                p.scoring(at, u, [n_layers] + [n_layers - 1] * n_layers, p.priors(zeroshot))

    def criterion(self, spec: str, dataset: str) -> dict:
        """The criterion ordering importance_greedy/top_k: the config's, or the most valid one ('auto')."""
        if self.cfg.criterion != "auto":
            return {"criterion": self.cfg.criterion, "auto": False}
        validity = self.importance(spec, self.cfg.dataset)["validity"]  # needs the ablation: on the main dataset
        if validity is None:  # planning: not measured yet
            return {"criterion": "auto", "auto": True, "dataset": self.cfg.dataset}
        return {**imp.choose_criterion(validity), "auto": True, "dataset": self.cfg.dataset}
