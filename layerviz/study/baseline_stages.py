"""The study's model-free reference stage (a mixin of ``Study``): ``baselines(dataset)``, SASRec trained on the
dataset's training split, scored on the test users' candidate lists that every model's stages score (and on
the cold-start test set), popularity there too, and each test positive's slice (head/torso/tail thirds of the
items by training positives, or cold). It runs no LLM: the cost plan has no row for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from layerviz import metrics
from layerviz.data import CandidateConfig, candidates_for
from layerviz.evaluate import positive_slices
from layerviz.sasrec import SASRecConfig, candidate_scores, train_sasrec
from layerviz.settings import Settings
from layerviz.store import slug


def metric_columns(name: str, per_user: pd.DataFrame) -> dict:
    """Per-user metrics as the columns ``name:metric`` of a stage's per_user frame."""
    return {f"{name}:{k}": per_user[k].to_numpy() for k in per_user.columns}


def _metrics(scores, cands: pd.DataFrame) -> pd.DataFrame:
    return metrics.per_user(metrics.pessimistic_ranks(np.stack(scores), cands["pos_index"].to_numpy()))


@dataclass
class BaselinesStage(Settings):
    """What decides the baselines: the shared settings of the dataset, the test users, SASRec's settings and
    whether the cold-start test set is scored too."""

    users: int = 0
    sasrec: dict = field(default_factory=dict)
    cold: bool = False


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
        cold = bool(c.cold_items) and dataset == c.dataset

        def compute(folder):
            prep = self.prep(dataset)
            cands, _ = candidates_for(prep, CandidateConfig(c.negatives, "uniform", c.eval_users, "test", c.seed),
                                      c.candidates_dir)
            trained = train_sasrec(prep, scfg, str(c.candidates_dir), report=None)
            out = {"per_user": pd.DataFrame(metric_columns("sasrec", _metrics(candidate_scores(trained, prep, cands, "test"),
                                                                        cands))),
                   "users": pd.DataFrame({"user_id": cands["user_id"], "positive": cands["positive"],
                                          "slice": positive_slices(prep, cands)}),
                   "sasrec": trained.record, "sasrec_curve": trained.curve}
            if cold:
                cc = self.cold_candidates(dataset)
                out["cold_per_user"] = pd.DataFrame({
                    **metric_columns("sasrec", _metrics(candidate_scores(trained, prep, cc, "test"), cc)),
                    **metric_columns("popularity", self.popularity(dataset, cc))})
            if self.report:
                self.report(f"SASRec on {dataset}: {trained.record['epochs']} epochs ({trained.record['stopped']}), "
                            f"validation NDCG@10 {trained.record['valid_ndcg@10']:.3f}")
            return out

        config = BaselinesStage(**self.shared("sasrec", dataset), users=c.eval_users, sasrec=asdict(scfg), cold=cold)
        return self.stage(f"{slug(dataset)}/baselines", config, compute, dataset, cost=None)
