"""``layerviz run CONFIG --plan``: what a study will cost, stage by stage, before any weights are loaded.

Every stage of ``runner.run_model`` is walked in the same order with the same sizes: the users and
candidate lists the run will draw (built from the data, in memory), the calibration prompts, the
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

import math

import numpy as np
import pandas as pd

from layerviz.adapters import TrainConfig
from layerviz.bench import BenchConfig, configurations, layers_for_k, with_k
from layerviz.finetune import planned_steps
from layerviz.importance import ImportanceConfig
from layerviz.models import bundled_tokenizer
from layerviz.selection import FIXED, load_reference
from layerviz.store import slug
from layerviz.study.config import StudyConfig
from layerviz.study.depth import map_reference, without_lower_third
from layerviz.study.workload import Data, Shape, Users, over

CPU_TFLOPS = 0.138
"""The default throughput on CPU, measured on the 2-core CI machine by ``benchmarks/bench_throughput.py``
(fp32 forward of 1024-token prompts: SmolLM2 147, Gemma 129 GFLOP/s; README "Beyond one machine"). On a
GPU give the one you expect with ``--tflops``."""


class Planner:
    """Walks the stages of ``runner.run_model`` and records each one's passes, tokens and FLOPs."""

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.rows, self.planned = cfg, [], set()
        tok = bundled_tokenizer()
        self.data = {d: Data(cfg, d, tok) for d in dict.fromkeys([cfg.domain_a, cfg.domain_b])}
        self.imp = over(ImportanceConfig, cfg.importance)
        self.shapes: dict[str, Shape] = {}

    def shape(self, spec: str) -> Shape:
        if spec not in self.shapes:
            self.shapes[spec] = Shape(spec)
        return self.shapes[spec]

    def k(self, spec: str) -> int:
        return self.cfg.k_of(self.shape(spec).n)

    def first(self, spec: str, dataset: str | None, stage: str) -> tuple | None:
        """The (spec, dataset, stage name) to add rows to, or None if this stage is planned already."""
        name = f"{slug(spec)}/{slug(dataset)}/{stage}" if dataset else f"{slug(spec)}/{stage}"
        if name in self.planned:
            return None
        self.planned.add(name)
        return spec, dataset or self.cfg.domain_a, name

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
        """``n`` calibration prompts (or their backward passes: ``factor`` 2) through ``layers`` layers."""
        self.add(at, kind, n, factor * n * self.shape(at[0]).forward(tokens, target, layers), n * tokens, exact)

    def priors(self, zeroshot: bool) -> bool:
        """Whether scoring may compute pmi priors (the zero-shot model under 'auto' or 'pmi')."""
        c = self.cfg.calibration
        return c == "pmi" or (c == "auto" and (zeroshot or not self.cfg.finetune))

    # -- the stages, as in Study
    def finetune(self, spec: str) -> None:
        cfg = self.cfg
        f = cfg.finetune_config(spec)
        at = self.first(spec, cfg.domain_a, "finetune")
        data = self.data[cfg.domain_a]
        steps = planned_steps(f, data.windows(f.history_len, f.min_history))
        evals = 1 + sum(1 for s in range(1, steps + 1) if s % f.eval_every == 0 or s == steps)
        exact = f.max_seconds is None and f.patience is None  # a time cap or early stop can end it sooner
        u, sh = data.users("valid", f.eval_users, f.negatives), self.shape(spec)  # validation users: the windows'
        self.scoring(at, u, [sh.n] * evals, exact=exact)  # token counts are taken as theirs
        examples = steps * f.batch_size * f.grad_accum
        one = sh.forward(u.prefix_tokens, 0) + (1 + f.train_negatives) * sh.forward(u.title_tokens, u.title_tokens)
        tokens = examples * (u.prefix_tokens + (1 + f.train_negatives) * u.title_tokens)
        self.add(at, "train", steps, examples * one, tokens, exact)
        self.add(at, "backward", examples, 2 * examples * one, tokens, exact)

    def calibration(self, spec: str, dataset: str, zeroshot: bool = False) -> None:
        cfg = self.cfg
        if cfg.calibration != "auto" or (cfg.finetune and not zeroshot):
            return  # no stage: the config's choice, or 'none' for the fine-tuned model
        at = self.first(spec, dataset, "calibration-zeroshot" if zeroshot and cfg.finetune else "calibration")
        if at:  # raw scores, then every title's prior once
            u = self.data[dataset].users("valid", cfg.calibration_users, cfg.negatives)
            self.scoring(at, u, [self.shape(spec).n])
            tokens = u.empty_tokens + u.title_tokens
            self.add(at, "prior", u.titles, u.titles * self.shape(spec).forward(tokens, u.title_tokens),
                     u.titles * tokens, exact=False)

    def evaluator(self, spec: str, dataset: str, zeroshot: bool = False) -> None:
        """What building a stage's evaluator runs first: the calibration stage it needs."""
        self.calibration(spec, dataset, zeroshot)

    def zeroshot(self, spec: str, dataset: str) -> None:
        at = self.first(spec, dataset, "zeroshot")
        self.evaluator(spec, dataset, zeroshot=True)
        self.scoring(at, self.data[dataset].users("test", self.cfg.eval_users, self.cfg.negatives),
                     [self.shape(spec).n], self.priors(True))

    def importance(self, spec: str, dataset: str, ablation: bool = True, zeroshot: bool = False) -> None:
        imp, n_layers = self.imp, self.shape(spec).n
        ablation = ablation and imp.ablation
        if ablation and imp.ablation_users:
            self.calibration(spec, dataset, zeroshot)
        at = self.first(spec, dataset, "importance-zeroshot" if zeroshot and self.cfg.finetune else "importance")
        if not at:
            return
        n, tokens, target = self.data[dataset].calibration(imp.samples)
        calib = n * (2 if ablation else 1)  # the hook pass, and the ablation's unablated pass
        self.prompts(at, "calibration", calib, tokens, target)
        self.prompts(at, "backward", n, tokens, target, factor=2.0)  # the Fisher criteria
        if ablation:  # skipping layer i re-runs layers i+1..L-1 only: (L-1)/2 layers on average
            self.prompts(at, "ablation", n * n_layers, tokens, target, (n_layers - 1) / 2)
            if imp.ablation_users:
                u = self.data[dataset].users("valid", imp.ablation_users, imp.ablation_negatives)
                self.scoring(at, u, [n_layers] + [n_layers - 1] * n_layers, self.priors(zeroshot))

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

    def selection(self, spec: str, dataset: str, strategy: str) -> None:
        cfg, n, k = self.cfg, self.shape(spec).n, self.k(spec)
        at = self.first(spec, dataset, f"select-{strategy}")
        if not at:
            return
        self.evaluator(spec, dataset)
        sizes, exact = self.subsets(strategy, n, k)
        self.add(at, "subset", len(sizes), exact=exact)
        self.scoring(at, self.data[dataset].users("valid", cfg.select_users, cfg.negatives), sizes,
                     self.priors(False), exact)
        if strategy == "contiguous_block":  # angular distances over the importance samples
            m, tokens, target = self.data[dataset].calibration(self.imp.samples)
            self.prompts(at, "calibration", m, tokens, target)

    def variants(self, spec: str) -> list[int]:
        """Layer counts of the evaluation stage's variants."""
        cfg, n, k = self.cfg, self.shape(spec).n, self.k(spec)
        ref = load_reference()["selections"][cfg.reference]
        others = [s for s in dict.fromkeys(cfg.eval_strategies) if s != cfg.primary]
        return [n, k, len(without_lower_third(n)), len(map_reference(ref["layers"], ref["real_num_layers"], n)),
                *[k] * len(others)]

    def evaluation(self, spec: str) -> None:
        cfg = self.cfg
        at = self.first(spec, cfg.domain_a, "evaluation")
        self.evaluator(spec, cfg.domain_a)
        self.scoring(at, self.data[cfg.domain_a].users("test", cfg.eval_users, cfg.negatives), self.variants(spec),
                     self.priors(False))

    def adapters(self, spec: str, dataset: str, measured: int) -> None:
        """Adapters on the k layers; ``measured``: how many of (full, drop) another stage scored already."""
        cfg, n, k = self.cfg, self.shape(spec).n, self.k(spec)
        at = self.first(spec, dataset, "adapters")
        self.evaluator(spec, dataset)
        t = over(TrainConfig, cfg.adapters.get("train", {}))
        m, tokens, target = self.data[dataset].calibration(cfg.adapters.get("samples", 256))
        val = max(1, int(round(m * t.val_fraction)))
        train, e2 = m - val, t.stage2_epochs
        exact = e2 <= t.patience  # early stopping needs `patience` epochs without progress
        # teacher states (full model); validation at drop, stage 1, stage 2 and before and after each epoch
        self.prompts(at, "calibration", m, tokens, target)
        self.prompts(at, "calibration", val * (3 + (1 + e2 if e2 else 0)) + train * e2, tokens, target, k, exact)
        self.prompts(at, "backward", train * e2, tokens, target, k, exact, factor=2.0)
        self.add(at, "train", e2 * math.ceil(train / t.sample_batch), exact=exact)
        sizes = [n] * (measured < 1) + [k] * (measured < 2) + [k] * (2 if e2 else 1)
        self.scoring(at, self.data[dataset].users("test", cfg.eval_users, cfg.negatives), sizes, self.priors(False))

    def curves(self, spec: str, dataset: str) -> None:
        """The full model and every fixed strategy at k' = 1..k; the subsets the selections scored are reused."""
        cfg, n, k = self.cfg, self.shape(spec).n, self.k(spec)
        at = self.first(spec, dataset, "curves")
        fixed = [s for s in cfg.strategies if s in FIXED]
        sizes = [n] + [kk for _ in fixed for kk in range(1, k)]  # each one's k is in its own selection's trace
        self.add(at, "subset", len(sizes), exact=False)
        self.scoring(at, self.data[dataset].users("valid", cfg.select_users, cfg.negatives), sizes,
                     self.priors(False), exact=False)

    def tuned_on(self, spec: str, dataset: str) -> None:
        at = self.first(spec, dataset, "finetuned-full")
        self.scoring(at, self.data[dataset].users("test", self.cfg.eval_users, self.cfg.negatives),
                     [self.shape(spec).n])

    def transfer(self, spec: str) -> None:
        cfg, k = self.cfg, self.k(spec)
        at = self.first(spec, cfg.domain_b, "transfer")
        self.scoring(at, self.data[cfg.domain_b].users("test", cfg.eval_users, cfg.negatives), [k, k],
                     self.priors(False))

    def cold(self, spec: str) -> None:
        """Domain A's cold-start users: the zero-shot model (when fine-tuning), the full one, k plain and k with
        adapters (adapters counted as no layers, as in ``transfer``)."""
        cfg, n, k = self.cfg, self.shape(spec).n, self.k(spec)
        at = self.first(spec, cfg.domain_a, "cold")
        u = self.data[cfg.domain_a].users("test", cfg.eval_users, cfg.negatives, True)
        if cfg.finetune:
            self.scoring(at, u, [n], self.priors(True))
        self.scoring(at, u, [n, k, k], self.priors(False))

    def bench(self, spec: str) -> None:
        """Timed rounds of every configuration (prefills and one scored query each), then the throughput
        queries; on CPU the memory of each is measured in processes of their own (not counted)."""
        cfg, sh, k = self.cfg, self.shape(spec), self.k(spec)
        b = with_k(over(BenchConfig, cfg.bench), k)  # as Study.bench
        at = self.first(spec, None, "bench")
        configs = configurations(sh.n, b, layers_for_k(k, sh.n), sh.costs)
        sizes = [c["k"] for c in configs]
        rounds = b.warmup + b.runs + (0 if b.isolate and cfg.device == "cpu" else 1)  # + one memory pass each
        seqs = rounds * b.prefill_batch
        self.add(at, "prefill", seqs * len(sizes), sum(seqs * sh.forward(b.seq_len, b.seq_len, s) for s in sizes),
                 seqs * b.seq_len * len(sizes), exact=False)
        u = self.data[cfg.domain_a].users("test", 1, cfg.negatives)
        self.scoring(at, u, [s for s in sizes for _ in range(rounds + b.qps_queries)],
                     priors=True, exact=False)

    def model(self, spec: str, cross_domain: bool) -> None:
        """Every stage of one model, in the order of ``runner.run_model``."""
        cfg, a, b = self.cfg, self.cfg.domain_a, self.cfg.domain_b
        if cfg.finetune:
            self.finetune(spec)
            for d in [a, b] if cross_domain else [a]:
                self.zeroshot(spec, d)
            self.importance(spec, a, zeroshot=True)
        self.importance(spec, a)
        for s in cfg.strategies:
            self.selection(spec, a, s)
        self.evaluation(spec)
        self.adapters(spec, a, measured=2)
        self.curves(spec, a)
        if cfg.cold_items:
            self.cold(spec)
        if cross_domain:
            self.importance(spec, b, ablation=False)
            self.selection(spec, b, cfg.primary)
            if cfg.finetune:
                self.tuned_on(spec, b)
            self.adapters(spec, b, measured=1 if cfg.finetune else 0)
            self.transfer(spec)
        self.bench(spec)


def plan(config: StudyConfig | str, tflops: float | None = None) -> pd.DataFrame:
    """The cost of every stage of a study, without loading any weights -> one row per stage and pass kind.

    Columns: model, dataset, stage, kind (``passes.KINDS``), passes, exact
    (false: an upper bound), tokens, flops, seconds (at ``tflops`` TFLOP/s; default ``CPU_TFLOPS`` on CPU,
    NaN on a GPU, whose throughput must be given). The config is validated first, with the errors of
    ``layerviz run``.
    """
    cfg = config if isinstance(config, StudyConfig) else StudyConfig.from_yaml(config)
    if tflops is None:
        tflops = CPU_TFLOPS if cfg.device == "cpu" else float("nan")  # no default throughput on a GPU
    if not (tflops > 0 or np.isnan(tflops)):
        raise ValueError(f"tflops must be positive, got {tflops}")
    p = Planner(cfg)
    cd = cfg.cross_domain_models if cfg.cross_domain_models is not None else cfg.models[:1]
    for spec in cfg.models:
        p.model(spec, spec in cd)
    df = pd.DataFrame(p.rows, columns=["model", "dataset", "stage", "kind", "passes", "exact", "tokens", "flops"])
    df["seconds"] = df["flops"] / (tflops * 1e12)
    df.attrs["tflops"] = tflops
    return df
