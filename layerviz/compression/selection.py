"""RQ2: which layers to keep. The paper's saturating greedy search against the literature.

Every strategy has one interface::

    select(strategy, model, evaluator, k=..., budget=..., ...) -> Selection

A subset is evaluated by running the model with only those layers (``arch.keep_layers``:
no weight copies, cost ~ k/L of a full pass). ``SubsetScorer`` caches every subset's score,
so no subset is evaluated twice, and records one trace row per real evaluation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerviz import arch, metrics, passes
from layerviz.compression.config import ImportanceConfig, SelectConfig
from layerviz.compression.importance import choose_criterion, probe_batch, run_importance
from layerviz.data import load
from layerviz.data.prompts import build_probes
from layerviz.depth import thirds
from layerviz.evaluate import FidelityEvaluator, task_evaluator
from layerviz.models import load_model
from layerviz.settings import SHARED


class BudgetExhausted(RuntimeError):
    """The evaluation budget ran out; the search returns its best answer so far."""


@dataclass
class Selection:
    """Kept layers (ascending), their score, and the full evaluation trace."""

    strategy: str
    layers: list[int]
    score: float
    trace: pd.DataFrame
    n_layers: int
    meta: dict = field(default_factory=dict)

    def thirds(self) -> dict[str, int]:
        """How many kept layers fall in the lower, middle and upper third of the depth."""
        return thirds(self.layers, self.n_layers)

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "layers": self.layers, "score": self.score, "k": len(self.layers),
                "n_layers": self.n_layers, "thirds": self.thirds(), "evaluations": len(self.trace), **self.meta}


TRACE_COLUMNS = ["step", "k", "layers", "score", "seconds", "ci_low", "ci_high", "n"]


class SubsetScorer:
    """Scores layer subsets once each (cached), within an evaluation budget, with a trace."""

    def __init__(self, model, evaluator: Callable, budget: int | None = None):
        self.model, self.evaluator, self.budget = model, evaluator, budget
        self.n_layers = arch.num_layers(model)
        self.cache: dict[tuple[int, ...], float] = {}
        self.intervals: dict[tuple[int, ...], tuple[float, float, int]] = {}
        self.rows: list[dict] = []
        self.step = 0

    def __call__(self, layers) -> float:
        key = tuple(sorted(int(i) for i in layers))
        if key in self.cache:
            return self.cache[key]
        if self.budget is not None and len(self.rows) >= self.budget:
            raise BudgetExhausted(f"evaluation budget of {self.budget} used up")
        t0 = time.perf_counter()
        passes.count("subset")
        if len(key) == self.n_layers:
            value = self.evaluator(self.model)
        else:
            with arch.keep_layers(self.model, list(key)):
                value = self.evaluator(self.model)
        value = np.atleast_1d(np.asarray(value, dtype=np.float64))
        score, low, high = metrics.bootstrap_ci(value, seed=0)
        self.cache[key] = score
        self.intervals[key] = (low, high, len(value))
        self.rows.append({"step": self.step, "k": len(key), "layers": list(key), "score": score,
                          "seconds": time.perf_counter() - t0, "ci_low": low, "ci_high": high, "n": len(value)})
        return score

    def remember(self, trace: pd.DataFrame) -> None:
        """Take the scores (and intervals) of subsets another run scored on the same users: not rescored."""
        for _, t in trace.iterrows():
            key = tuple(int(i) for i in t["layers"])
            self.cache[key] = float(t["score"])
            if "ci_low" in t:
                self.intervals[key] = (float(t["ci_low"]), float(t["ci_high"]), int(t["n"]))

    def interval(self, layers) -> dict:
        """{ci_low, ci_high, n}: the 95% bootstrap interval over users of a scored subset (NaN if unknown)."""
        low, high, n = self.intervals.get(tuple(sorted(int(i) for i in layers)), (np.nan, np.nan, 0))
        return {"ci_low": low, "ci_high": high, "n": n}

    def trace(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=TRACE_COLUMNS)


def saturated(history: Sequence[float], window: int = 3, threshold: float = 0.01) -> bool:
    """True when each of the last ``window`` steps improved the score by less than ``threshold`` (relative)."""
    if len(history) < window + 1:
        return False
    recent = history[-(window + 1):]
    for prev, cur in zip(recent[:-1], recent[1:], strict=True):
        if (cur - prev) / max(abs(prev), 1e-12) >= threshold:
            return False
    return True


def _check_k(k: int | None, n: int, required: bool = True) -> None:
    if k is None:
        if required:
            raise ValueError("this strategy needs k, the number of layers to keep")
        return
    if not isinstance(k, int | np.integer) or not 0 < k <= n:
        raise ValueError(f"k={k} is invalid for a model with {n} layers: choose 1 <= k <= {n}")


def _check_budget(budget: int | None, need: int, strategy: str) -> None:
    if budget is not None and budget < need:
        raise ValueError(f"budget={budget} is too small for {strategy}: it needs at least {need} "
                         "evaluations to produce any selection; raise the budget")


def importance_greedy(scorer: SubsetScorer, order: Sequence[int], k: int | None = None, window: int = 3,
                      threshold: float = 0.01) -> tuple[list[int], dict]:
    """The paper's loop: add layers in importance order until saturation, k, or the budget."""
    layers: list[int] = []
    history: list[float] = []
    reason = "order exhausted"
    for step, cand in enumerate(order):
        scorer.step = step
        try:
            history.append(scorer(sorted(layers + [cand])))
        except BudgetExhausted:
            reason = "budget"
            break
        layers.append(cand)
        if k is not None and len(layers) >= k:
            reason = "k reached"
            break
        if saturated(history, window, threshold):
            reason = f"saturated ({window} steps < {threshold:.1%})"
            break
    return sorted(layers), {"stop": reason, "history": history}


def _best_move(scorer: SubsetScorer, moves) -> tuple[int | None, bool]:
    """Score each (candidate, subset) move -> (best candidate, whether the budget ran out)."""
    best, best_score = None, -np.inf
    try:
        for cand, subset in moves:
            s = scorer(subset)
            if s > best_score:
                best, best_score = cand, s
    except BudgetExhausted:
        return best, True
    return best, False


def forward_greedy(scorer: SubsetScorer, k: int) -> tuple[list[int], dict]:
    """Grow from nothing: at each step add the layer whose addition scores best."""
    kept: list[int] = []
    for step in range(k):
        scorer.step = step
        best, exhausted = _best_move(scorer, ((c, sorted(kept + [c])) for c in range(scorer.n_layers)
                                              if c not in kept))
        if best is not None:
            kept.append(best)
        if exhausted:
            return sorted(kept), {"stop": "budget"}
    return sorted(kept), {"stop": "k reached"}


def backward_greedy(scorer: SubsetScorer, k: int, protect_ends: bool = True) -> tuple[list[int], dict]:
    """SLEB-style: from all layers, repeatedly remove the layer whose removal hurts least."""
    kept = list(range(scorer.n_layers))
    protected = {0, scorer.n_layers - 1} if protect_ends else set()
    if k < len(protected):
        raise ValueError(f"k={k} is below the {len(protected)} protected layers; use protect_ends=False")
    step = 0
    while len(kept) > k:
        scorer.step = step
        best, exhausted = _best_move(scorer, ((c, [i for i in kept if i != c]) for c in kept
                                              if c not in protected))
        if best is not None:
            kept.remove(best)
        if exhausted:
            return kept, {"stop": "budget"}
        step += 1
    return kept, {"stop": "k reached"}


def angular_distances(model, probes, n: int) -> np.ndarray:
    """Gromov et al.: mean over samples of arccos(cos(h_l, h_{l+n}))/pi on the last token, for each start l."""
    L = arch.num_layers(model)
    dev = arch.input_device(model)
    total = np.zeros(L - n + 1)
    points = ["resid_pre.0", *(f"resid_post.{i}" for i in range(L))]  # index j: entering layer j (j = L: output)
    with arch.capture(model, points, detach=True) as states, torch.no_grad():
        for i in range(len(probes.examples)):
            exs, ids, mask, _ = probe_batch(probes, [i], 0, dev)
            passes.count("probe")
            arch.run_decoder(model, ids, mask)
            last = [states[p][0, -1].float() for p in points]
            for start in range(L - n + 1):
                cos = torch.nn.functional.cosine_similarity(last[start], last[start + n], dim=0).clamp(-1, 1)
                total[start] += float(torch.arccos(cos) / torch.pi)
    return total / len(probes.examples)


FIXED = ("top_k", "first_k", "last_k", "uniform")
"""Strategies that need no evaluation: the kept layers follow from n, k (and the importance order)."""


def fixed_layers(strategy: str, n: int, k: int, order: Sequence[int] | None = None) -> list[int]:
    """Kept layers (ascending) of a fixed-k strategy; ``top_k`` takes the first k of ``order``."""
    _check_k(k, n)
    if strategy == "top_k":
        if order is None:
            raise ValueError("top_k needs the importance order (see importance_order)")
        return sorted(int(i) for i in order[:k])
    if strategy == "first_k":
        return list(range(k))
    if strategy == "last_k":
        return list(range(n - k, n))
    if strategy == "uniform":
        return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})
    raise ValueError(f"{strategy!r} is not a fixed-k strategy; those are {', '.join(FIXED)}")


@dataclass
class StrategyInput:
    """What a strategy may use: the model and its layer count, k, the subset scorer (None without an evaluator)
    and every strategy's options. Each strategy is one function ``StrategyInput -> (layers, meta)`` in ``REGISTRY``."""

    model: object
    n: int
    k: int | None
    scorer: SubsetScorer | None
    budget: int | None = None
    importance: pd.DataFrame | None = None
    criterion: str = "fused"
    highest: bool = True
    window: int = 3
    threshold: float = 0.01
    protect_ends: bool = True
    probes: object = None
    seed: int = 0
    reference: Sequence[int] | None = None

    def scorer_for(self, strategy: str) -> SubsetScorer:
        _need_evaluator(self.scorer, strategy)
        return self.scorer

    def order(self) -> list[int]:
        return importance_order(self.importance, self.criterion, self.highest, self.n)


def by_importance_greedy(r: StrategyInput) -> tuple[list[int], dict]:
    order = r.order()
    layers, meta = importance_greedy(r.scorer_for("importance_greedy"), order, r.k, r.window, r.threshold)
    return layers, {"criterion": r.criterion, **meta, "window": r.window, "threshold": r.threshold}


def by_forward_greedy(r: StrategyInput) -> tuple[list[int], dict]:
    scorer = r.scorer_for("forward_greedy")
    _check_budget(r.budget, r.n, "forward_greedy")
    return forward_greedy(scorer, r.k)


def by_backward_greedy(r: StrategyInput) -> tuple[list[int], dict]:
    scorer = r.scorer_for("backward_greedy")
    _check_budget(r.budget, r.n - (2 if r.protect_ends else 0), "backward_greedy")
    return backward_greedy(scorer, r.k, r.protect_ends)


def by_contiguous_block(r: StrategyInput) -> tuple[list[int], dict]:
    """Gromov et al.: drop the block of n - k layers whose input and output are closest in angle."""
    if r.probes is None:
        raise ValueError("contiguous_block needs probe prompts to measure angular distances")
    drop = r.n - r.k
    if drop == 0:
        return list(range(r.n)), {}
    d = angular_distances(r.model, r.probes, drop)
    start = int(np.argmin(d))
    return ([i for i in range(r.n) if not start <= i < start + drop],
            {"removed_block": [start, start + drop - 1], "angular_distance": float(d[start])})


def by_top_k(r: StrategyInput) -> tuple[list[int], dict]:
    return fixed_layers("top_k", r.n, r.k, r.order()), {"criterion": r.criterion}


def by_rule(strategy: str) -> Callable[[StrategyInput], tuple[list[int], dict]]:
    """first_k, last_k, uniform: layers by position alone."""
    return lambda r: (fixed_layers(strategy, r.n, r.k), {})


def by_random(r: StrategyInput) -> tuple[list[int], dict]:
    return sorted(np.random.default_rng(r.seed).choice(r.n, size=r.k, replace=False).tolist()), {"seed": r.seed}


def by_reference(r: StrategyInput) -> tuple[list[int], dict]:
    if r.reference is None:
        raise ValueError("strategy 'reference' needs the reference layer list (see load_reference)")
    bad = [i for i in r.reference if not 0 <= i < r.n]
    if bad:
        raise ValueError(f"reference layers {bad} are out of range for this model's {r.n} layers "
                         f"(valid 0..{r.n - 1}); the reference was reported for another layer count")
    return sorted(int(i) for i in r.reference), {}


REGISTRY: dict[str, Callable[[StrategyInput], tuple[list[int], dict]]] = {
    "importance_greedy": by_importance_greedy, "forward_greedy": by_forward_greedy,
    "backward_greedy": by_backward_greedy, "contiguous_block": by_contiguous_block, "top_k": by_top_k,
    "first_k": by_rule("first_k"), "last_k": by_rule("last_k"), "uniform": by_rule("uniform"),
    "random": by_random, "reference": by_reference,
}
"""Every strategy by name: one function each, same signature. A new strategy is one function added here."""
STRATEGIES = list(REGISTRY)
NEEDS_K = [s for s in STRATEGIES if s not in ("importance_greedy", "reference")]
"""Strategies that need k (importance_greedy may stop at saturation; reference has its own list)."""


def select(strategy: str, model, evaluator: Callable | None = None, k: int | None = None,
           budget: int | None = None, **options) -> Selection:
    """Run one strategy of ``REGISTRY`` -> Selection (kept layers ascending, final score, trace).

    ``options`` are ``StrategyInput``'s fields: importance, criterion, highest, window, threshold, protect_ends,
    probes, seed, reference (each strategy reads those it needs)."""
    if strategy not in REGISTRY:
        raise ValueError(f"unknown strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
    n = arch.num_layers(model)
    _check_k(k, n, required=strategy in NEEDS_K)
    if budget is not None and budget < 1:
        raise ValueError(f"budget={budget} is too small to evaluate anything; give at least 1")
    scorer = SubsetScorer(model, evaluator, budget) if evaluator is not None else None
    layers, meta = REGISTRY[strategy](StrategyInput(model, n, k, scorer, budget, **options))
    score = float("nan")
    if scorer is not None:
        try:
            score = scorer(layers)
        except BudgetExhausted:
            score = scorer.cache.get(tuple(layers), float("nan"))
    trace = scorer.trace() if scorer is not None else pd.DataFrame(columns=TRACE_COLUMNS)
    return Selection(strategy, layers, score, trace, n, meta)


def random_baseline(model, evaluator: Callable, k: int, seeds: Sequence[int] = range(10)) -> pd.DataFrame:
    """The random baseline as a distribution: one row per seed (seed, layers, score)."""
    rows = []
    for seed in seeds:
        s = select("random", model, evaluator, k=k, seed=seed)
        rows.append({"seed": seed, "layers": s.layers, "score": s.score})
    return pd.DataFrame(rows)


def _need_evaluator(scorer, strategy: str) -> None:
    if scorer is None:
        raise ValueError(f"{strategy} searches by evaluating subsets: pass an evaluator")


def importance_order(table: pd.DataFrame | None, criterion: str, highest: bool, n: int) -> list[int]:
    """Layers sorted by a criterion of an importance table (most important first when highest)."""
    if table is None:
        raise ValueError("this strategy needs an importance table (layerviz.compression.importance.layer_importance / run_importance)")
    rows = table[table["criterion"] == criterion]
    if rows.empty:
        raise ValueError(f"unknown criterion {criterion!r}; the importance table has: "
                         f"{', '.join(sorted(table['criterion'].unique()))}")
    if len(rows) != n:
        raise ValueError(f"the importance table has {len(rows)} layers for {criterion!r}, the model {n}")
    rows = rows.sort_values(["normalized", "layer"], ascending=[not highest, True])
    return rows["layer"].astype(int).tolist()


def load_reference(path: str | Path | None = None) -> dict:
    """The paper's reported layer lists (data/reference_selections.json)."""
    path = Path(path) if path else Path(__file__).resolve().parents[2] / "data" / "reference_selections.json"
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- the study stage


def run_select(cfg: SelectConfig, model=None, tokenizer=None, report=print) -> tuple[Selection, dict]:
    """Run one strategy on real data -> (Selection, context with full-model score and chance)."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; available: {', '.join(STRATEGIES)}")
    prep = load(cfg.dataset, cfg.format, cfg.prep_config(), report=report)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    _check_k(cfg.k, arch.num_layers(model), required=cfg.strategy not in ("importance_greedy", "reference"))
    task, cands = task_evaluator(cfg, prep, model, tokenizer, cfg.users, "valid", cfg.calibration)
    calibration = task.cfg.calibration
    if cfg.evaluator == "task":
        evaluator = task
    elif cfg.evaluator in ("fidelity", "hidden_mse"):
        evaluator = FidelityEvaluator(model, prep, cands, tokenizer, "kl" if cfg.evaluator == "fidelity" else "hidden_mse",
                                      split="valid", max_title_tokens=cfg.max_title_tokens, calibration=calibration)
    else:
        raise ValueError(f"unknown evaluator {cfg.evaluator!r}; use 'task', 'fidelity' or 'hidden_mse'")
    table, criterion, auto = None, cfg.criterion, None
    if cfg.strategy in ("importance_greedy", "top_k"):
        icfg = ImportanceConfig(**{**{k: getattr(cfg, k) for k in SHARED}, **cfg.importance})  # every shared setting
        res = run_importance(icfg, model, tokenizer, report=report)
        table = res.table
        if criterion == "auto":
            auto = choose_criterion(res.validity)
            criterion = auto["criterion"]
    probes = build_probes(prep, tokenizer, 16, seed=cfg.seed) if cfg.strategy == "contiguous_block" else None
    reference = None
    if cfg.strategy == "reference":
        refs = load_reference()["selections"]
        if cfg.reference not in refs:
            raise ValueError(f"unknown reference {cfg.reference!r}; available: {', '.join(refs)}")
        reference = refs[cfg.reference]["layers"]
    s = select(cfg.strategy, model, evaluator, k=cfg.k, budget=cfg.budget, importance=table,
               criterion=criterion, highest=cfg.highest, window=cfg.window, threshold=cfg.threshold,
               protect_ends=cfg.protect_ends, probes=probes, seed=cfg.seed, reference=reference)
    context = {"evaluator": cfg.evaluator, "full_score": float(np.mean(evaluator(model))),
               "task_ndcg@10": float(np.mean(_with_layers(model, s.layers, task))),
               "full_task_ndcg@10": float(np.mean(task(model))),
               "chance_ndcg@10": metrics.chance(cfg.negatives + 1)["ndcg@10"], "calibration": calibration}
    if auto is not None:
        s.meta["criterion_auto"] = auto
        context["criterion_auto"] = auto
    return s, context


def _with_layers(model, layers: list[int], evaluator):
    with arch.keep_layers(model, layers):
        return evaluator(model)
