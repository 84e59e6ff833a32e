"""``layerviz run CONFIG --plan``: what a study will cost, stage by stage, before any weights are loaded.

``runner.plan`` walks ``runner.run_model`` itself with a ``Planner``: each stage calls its own cost function
(next to its compute function) instead of running, with the same sizes: the users and
candidate lists the run will draw (built from the data, in memory), the probe prompts, the
fine-tuning schedule, the subset evaluations of each strategy. Models are only shapes (their configs
built on the meta device); tokens are counted with the bundled SmolLM2 tokenizer (other tokenizers cut
titles somewhat differently). A pass is one sequence through the model (``layerviz.passes``); FLOPs come
from ``bench.flops_per_token``; time is FLOPs at a stated throughput.

Counts are exact where the run's work follows from the config and the data, and upper bounds (column
``exact`` false) where the run stops early: the saturation stop of ``importance_greedy``, subsets the
curves reuse from the selections, early stopping of fine-tuning and adapters, ``pmi`` priors (computed
once per title and model, and only where ``pmi`` is chosen), and the bench (its k follows the selection).
"""

from __future__ import annotations

from layerviz.models import bundled_tokenizer
from layerviz.study.config import StudyConfig
from layerviz.study.workload import Data, Shape, Users

CPU_TFLOPS = 0.138
"""The default throughput on CPU, measured on the 2-core CI machine by ``benchmarks/bench_throughput.py``
(fp32 forward of 1024-token prompts: SmolLM2 147, Gemma 129 GFLOP/s; README "Beyond one machine"). On a
GPU give the one you expect with ``--tflops``."""


class Planner:
    """What the stages' cost functions record into: passes, tokens and FLOPs per stage and kind of pass."""

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.rows = cfg, []
        self.keys: dict[str, str] = {}  # stage name -> its cache key, as the run would derive it
        tok = bundled_tokenizer()
        self.data = {d: Data(cfg, d, tok) for d in dict.fromkeys([cfg.dataset, cfg.transfer_dataset])}
        self.shapes: dict[str, Shape] = {}
        self.shared_work: set = set()  # work that stages share through a cache of its own (the adapters' control)

    def shape(self, spec: str) -> Shape:
        if spec not in self.shapes:
            self.shapes[spec] = Shape(spec)
        return self.shapes[spec]

    def add(self, at: tuple, kind: str, passes: float, flops: float = 0.0, tokens: float = 0.0,
            exact: bool = True) -> None:
        if passes:
            self.rows.append({"model": at[0], "dataset": at[1], "stage": at[2], "kind": kind, "passes": int(passes),
                              "exact": exact, "tokens": float(tokens), "flops": float(flops)})

    def scoring(self, at: tuple, u: Users, layers: list[int], priors: bool = False, exact: bool = True) -> None:
        """One scoring of ``u`` per entry of ``layers`` (the number of layers it runs)."""
        sh = self.shape(at[0])
        self.add(at, "prefix", u.users * len(layers), sum(u.users * sh.forward(u.prefix_tokens, 0, n) for n in layers),
                 u.users * u.prefix_tokens * len(layers), exact)
        self.add(at, "candidate", u.candidates * len(layers),
                 sum(u.candidates * sh.forward(u.title_tokens, u.title_tokens, n) for n in layers),
                 u.candidates * u.title_tokens * len(layers), exact)
        if priors:  # once per title and layer subset, where pmi is chosen: a bound
            tokens = u.empty_tokens + u.title_tokens
            self.add(at, "prior", u.titles * len(layers),
                     sum(u.titles * sh.forward(tokens, u.title_tokens, n) for n in layers), u.titles * tokens * len(layers),
                     exact=False)

    def prompts(self, at: tuple, kind: str, n: int, tokens: float, target: float, layers: float | None = None,
                exact: bool = True, factor: float = 1.0) -> None:
        """``n`` probe prompts (or their backward passes: ``factor`` 2) through ``layers`` layers."""
        self.add(at, kind, n, factor * n * self.shape(at[0]).forward(tokens, target, layers), n * tokens, exact)

    def priors(self, zeroshot: bool) -> bool:
        """Whether scoring may compute pmi priors (the zero-shot model under 'auto' or 'pmi')."""
        c = self.cfg.calibration
        return c == "pmi" or (c == "auto" and (zeroshot or not self.cfg.finetune))

    @staticmethod
    def subsets(strategy: str, n: int, k: int) -> tuple[list[int], bool]:
        """The layer counts of the subsets a strategy evaluates (worst case), and whether that is exact."""
        if strategy == "importance_greedy":  # grows by one until k or saturation
            return list(range(1, k + 1)), False
        if strategy == "forward_greedy":  # step s tries every remaining layer: O(L k)
            return [s + 1 for s in range(k) for _ in range(n - s)], True
        if strategy == "backward_greedy":  # from L down to k, each unprotected layer tried: O(L^2)
            return [m - 1 for m in range(n, k, -1) for _ in range(m - 2)], True
        return [k], True
