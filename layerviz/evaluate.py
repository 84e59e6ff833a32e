"""One trusted answer to "how well does this model recommend?": same data, same candidates, same metrics."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerviz import arch, metrics, parallel
from layerviz.data import CandidateConfig, Prepared, candidates_for, load
from layerviz.data.prepare import SLICES
from layerviz.data.prompts import Prompt
from layerviz.models import load_model
from layerviz.sasrec import SASRecConfig, candidate_scores, train_sasrec
from layerviz.scoring import (
    Request,
    ScoringConfig,
    embed_items,
    embed_users,
    score,
    title_priors,
)
from layerviz.settings import CALIBRATIONS, EvalConfig, Settings
from layerviz.store import manifest, write_json, write_parquet


def requests_for(prep: Prepared, cands: pd.DataFrame, split: str) -> list[Request]:
    """Scoring requests (history titles, candidate titles) for each candidate row."""
    titles, hist = prep.titles(), prep.histories(split)
    return [Request([titles[i] for i in hist[u]], [titles[i] for i in c])
            for u, c in zip(cands["user_id"], cands["candidates"], strict=True)]


def measure_calibrations(model, tokenizer, prep: Prepared, cfg: EvalConfig) -> dict:
    """Pick 'none' or 'pmi' by NDCG@10 on validation users -> {choice, valid_ndcg@10: {none, pmi}, users}.

    Never decided on one dataset for all: on real MovieLens-100K 'pmi' loses 0.10 NDCG@10, on the
    synthetic titles it wins. Both calibrations come from one pass (pmi = raw - title prior);
    a tie keeps 'none'.
    """
    cands, _ = candidates_for(prep, CandidateConfig(cfg.negatives, cfg.sampler, cfg.calibration_users, "valid",
                                                    cfg.seed), cfg.candidates_dir)
    requests = requests_for(prep, cands, "valid")
    scfg = ScoringConfig("likelihood", prep.domain, cfg.max_title_tokens, cfg.batch_size, "none")
    raw = np.stack(score(model, tokenizer, requests, scfg, desc="calibration (valid)"))
    with torch.no_grad():
        prior = np.stack([title_priors(model, tokenizer, r.candidates, scfg, 64) for r in requests])
    pos = cands["pos_index"].to_numpy()
    ndcg = {name: float(metrics.per_user(metrics.pessimistic_ranks(s, pos))["ndcg@10"].mean())
            for name, s in (("none", raw), ("pmi", raw - prior))}
    return {"choice": "pmi" if ndcg["pmi"] > ndcg["none"] else "none", "valid_ndcg@10": ndcg,
            "users": len(requests)}


def calibration_to_use(model, tokenizer, prep: Prepared, cfg: EvalConfig, report=print) -> tuple[str, dict | None]:
    """The calibration to score with, and the auto choice's record (None unless calibration='auto')."""
    if cfg.calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {cfg.calibration!r}; use one of {', '.join(CALIBRATIONS)}")
    if cfg.scorer != "likelihood" or cfg.calibration != "auto":
        return ("none" if cfg.calibration == "auto" else cfg.calibration), None
    record = measure_calibrations(model, tokenizer, prep, cfg)
    if report:
        v = record["valid_ndcg@10"]
        report(f"calibration auto: {record['choice']} (validation NDCG@10 none {v['none']:.4f}, pmi {v['pmi']:.4f}, "
               f"{record['users']} users)")
    return record["choice"], record


def calibration_config(calibration: str = "auto", users: int = 40, negatives: int = 19, seed: int = 0,
                       max_title_tokens: int = 32, results_dir: str | Path = "results",
                       scorer: str = "likelihood") -> EvalConfig:
    """The EvalConfig that ``calibration_to_use`` needs, for callers without one (the study, task_evaluator)."""
    return EvalConfig(scorer=scorer, calibration=calibration, calibration_users=users, negatives=negatives, seed=seed,
                      max_title_tokens=max_title_tokens, results_dir=str(results_dir))


def task_evaluator(cfg: Settings, prep: Prepared, model, tokenizer, users: int, split: str, calibration: str,
                   negatives: int | None = None, scorer: str = "likelihood") -> tuple[TaskEvaluator, pd.DataFrame]:
    """Seeded candidate lists (1 + negatives, default ``cfg.negatives``) for ``users`` users of ``split`` and a
    TaskEvaluator on them, with ``calibration`` resolved ('auto': chosen on validation users) -> (evaluator,
    candidates). The calibration it scores with is ``evaluator.cfg.calibration``."""
    n = cfg.negatives if negatives is None else negatives
    cands, _ = candidates_for(prep, CandidateConfig(n, "uniform", users, split, cfg.seed), cfg.candidates_dir)
    choice, _ = calibration_to_use(model, tokenizer, prep, calibration_config(
        calibration, negatives=n, seed=cfg.seed, max_title_tokens=cfg.max_title_tokens, results_dir=cfg.results_dir,
        scorer=scorer), report=None)
    return TaskEvaluator(prep, cands, tokenizer, scorer=scorer, split=split, max_title_tokens=cfg.max_title_tokens,
                         calibration=choice), cands


class TaskEvaluator:
    """NDCG@10 per user on fixed candidate lists: ``evaluator(model) -> (n_users,)`` array.

    The same requests are scored for every model it is called with (full, ablated, compact),
    so differences are paired by user.
    """

    def __init__(self, prep: Prepared, cands: pd.DataFrame, tokenizer, scorer: str = "likelihood",
                 split: str = "valid", max_title_tokens: int = 32, batch_size: int | None = None,
                 calibration: str = "pmi"):
        self.tokenizer = tokenizer
        self.requests = requests_for(prep, cands, split)
        parallel.check_enough(len(self.requests), "users")  # under torchrun each process scores a share
        self.pos = cands["pos_index"].to_numpy()
        self.cfg = ScoringConfig(scorer, prep.domain, max_title_tokens, batch_size, calibration)
        self.calls = 0

    def __call__(self, model) -> np.ndarray:
        return self.metrics(model)["ndcg@10"].to_numpy()

    def scores(self, model) -> np.ndarray:
        """Every user's candidate scores (users, candidates), in candidate order."""
        self.calls += 1
        part = parallel.shard(len(self.requests))  # all of them in one process
        return np.stack(parallel.gather(score(model, self.tokenizer, self.requests[part.start:part.stop], self.cfg,
                                              desc="task eval")))

    def metrics(self, model, scores: np.ndarray | None = None) -> pd.DataFrame:
        """Every ranking metric per user (rows in candidate order), of ``model`` or of its given ``scores``."""
        return metrics.per_user(metrics.pessimistic_ranks(self.scores(model) if scores is None else scores, self.pos))


class FidelityEvaluator:
    """Label-free: how closely a (compact) model reproduces the full model.

    ``kind='kl'``: minus the KL divergence between the full and the compact model's softmax
    over each user's candidate scores (per user). ``kind='hidden_mse'``: minus the MSE of the
    final hidden state *before* the final norm (captured by a hook) on each user's prompt.
    Higher is better in both; the full model scores 0.
    """

    def __init__(self, reference_model, prep: Prepared, cands: pd.DataFrame, tokenizer, kind: str = "kl",
                 scorer: str = "likelihood", split: str = "valid", max_title_tokens: int = 32,
                 calibration: str = "pmi"):
        if kind not in ("kl", "hidden_mse"):
            raise ValueError(f"unknown fidelity kind {kind!r}; use 'kl' or 'hidden_mse'")
        self.kind, self.tokenizer = kind, tokenizer
        self.requests = requests_for(prep, cands, split)
        self.cfg = ScoringConfig(scorer, prep.domain, max_title_tokens, None, calibration)
        self.reference = self._outputs(reference_model)

    def _outputs(self, model):
        if self.kind == "kl":
            scores = score(model, self.tokenizer, self.requests, self.cfg, desc="fidelity")
            return torch.log_softmax(torch.tensor(np.stack(scores)), dim=-1)
        text = Prompt(self.tokenizer, self.cfg)
        out = []
        with arch.capture(model, ["resid_final"], detach=True) as caught, torch.no_grad():
            for r in self.requests:
                ids = torch.tensor([text.likelihood_prefix(r.history)], device=arch.input_device(model))
                arch.run_decoder(model, ids)
                out.append(caught["resid_final"][0].float().cpu())
        return out

    def __call__(self, model) -> np.ndarray:
        out = self._outputs(model)
        if self.kind == "kl":
            p = self.reference.exp()
            return -(p * (self.reference - out)).sum(-1).numpy()
        return -np.array([float(((a - b) ** 2).mean()) for a, b in zip(self.reference, out, strict=True)])


def ranks_frame(cands: pd.DataFrame, scores: list[np.ndarray]) -> pd.DataFrame:
    """One row per user: user_id, positive, pessimistic rank, n_candidates, candidates, scores."""
    mat = np.stack(scores)
    ranks = metrics.pessimistic_ranks(mat, cands["pos_index"].to_numpy())
    return pd.DataFrame({
        "user_id": cands["user_id"].to_numpy(), "positive": cands["positive"].to_numpy(),
        "rank": ranks, "n_candidates": mat.shape[1], "candidates": cands["candidates"].to_numpy(),
        "scores": list(mat),
    })


BASELINES = ("popularity", "sasrec")


def baseline_scores(name: str, prep: Prepared, cands: pd.DataFrame, split: str, seed: int, negatives: int,
                    candidates_dir, report=print) -> list[np.ndarray]:
    """Scores of a baseline ('popularity', or 'sasrec' trained now on the training split) on ``cands``."""
    if name == "popularity":
        return popularity_scores(prep, cands)
    if name == "sasrec":
        trained = train_sasrec(prep, SASRecConfig(seed=seed, negatives=negatives), str(candidates_dir), report)
        return candidate_scores(trained, prep, cands, split)
    raise ValueError(f"unknown baseline {name!r}; use any of {', '.join(BASELINES)}")


def positive_slices(prep: Prepared, cands: pd.DataFrame) -> np.ndarray:
    """Each candidate row's test positive: 'head', 'torso', 'tail' (thirds of the items by training positives)
    or 'cold' (held out of training)."""
    where = prep.item_slices().reindex(cands["positive"]).to_numpy()
    return np.where(cands["positive"].isin(prep.cold).to_numpy(), "cold", where)


def slice_table(prep: Prepared, cands: pd.DataFrame, per_user: dict[str, pd.DataFrame], seed: int,
                metric: str = "ndcg@10") -> pd.DataFrame:
    """``metric`` per system and slice of the test positive (head/torso/tail thirds of the items by training
    positives; 'cold' for held-out items; 'all'): mean, 95% bootstrap CI, users."""
    where = positive_slices(prep, cands)
    rows = []
    for system, pu in per_user.items():
        for name in [*SLICES, "cold", "all"]:
            keep = np.ones(len(pu), bool) if name == "all" else where == name
            if keep.any():
                mean, lo, hi = metrics.bootstrap_ci(pu[metric].to_numpy()[keep], seed=seed)
                rows.append({"system": system, "slice": name, metric: mean, "ci_low": lo, "ci_high": hi,
                             "users": int(keep.sum())})
    return pd.DataFrame(rows)


def popularity_scores(prep: Prepared, cands: pd.DataFrame) -> list[np.ndarray]:
    """Baseline: each candidate's number of training positives."""
    pop = dict(zip(prep.items["item_id"], prep.items["popularity"], strict=True))
    return [np.array([pop[i] for i in c], dtype=np.float64) for c in cands["candidates"]]


def full_ranking_ranks(model, tokenizer, prep: Prepared, cands: pd.DataFrame, cfg: ScoringConfig,
                       split: str = "test") -> np.ndarray:
    """Embedding scorer over ALL items: the positive's pessimistic rank among items the user never saw."""
    titles = prep.titles()
    item_ids = prep.items["item_id"].tolist()
    items = embed_items(model, tokenizer, [titles[i] for i in item_ids], cfg)
    hist, seen = prep.histories(split), prep.seen_by_user()
    users = embed_users(model, tokenizer, [[titles[i] for i in hist[u]] for u in cands["user_id"]], cfg)
    index = {it: k for k, it in enumerate(item_ids)}
    ranks = []
    for row, u in enumerate(cands["user_id"]):
        s = (items @ users[row]).numpy().astype(np.float64)
        pos = index[cands["positive"].iloc[row]]
        mask = [index[i] for i in seen.get(u, ()) if i in index and index[i] != pos]
        s[mask] = -np.inf
        ranks.append(int((s >= s[pos]).sum()))
    return np.array(ranks)


def summary_dict(per_user: pd.DataFrame, seed: int) -> dict:
    """{metric: {mean, ci_low, ci_high}} with 95% bootstrap CIs."""
    s = metrics.summarize(per_user, seed=seed)
    return {r.metric: {"mean": r.mean, "ci_low": r.ci_low, "ci_high": r.ci_high} for r in s.itertuples()}


def metrics_table(results: dict[str, dict], names=("ndcg@5", "ndcg@10", "mrr", "hr@10", "precision@10")) -> pd.DataFrame:
    """Rows = systems, columns = 'mean [low, high]' strings for printing."""
    rows = {}
    for system, res in results.items():
        rows[system] = {m: (f"{res[m]['mean']:.4f} [{res[m]['ci_low']:.3f}, {res[m]['ci_high']:.3f}]"
                            if res[m].get("ci_low") is not None else f"{res[m]['mean']:.4f}") for m in names}
    return pd.DataFrame(rows).T


def run_evaluate(cfg: EvalConfig, out: str | Path | None = None, model=None, tokenizer=None, report=print) -> dict:
    """Evaluate one model on one dataset; writes metrics.json, ranks.parquet, manifest.json to ``out``."""
    if cfg.full_ranking and cfg.scorer != "embedding":
        raise ValueError("full_ranking needs scorer='embedding' (the others score candidate lists only)")
    if bad := [b for b in cfg.baselines if b not in BASELINES]:
        raise ValueError(f"unknown baseline(s) {', '.join(bad)}; use any of {', '.join(BASELINES)}")
    t0 = time.perf_counter()
    prep = load(cfg.dataset, cfg.format, cfg.prep_config(), report=report)
    cands, cand_path = candidates_for(prep, cfg.candidate_config(), cfg.candidates_dir)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    calibration, cal_record = calibration_to_use(model, tokenizer, prep, cfg, report)
    scfg = cfg.scoring_config(prep.domain)
    scfg.calibration = calibration
    t_score = time.perf_counter()
    scores = score(model, tokenizer, requests_for(prep, cands, cfg.split), scfg, desc=f"{cfg.scorer} {cfg.model}")
    score_seconds = time.perf_counter() - t_score
    ranks = ranks_frame(cands, scores)
    n_cand = int(ranks["n_candidates"].iloc[0])
    per_user = {cfg.model: metrics.per_user(ranks["rank"])}
    for name in cfg.baselines:
        scored = baseline_scores(name, prep, cands, cfg.split, cfg.seed, cfg.negatives, cfg.candidates_dir, report)
        per_user[name] = metrics.per_user(ranks_frame(cands, scored)["rank"])
    result = summary_dict(per_user[cfg.model], cfg.seed)
    baselines = {name: summary_dict(per_user[name], cfg.seed) for name in cfg.baselines}
    baselines["chance"] = {m: {"mean": v, "ci_low": None, "ci_high": None} for m, v in metrics.chance(n_cand).items()}
    paired = {f"vs_{name}_ndcg@10": metrics.paired_comparison(per_user[cfg.model]["ndcg@10"],
                                                               per_user[name]["ndcg@10"], seed=cfg.seed)
              for name in cfg.baselines}
    slices = slice_table(prep, cands, per_user, cfg.seed)
    doc = {**result, "n_users": len(ranks), "n_candidates": n_cand, "baselines": baselines, **paired,
           "score_seconds": score_seconds, "calibration": calibration, "calibration_auto": cal_record,
           "cold": cfg.cold, "slices": slices.to_dict(orient="records")}
    if cfg.full_ranking:
        with torch.no_grad():
            fr = full_ranking_ranks(model, tokenizer, prep, cands, scfg, cfg.split)
        doc["full_ranking"] = summary_dict(metrics.per_user(fr), cfg.seed)
    if out is not None:
        out = Path(out)
        write_parquet(out / "ranks.parquet", ranks)
        write_json(out / "metrics.json", doc)
        write_json(out / "manifest.json", manifest(
            cfg, cfg.seed, data_fingerprint=prep.fingerprint, candidates=str(cand_path),
            dataset_stats=prep.stats.to_dict(orient="records"), wall_seconds=time.perf_counter() - t0))
    if report:
        table = metrics_table({cfg.model: result, **baselines})
        report(f"\n{cfg.scorer} scorer ({calibration}), {len(ranks)} users x {n_cand} candidates ({cfg.split}), "
               f"95% bootstrap CIs; scored in {score_seconds:.1f}s")
        report(table.to_string())
        report("\nNDCG@10 by the test positive's training popularity (thirds of the items; cold: held out):")
        report(slices.pivot(index="system", columns="slice", values="ndcg@10").reindex(
            columns=[c for c in [*SLICES, "cold", "all"] if c in set(slices["slice"])]).round(4).to_string())
        if cfg.full_ranking:
            report("full ranking over all items: " + ", ".join(
                f"{m}={v['mean']:.4f}" for m, v in doc["full_ranking"].items() if m in ("ndcg@10", "hr@10", "mrr")))
        if out is not None:
            report(f"wrote {out}/metrics.json, ranks.parquet, manifest.json")
    return doc
