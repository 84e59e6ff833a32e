"""The study's model-free reference stages and the cold-start stage (a mixin of ``Study``).

``baselines(dataset)``: SASRec trained on the dataset's training split, scored on the test users' candidate
lists that every model's stages score (and on the cold-start test set), popularity there too, and each test
positive's slice (head/torso/tail thirds of the items by training positives, or cold).
``cold(spec)``: the LLM recommenders on domain A's cold-start test set: zero-shot, fine-tuned, and the
compact model (the primary selection with its adapters).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd

from layerviz import arch, metrics
from layerviz.compact import load_compact
from layerviz.data import CandidateConfig, candidates_for
from layerviz.evaluate import positive_slices
from layerviz.sasrec import SASRecConfig, candidate_scores, train_sasrec
from layerviz.store import slug


def _columns(name: str, per_user: pd.DataFrame) -> dict:
    return {f"{name}:{k}": per_user[k].to_numpy() for k in per_user.columns}


def _metrics(scores, cands: pd.DataFrame) -> pd.DataFrame:
    return metrics.per_user(metrics.pessimistic_ranks(np.stack(scores), cands["pos_index"].to_numpy()))


class BaselineStages:
    """Stages that ``Study`` inherits (they use its cfg, stages, prep, model and evaluator)."""

    def sasrec_config(self) -> SASRecConfig:
        c = self.cfg
        return SASRecConfig(**{"seed": c.seed, "negatives": c.negatives, **c.sasrec})

    def cold_candidates(self, dataset: str) -> pd.DataFrame:
        c = self.cfg
        return candidates_for(self.prep(dataset), CandidateConfig(c.negatives, "uniform", c.eval_users, "test",
                                                                  c.seed, cold=True), c.candidates_dir)[0]

    def baselines(self, dataset: str) -> dict:
        """SASRec (and popularity on the cold set) per test user, the positives' slices, SASRec's training."""
        c, scfg = self.cfg, self.sasrec_config()
        cold = bool(c.cold_items) and dataset == c.domain_a

        def compute(folder):
            prep = self.prep(dataset)
            cands, _ = candidates_for(prep, CandidateConfig(c.negatives, "uniform", c.eval_users, "test", c.seed),
                                      c.candidates_dir)
            trained = train_sasrec(prep, scfg, str(c.candidates_dir), report=None)
            out = {"per_user": pd.DataFrame(_columns("sasrec", _metrics(candidate_scores(trained, prep, cands, "test"),
                                                                        cands))),
                   "users": pd.DataFrame({"user_id": cands["user_id"], "positive": cands["positive"],
                                          "slice": positive_slices(prep, cands)}),
                   "sasrec": trained.record, "sasrec_curve": trained.curve}
            if cold:
                cc = self.cold_candidates(dataset)
                out["cold_per_user"] = pd.DataFrame({
                    **_columns("sasrec", _metrics(candidate_scores(trained, prep, cc, "test"), cc)),
                    **_columns("popularity", self.popularity(dataset, cc))})
            if self.report:
                self.report(f"SASRec on {dataset}: {trained.record['epochs']} epochs ({trained.record['stopped']}), "
                            f"validation NDCG@10 {trained.record['valid_ndcg@10']:.3f}")
            return out

        key = [asdict(c.prep_config()), c.eval_users, c.negatives, c.seed, asdict(scfg), cold]
        return self.stages(f"{slug(dataset)}/baselines", key, compute)

    def cold(self, spec: str, layers: list[int], adapt_stage: str) -> dict:
        """Domain A's cold-start test set: the zero-shot model, the fine-tuned one, and ``layers`` with the
        adapters of ``adapt_stage`` (the study's compact recommender), every metric per user."""
        c, a = self.cfg, self.cfg.domain_a

        def compute(folder):
            cands = self.cold_candidates(a)
            ev, _ = self.evaluator(spec, a, "test", c.eval_users, zeroshot=True, cold=True)
            cols = _columns("zeroshot", ev.metrics(self.model(spec, zeroshot=True)[0])) if self.finetuning else {}
            ev, _ = self.evaluator(spec, a, "test", c.eval_users, cold=True)
            model = self.model(spec)[0]
            cols.update(_columns("full", ev.metrics(model)))
            with arch.keep_layers(model, layers):
                cols.update(_columns("compact:plain", ev.metrics(model)))
            compact = load_compact(self.stages.root / adapt_stage / "adapt" / "compact", base=model)
            cols.update(_columns("compact:adapters", ev.metrics(compact)))
            return {"per_user": pd.DataFrame(cols), "meta": {"users": cands["user_id"].tolist()}}

        return self.stages(f"{slug(spec)}/{slug(a)}/cold", self._key(spec, layers, adapt_stage, c.eval_users),
                           compute)
