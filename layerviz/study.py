"""The study runner: ``layerviz run CONFIG`` executes every stage for every model and dataset.

Stages, per model on domain A: importance, selection (each strategy), adapters on the primary
selection, test evaluation of the full model, popularity and the plain-dropping variants, RQ2
curves, bench. Per cross-domain model, on domain B: importance, B's own selection and adapters,
and A's selection and adapters evaluated on B. Then the tables: headline, thirds, variants,
cross-model, cross-domain, hypotheses. Each stage writes its files atomically and a ``done.json`` (with the stage's key)
last, so a rerun skips finished stages and a run killed mid-stage leaves no corrupt cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from layerviz import arch, metrics, store

REGIONS = ("lower", "middle", "upper")
# settings the study decides for every stage (a section of the config may not override them)
STUDY_OWNED = {"model", "dataset", "format", "history_len", "max_title_tokens", "seed", "device", "dtype",
               "candidates_dir", "results_dir", "calibration"}
# "fine-tuning moves which layers matter": supported when the zero-shot/fine-tuned profiles' Spearman CI lies
# below this (at most moderate agreement), contradicted when it lies above it
MOVED_RHO = 0.5


@dataclass
class StudyConfig:
    """A whole study (configs/*.yaml). Unknown keys and bad values are refused before any work."""

    name: str = "demo"
    """Folder name under results_dir."""
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])
    """Model presets, hub ids or local paths."""
    domain_a: str = "demo-electronics"
    """Domain A dataset: selection, adapters and the headline are measured here."""
    domain_b: str = "demo-movies"
    """Domain B dataset: the cross-domain transfer target."""
    cross_domain_models: list[str] | None = None
    """Models that run the cross-domain study (default: the first model)."""
    strategies: list[str] = field(default_factory=lambda: ["importance_greedy", "top_k", "first_k", "last_k",
                                                             "uniform"])
    """Selection strategies compared (RQ2)."""
    primary: str = "importance_greedy"
    """The strategy whose selection gets adapters, bench and transfer."""
    k_fraction: float = 0.25
    """k = round(L * k_fraction) (the plan's 8 of 32)."""
    reference: str = "llama3-8b"
    """Key in data/reference_selections.json, mapped onto each model's depth for the hypothesis check."""
    history_len: int = 10
    max_title_tokens: int = 32
    """Each title is cut to this many tokens (prompt length, and the LM-head work per candidate)."""
    select_users: int = 16
    """Validation users scored per subset during selection (1 + 19 candidates)."""
    eval_users: int = 40
    """Test users for every reported NDCG (1 + 19 candidates)."""
    negatives: int = 19
    eval_strategies: list[str] = field(default_factory=lambda: ["last_k"])
    """Strategies (besides the primary) whose selections are also evaluated on the test users, without adapters."""
    finetune: dict = field(default_factory=dict)
    """Fine-tune each model on domain A first (overrides of FinetuneConfig: objective, max_steps, max_seconds,
    full, lora_r, lr, batch_size, ...); every later stage then analyses the fine-tuned recommender, and the
    zero-shot model is still evaluated and profiled alongside. {}: the zero-shot model only. A ``models``
    entry overrides settings per model, e.g. ``models: {gemma3-270m: {lr: 1.0e-3}}``."""
    calibration: str = "auto"
    """Likelihood calibration: 'auto' (none or pmi, chosen per model and dataset on validation users), 'none', 'pmi'."""
    calibration_users: int = 40
    """Validation users on which calibration 'auto' chooses (1 + negatives candidates each)."""
    criterion: str = "auto"
    """Criterion ordering importance_greedy/top_k: 'auto' (the highest validity against the loss ablation,
    chosen per model) or a criterion name (fused, block_influence, fisher_sum, ...)."""
    importance: dict = field(default_factory=dict)
    """Overrides of ImportanceConfig (samples, ablation, ablation_users, ...)."""
    adapters: dict = field(default_factory=dict)
    """Overrides of AdaptConfig: samples, policy {...}, train {...}."""
    bench: dict = field(default_factory=dict)
    """Overrides of BenchConfig (keep, runs, ...)."""
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None
    results_dir: str = "results"

    @property
    def folder(self) -> Path:
        return Path(self.results_dir) / self.name

    def finetune_for(self, spec: str) -> dict:
        """The fine-tuning settings of one model: the shared ones with its ``models`` overrides on top."""
        shared = {k: v for k, v in self.finetune.items() if k != "models"}
        return {**shared, **self.finetune.get("models", {}).get(spec, {})}

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyConfig:
        """Read and validate a YAML config; raise naming the key and the reason."""
        import yaml

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config file {path}; see configs/demo.yaml for an example")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping of keys to values")
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> StudyConfig:
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        cfg = cls(**raw)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        """Check every value that would otherwise fail hours into a run."""
        from layerviz.adapters import AdapterPolicy, TrainConfig
        from layerviz.bench import BenchConfig
        from layerviz.compact import AdaptConfig
        from layerviz.data.bundled import BUNDLED
        from layerviz.importance import ImportanceConfig
        from layerviz.models import PRESETS
        from layerviz.selection import STRATEGIES, load_reference

        def bad(key, why):
            raise ValueError(f"{where}: {key}: {why}")

        if not isinstance(self.models, list) or not self.models:
            bad("models", "give a non-empty list of model presets, hub ids or paths")
        for m in self.models:
            if not isinstance(m, str) or not (m in PRESETS or Path(m).exists() or m.count("/") == 1):
                bad("models", f"{m!r} is not a preset ({', '.join(PRESETS)}), an existing path or a hub id")
        for key in ("domain_a", "domain_b"):
            v = getattr(self, key)
            if not isinstance(v, str) or not (v in BUNDLED or Path(v).exists()):
                bad(key, f"{v!r} is neither a bundled dataset ({', '.join(BUNDLED)}) nor an existing path")
        for m in self.cross_domain_models or []:
            if m not in self.models:
                bad("cross_domain_models", f"{m!r} is not one of models")
        if not self.strategies or any(s not in STRATEGIES for s in self.strategies):
            bad("strategies", f"{self.strategies!r}: each must be one of {', '.join(STRATEGIES)}")
        if self.primary not in self.strategies:
            bad("primary", f"{self.primary!r} must be one of strategies")
        if self.primary in ("random",):
            bad("primary", "pick a deterministic strategy")
        if any(s not in self.strategies for s in self.eval_strategies):
            bad("eval_strategies", f"{self.eval_strategies!r}: each must be one of strategies")
        if not (isinstance(self.k_fraction, int | float) and 0 < self.k_fraction <= 1):
            bad("k_fraction", f"{self.k_fraction!r} must be in (0, 1]")
        if self.reference not in load_reference()["selections"]:
            bad("reference", f"{self.reference!r} is not in data/reference_selections.json")
        from layerviz.evaluate import CALIBRATIONS
        from layerviz.finetune import FinetuneConfig
        from layerviz.importance import DIRECTION, check_fusion_weights

        if self.calibration not in CALIBRATIONS:
            bad("calibration", f"{self.calibration!r} must be one of {', '.join(CALIBRATIONS)}")
        if self.criterion != "auto" and self.criterion not in DIRECTION:
            bad("criterion", f"{self.criterion!r} must be 'auto' or one of {', '.join(DIRECTION)}")
        if isinstance(self.importance, dict):
            try:
                check_fusion_weights(self.importance.get("fusion_weights"), self.importance.get("ablation", True))
            except ValueError as e:
                bad("importance.fusion_weights", str(e))
        if self.criterion == "auto" and self.importance.get("ablation") is False and any(
                s in ("importance_greedy", "top_k") for s in self.strategies):
            bad("criterion", "'auto' picks by validity against the ablation: keep importance.ablation on, "
                             "or name a criterion")
        ft_names = {f.name for f in fields(FinetuneConfig)} - STUDY_OWNED
        if not isinstance(self.finetune, dict):
            bad("finetune", "must be a mapping (e.g. {objective: rank, max_steps: 60})")
        per_model = self.finetune.get("models", {})
        if not isinstance(per_model, dict):
            bad("finetune.models", "must map a model of `models` to its overrides, e.g. {gemma3-270m: {lr: 1.0e-3}}")
        for k in self.finetune:
            if k not in ft_names | {"models"}:
                bad(f"finetune.{k}", f"unknown setting; known: {', '.join(sorted(ft_names | {'models'}))}")
        for spec, over in per_model.items():
            if spec not in self.models:
                bad(f"finetune.models.{spec}", f"not one of models ({', '.join(self.models)})")
            if not isinstance(over, dict):
                bad(f"finetune.models.{spec}", "must be a mapping of settings")
            for k in over:
                if k not in ft_names:
                    bad(f"finetune.models.{spec}.{k}", f"unknown setting; known: {', '.join(sorted(ft_names))}")
        for spec in self.models if self.finetune else []:
            try:
                FinetuneConfig(**self.finetune_for(spec)).validate()
            except (TypeError, ValueError) as e:
                bad("finetune", f"{spec}: {e}")
        for key in ("history_len", "max_title_tokens", "select_users", "eval_users", "negatives", "calibration_users"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, f"{v!r} must be a positive integer")
        for key, cls, allowed in (("importance", ImportanceConfig, None), ("bench", BenchConfig, None),
                                  ("adapters", AdaptConfig, {"samples", "policy", "train"})):
            section = getattr(self, key)
            if not isinstance(section, dict):
                bad(key, "must be a mapping")
            names = allowed or {f.name for f in fields(cls)} - STUDY_OWNED
            for k in section:
                if k not in names:
                    bad(f"{key}.{k}", f"unknown setting; known: {', '.join(sorted(names))}")
        try:
            AdapterPolicy(**self.adapters.get("policy", {}))
            TrainConfig(**self.adapters.get("train", {}))
            BenchConfig(**self.bench)
        except (TypeError, ValueError) as e:
            bad("adapters/bench", str(e))


# ----------------------------------------------------------------------------- cached stages


class Stages:
    """Runs named stages once: files written atomically, ``done.json`` (with the key) last."""

    def __init__(self, root: Path, report=print, use_cache: bool = True):
        self.root, self.report, self.ran, self.skipped = Path(root), report, [], []
        self.use_cache = use_cache

    def __call__(self, name: str, key_parts, compute: Callable[[Path], dict]) -> dict:
        folder = self.root / name
        key = store.config_hash(name, _where_free(key_parts), store.versions()["layerviz"])
        done = folder / "done.json"
        if done.exists() and self.use_cache:
            meta = json.loads(done.read_text())
            if meta.get("key") == key:
                self.skipped.append(name)
                return _read_outputs(folder, meta["files"])
        if self.report:
            self.report(f"[{name}] running")
        t0 = time.perf_counter()
        result = compute(folder)
        files = []
        for fname, obj in result.items():
            if isinstance(obj, pd.DataFrame):
                store.write_parquet(folder / f"{fname}.parquet", obj)
                files.append(f"{fname}.parquet")
            else:
                store.write_json(folder / f"{fname}.json", obj)
                files.append(f"{fname}.json")
        seconds = time.perf_counter() - t0
        store.write_json(done, {"key": key, "files": files, "seconds": seconds, "versions": store.versions()})
        self.ran.append(name)
        if self.report:
            self.report(f"[{name}] done in {seconds:.0f} s")
        return result


def _where_free(obj):
    """Key parts without ``results_dir``: where results live is not what they are."""
    if isinstance(obj, dict):
        return {k: _where_free(v) for k, v in obj.items() if k != "results_dir"}
    if isinstance(obj, list | tuple):
        return [_where_free(v) for v in obj]
    return obj


def _read_outputs(folder: Path, files: list[str]) -> dict:
    out = {}
    for f in files:
        p = folder / f
        out[p.stem] = pd.read_parquet(p) if p.suffix == ".parquet" else json.loads(p.read_text())
    return out


# ----------------------------------------------------------------------------- analysis helpers


def depth(layers, n_layers: int) -> np.ndarray:
    """Normalized depth i / (L - 1) in [0, 1]."""
    return np.asarray(layers, dtype=float) / max(1, n_layers - 1)


def profile_on_grid(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A per-layer profile interpolated onto a common normalized-depth grid."""
    return np.interp(grid, depth(range(len(values)), len(values)), values)


def spearman_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman rho with a bootstrap CI over paired points."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(a, b).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(a), len(a))
        if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
            boots.append(spearmanr(a[i], b[i]).statistic)
    return rho, float(np.nanquantile(boots, 0.025)), float(np.nanquantile(boots, 0.975))


def depth_overlap(a: list[int], la: int, b: list[int], lb: int, bins: int = 10) -> float:
    """Jaccard overlap of the depth bins (tenths of the depth) two selections occupy."""
    ba = set(np.minimum((depth(a, la) * bins).astype(int), bins - 1))
    bb = set(np.minimum((depth(b, lb) * bins).astype(int), bins - 1))
    return len(ba & bb) / max(1, len(ba | bb))


def map_reference(layers: list[int], ref_layers: int, n_layers: int) -> list[int]:
    """A reference selection reported for ``ref_layers`` layers, mapped onto ``n_layers`` by depth."""
    return sorted({int(round(x)) for x in depth(layers, ref_layers) * (n_layers - 1)})


def verdict(low: float, high: float, threshold: float = 0.0) -> str:
    """'supported' when the CI lies above the threshold, 'contradicted' below it, else 'inconclusive'."""
    if low > threshold:
        return "supported"
    if high < threshold:
        return "contradicted"
    return "inconclusive"


def _region_contrast(values: np.ndarray, seed: int) -> tuple[float, float, float, dict]:
    """Mean of the upper third minus the larger of the other two, with a bootstrap CI over layers."""
    from layerviz.adapters import region

    n = len(values)
    reg = np.array([region(i, n) for i in range(n)])
    means = {r: float(values[reg == r].mean()) for r in REGIONS}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(2000):
        m = {r: values[reg == r][rng.integers(0, (reg == r).sum(), (reg == r).sum())].mean() for r in REGIONS}
        diffs.append(m["upper"] - max(m["lower"], m["middle"]))
    point = means["upper"] - max(means["lower"], means["middle"])
    return point, float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975)), means


# ----------------------------------------------------------------------------- the study


class Study:
    """Executes a StudyConfig; every stage cached under results_dir/name/."""

    def __init__(self, cfg: StudyConfig, report=print, use_cache: bool = True):
        self.cfg, self.report = cfg, report
        self.stages = Stages(cfg.folder, report, use_cache)
        self._models: dict = {}
        self._preps: dict = {}

    # -- shared resources, loaded lazily (a fully cached rerun loads nothing)
    @property
    def finetuning(self) -> bool:
        """Whether the study analyses a fine-tuned recommender (the config has a finetune section)."""
        return bool(self.cfg.finetune)

    def ft_config(self, spec: str):
        from layerviz.finetune import FinetuneConfig

        c = self.cfg
        return FinetuneConfig(model=spec, dataset=c.domain_a, history_len=c.history_len,
                              max_title_tokens=c.max_title_tokens, seed=c.seed, device=c.device, dtype=c.dtype,
                              candidates_dir=str(Path(c.results_dir) / "candidates"), **c.finetune_for(spec))

    def label(self, spec: str, zeroshot: bool = False) -> str:
        """The name results are cached under: the spec, or spec+ft-<key> for the fine-tuned recommender."""
        if zeroshot or not self.finetuning:
            return spec
        key = {k: v for k, v in asdict(self.ft_config(spec)).items() if k != "candidates_dir"}
        return f"{spec}+ft-{store.config_hash(key)[:8]}"

    def ft_folder(self, spec: str) -> Path:
        return self.stages.root / _slug(spec) / _slug(self.cfg.domain_a) / "finetune" / "model"

    def model(self, spec: str, zeroshot: bool = False):
        """(model, tokenizer) that the stages analyse: the fine-tuned recommender unless ``zeroshot``."""
        from layerviz.finetune import check_base
        from layerviz.models import load_model

        tuned = self.finetuning and not zeroshot
        key = (spec, tuned)
        if key not in self._models:
            if tuned:
                self.finetune(spec)
                base = self.model(spec, zeroshot=True)[0]
                check_base(self.ft_folder(spec), base)  # a reused folder must come from this very base
            self._models.clear()  # one model in memory at a time
            source = str(self.ft_folder(spec)) if tuned else spec
            self._models[key] = load_model(source, device=self.cfg.device, dtype=self.cfg.dtype, seed=self.cfg.seed)
        return self._models[key]

    def prep(self, dataset: str):
        from layerviz.data import PrepConfig, load

        if dataset not in self._preps:
            self._preps[dataset] = load(dataset, "auto", PrepConfig(history_len=self.cfg.history_len), report=None)
        return self._preps[dataset]

    def evaluator(self, spec: str, dataset: str, split: str, users: int, zeroshot: bool = False):
        from layerviz.data import CandidateConfig, candidates_for
        from layerviz.evaluate import TaskEvaluator

        prep = self.prep(dataset)
        cands, _ = candidates_for(prep, CandidateConfig(self.cfg.negatives, "uniform", users, split, self.cfg.seed),
                                  Path(self.cfg.results_dir) / "candidates")
        calibration = self.calibration(spec, dataset, zeroshot)["choice"]
        return TaskEvaluator(prep, cands, self.model(spec, zeroshot)[1], split=split,
                             max_title_tokens=self.cfg.max_title_tokens, calibration=calibration), cands

    def popularity(self, dataset: str, cands: pd.DataFrame) -> pd.DataFrame:
        """Per-user metrics of the popularity baseline on these candidate lists."""
        from layerviz.evaluate import popularity_scores

        scores = np.stack(popularity_scores(self.prep(dataset), cands))
        return metrics.per_user(metrics.pessimistic_ranks(scores, cands["pos_index"].to_numpy()))

    def n_layers(self, spec: str) -> int:
        from layerviz.models import PRESETS

        return PRESETS[spec].num_layers if spec in PRESETS else arch.num_layers(self.model(spec, zeroshot=True)[0])

    def k(self, spec: str) -> int:
        return max(1, int(round(self.n_layers(spec) * self.cfg.k_fraction)))

    def _key(self, spec: str, *parts, zeroshot: bool = False):
        c = self.cfg
        return [c.history_len, c.max_title_tokens, c.negatives, c.seed, c.dtype, self.label(spec, zeroshot),
                c.calibration, c.calibration_users, *parts]

    def criterion(self, spec: str, dataset: str) -> dict:
        """The criterion ordering importance_greedy/top_k: the config's, or the most valid one ('auto')."""
        from layerviz.importance import choose_criterion

        if self.cfg.criterion != "auto":
            return {"criterion": self.cfg.criterion, "auto": False}
        imp = self.importance(spec, self.cfg.domain_a)  # validity needs the ablation, measured on domain A
        return {**choose_criterion(imp["validity"]), "auto": True, "dataset": self.cfg.domain_a}

    # -- stages
    def finetune(self, spec: str) -> dict:
        """The base model fine-tuned on domain A's training split (a plain HF folder under the stage)."""
        from layerviz.finetune import finetune

        fcfg = self.ft_config(spec)

        def compute(folder):
            import shutil

            base, tok = self.model(spec, zeroshot=True)
            shutil.rmtree(folder / "model", ignore_errors=True)  # stale: this stage is being (re)computed
            res = finetune(fcfg, base, tok, out=folder / "model", report=self.report)
            return {"summary": res.summary, "curves": res.curves}

        return self.stages(f"{_slug(spec)}/{_slug(self.cfg.domain_a)}/finetune",
                           {k: v for k, v in asdict(fcfg).items() if k != "candidates_dir"}, compute)

    def calibration(self, spec: str, dataset: str, zeroshot: bool = False) -> dict:
        """none or pmi for this model and dataset: the config's, or chosen on validation users ('auto')."""
        from layerviz.evaluate import pick_calibration

        c = self.cfg
        if c.calibration != "auto":
            return {"choice": c.calibration, "valid_ndcg@10": None}
        suffix = "-zeroshot" if zeroshot and self.finetuning else ""

        def compute(folder):
            model, tok = self.model(spec, zeroshot)
            choice, record = pick_calibration(model, tok, self.prep(dataset), "auto", c.calibration_users, c.negatives,
                                              c.seed, c.max_title_tokens, Path(c.results_dir) / "candidates")
            return {"calibration": record}

        return self.stages(f"{_slug(spec)}/{_slug(dataset)}/calibration{suffix}", self._key(spec, dataset, zeroshot=zeroshot),
                           compute)["calibration"]

    def importance(self, spec: str, dataset: str, ablation: bool = True, zeroshot: bool = False) -> dict:
        from layerviz.importance import ImportanceConfig, run_importance

        over = dict(self.cfg.importance) if ablation else {**self.cfg.importance, "ablation": False}
        if not ablation and over.get("fusion_weights") == "fit":  # no ground truth here: domain A's fitted weights
            over["fusion_weights"] = self.importance(spec, self.cfg.domain_a, zeroshot=zeroshot)["fusion"]
        needs_scorer = ablation and over.get("ablation_users", ImportanceConfig.ablation_users) > 0
        calibration = self.calibration(spec, dataset, zeroshot)["choice"] if needs_scorer else "none"
        icfg = ImportanceConfig(model=self.label(spec, zeroshot), dataset=dataset, history_len=self.cfg.history_len,
                                seed=self.cfg.seed, max_title_tokens=self.cfg.max_title_tokens, calibration=calibration,
                                device=self.cfg.device, dtype=self.cfg.dtype, results_dir=self.cfg.results_dir, **over)

        def compute(folder):
            model, tok = self.model(spec, zeroshot)
            res = run_importance(icfg, model, tok, report=None)
            return {"importance": res.table, "validity": res.validity, "fusion": res.fusion_weights}

        suffix = "-zeroshot" if zeroshot and self.finetuning else ""
        return self.stages(f"{_slug(spec)}/{_slug(dataset)}/importance{suffix}", asdict(icfg), compute)

    def selection(self, spec: str, dataset: str, strategy: str) -> dict:
        from layerviz.selection import select

        k = self.k(spec)
        crit = self.criterion(spec, dataset) if strategy in ("importance_greedy", "top_k") else None

        def compute(folder):
            ev, _ = self.evaluator(spec, dataset, "valid", self.cfg.select_users)
            model, _ = self.model(spec)
            table = None
            if crit is not None:
                table = self.importance(spec, dataset, ablation=dataset == self.cfg.domain_a)["importance"]
            s = select(strategy, model, ev, k=k, importance=table, seed=self.cfg.seed,
                       criterion=crit["criterion"] if crit else "fused")
            doc = {**s.to_json(), "model": spec, "dataset": dataset, "calibration": ev.cfg.calibration}
            if crit is not None:
                doc["criterion_choice"] = crit
            return {"selection": doc, "trace": s.trace}

        return self.stages(f"{_slug(spec)}/{_slug(dataset)}/select-{strategy}",
                           self._key(spec, dataset, strategy, k, self.cfg.select_users, self.cfg.importance,
                                     crit and crit["criterion"]), compute)

    def zeroshot(self, spec: str, dataset: str) -> dict:
        """The zero-shot model on the test users (every metric per user, its own calibration) and popularity."""
        cfg = self.cfg

        def compute(folder):
            ev, cands = self.evaluator(spec, dataset, "test", cfg.eval_users, zeroshot=True)
            m = ev.metrics(self.model(spec, zeroshot=True)[0])
            pop = self.popularity(dataset, cands)
            cols = {**{f"zeroshot:{k}": m[k].to_numpy() for k in m.columns},
                    **{f"popularity:{k}": pop[k].to_numpy() for k in pop.columns}}
            return {"per_user": pd.DataFrame(cols), "meta": {"calibration": ev.cfg.calibration,
                                                               "users": cands["user_id"].tolist()}}

        return self.stages(f"{_slug(spec)}/{_slug(dataset)}/zeroshot", self._key(spec, dataset, cfg.eval_users,
                                                                                  zeroshot=True), compute)

    def tuned_on(self, spec: str, dataset: str) -> dict:
        """The fine-tuned full model on another dataset's test users (cross-domain), every metric per user."""
        cfg = self.cfg

        def compute(folder):
            ev, cands = self.evaluator(spec, dataset, "test", cfg.eval_users)
            m = ev.metrics(self.model(spec)[0])
            return {"per_user": pd.DataFrame({f"full:{k}": m[k].to_numpy() for k in m.columns}),
                    "meta": {"calibration": ev.cfg.calibration, "users": cands["user_id"].tolist()}}

        return self.stages(f"{_slug(spec)}/{_slug(dataset)}/finetuned-full", self._key(spec, dataset, cfg.eval_users),
                           compute)

    def evaluation(self, spec: str) -> dict:
        """Test metrics (every metric, per user) of the full model, popularity and plain-dropping variants.

        Variants: the primary and the ``eval_strategies`` selections, the paper plan's reference list mapped
        onto this depth, and the model without its lower third. Adapters are measured by the adapters stage.
        """
        from layerviz.selection import load_reference

        cfg, n = self.cfg, self.n_layers(spec)
        ref = load_reference()["selections"][cfg.reference]
        variants = {"full": list(range(n)),
                    f"select:{cfg.primary}": self.selection(spec, cfg.domain_a, cfg.primary)["selection"]["layers"],
                    "drop_lower_third": [i for i in range(n) if i / max(1, n - 1) >= 1 / 3],
                    "reference_mapped": map_reference(ref["layers"], ref["real_num_layers"], n)}
        for s in cfg.eval_strategies:
            if s != cfg.primary:
                variants[f"select:{s}"] = self.selection(spec, cfg.domain_a, s)["selection"]["layers"]

        def compute(folder):
            model, _ = self.model(spec)
            ev, cands = self.evaluator(spec, cfg.domain_a, "test", cfg.eval_users)
            cols, rows = {}, []
            for name, layers in variants.items():
                with arch.keep_layers(model, layers):
                    m = ev.metrics(model)
                cols.update({f"{name}:{metric}": m[metric].to_numpy() for metric in m.columns})
                rows.append({"variant": name, "layers": layers, "k": len(layers)})
            pop = self.popularity(cfg.domain_a, cands)
            cols.update({f"popularity:{metric}": pop[metric].to_numpy() for metric in pop.columns})
            rows.append({"variant": "popularity", "layers": [], "k": 0})
            chance = {"variant": "chance", "n_candidates": cfg.negatives + 1,
                      **metrics.chance(cfg.negatives + 1)}
            return {"per_user": pd.DataFrame(cols), "variants": pd.DataFrame(rows), "chance": chance}

        return self.stages(f"{_slug(spec)}/{_slug(cfg.domain_a)}/evaluation",
                           self._key(spec, cfg.eval_users, variants, "all-metrics"), compute)

    def curves(self, spec: str, dataset: str) -> dict:
        """RQ2 traces: validation NDCG@10 of every fixed-k strategy at k' = 1..k (and the full model).

        ``top_k`` at k' is the importance order's first k' layers, which is exactly what the greedy loop
        scores at step k'; its points are taken from the greedy trace where that ran to k'.
        """
        from layerviz.selection import FIXED, SubsetScorer, fixed_layers, importance_order

        cfg, n, k = self.cfg, self.n_layers(spec), self.k(spec)
        fixed = [s for s in cfg.strategies if s in FIXED]
        sels = {s: self.selection(spec, dataset, s) for s in cfg.strategies}
        table = (self.importance(spec, dataset, ablation=dataset == cfg.domain_a)["importance"]
                 if "top_k" in fixed else None)
        crit = self.criterion(spec, dataset)["criterion"] if table is not None else None

        def compute(folder):
            model, _ = self.model(spec)
            ev, _ = self.evaluator(spec, dataset, "valid", cfg.select_users)
            scorer = SubsetScorer(model, ev)
            for sel in sels.values():  # same users and candidates: subsets the selections scored are not rescored
                for _, t in sel["trace"].iterrows():
                    scorer.cache[tuple(int(i) for i in t["layers"])] = float(t["score"])
            rows = [{"strategy": "full", "k": n, "layers": list(range(n)), "score": scorer(list(range(n)))}]
            if "importance_greedy" in sels:
                for _, t in sels["importance_greedy"]["trace"].iterrows():
                    rows.append({"strategy": "importance_greedy", "k": int(t["k"]),
                                 "layers": [int(i) for i in t["layers"]], "score": float(t["score"])})
            order = importance_order(table, crit, True, n) if table is not None else None
            for s in fixed:
                for kk in range(1, k + 1):
                    layers = fixed_layers(s, n, kk, order if s == "top_k" else None)
                    rows.append({"strategy": s, "k": kk, "layers": layers, "score": scorer(layers)})
            return {"curves": pd.DataFrame(rows)}

        return self.stages(f"{_slug(spec)}/{_slug(dataset)}/curves",
                           self._key(spec, dataset, k, fixed, cfg.select_users, cfg.importance, crit,
                                     {s: v["selection"]["layers"] for s, v in sels.items()}), compute)

    def adapters(self, spec: str, dataset: str, layers: list[int]) -> dict:
        from layerviz.compact import AdaptConfig, run_adapt

        acfg = AdaptConfig(model=self.label(spec), dataset=dataset, layers=layers, users=self.cfg.eval_users,
                           negatives=self.cfg.negatives, history_len=self.cfg.history_len, seed=self.cfg.seed,
                           max_title_tokens=self.cfg.max_title_tokens, device=self.cfg.device, dtype=self.cfg.dtype,
                           calibration=self.calibration(spec, dataset)["choice"], results_dir=self.cfg.results_dir,
                           **self.cfg.adapters)

        def compute(folder):
            model, tok = self.model(spec)
            res = run_adapt(acfg, out=folder / "adapt", model=model, tokenizer=tok, use_cache=False, report=None)
            return {k: res[k] for k in ("summary", "retention", "curve", "placement", "per_user")}

        return self.stages(f"{_slug(spec)}/{_slug(dataset)}/adapters", asdict(acfg), compute)

    def bench(self, spec: str, selection_layers: list[int]) -> dict:
        from layerviz.bench import BenchConfig, run_bench

        bcfg = BenchConfig(model=self.label(spec), dataset=self.cfg.domain_a, history_len=self.cfg.history_len,
                           max_title_tokens=self.cfg.max_title_tokens,
                           negatives=self.cfg.negatives, seed=self.cfg.seed, device=self.cfg.device,
                           dtype=self.cfg.dtype, results_dir=self.cfg.results_dir, **self.cfg.bench)
        bcfg.keep = sorted(set(bcfg.keep) | {len(selection_layers)})  # the headline's k is always measured
        if bcfg.adapter_k is not None:
            bcfg.adapter_k = sorted(set(bcfg.adapter_k) | {len(selection_layers)})

        def compute(folder):
            sel = folder / "selection.json"
            store.write_json(sel, {"layers": selection_layers})
            bcfg.selection = str(sel)
            if self.finetuning:  # the workers load the fine-tuned folder (the key names its label)
                self.finetune(spec)
                bcfg.model = str(self.ft_folder(spec))
            self._models.clear()  # the workers load their own copy; keep the parent's memory low
            return {"bench": run_bench(bcfg, report=self.report)}

        return self.stages(f"{_slug(spec)}/bench", [asdict(bcfg), selection_layers], compute)

    def transfer(self, spec: str, a_adapt_stage: str, a_layers: list[int], b_adapt: dict) -> dict:
        """A's selection (plain and with A's adapters) evaluated on domain B's test users."""
        from layerviz.compact import load_compact

        cfg = self.cfg

        def compute(folder):
            model, _ = self.model(spec)
            ev, cands = self.evaluator(spec, cfg.domain_b, "test", cfg.eval_users)
            with arch.keep_layers(model, a_layers):
                plain = ev(model)
            compact = load_compact(self.stages.root / a_adapt_stage / "adapt" / "compact", base=model)
            adapted = ev(compact)
            pop = self.popularity(cfg.domain_b, cands)
            return {"per_user": pd.DataFrame({"a_selection_plain": plain, "a_selection_adapters": adapted,
                                              "popularity": pop["ndcg@10"].to_numpy()})}

        return self.stages(f"{_slug(spec)}/{_slug(cfg.domain_b)}/transfer",
                           self._key(spec, a_layers, a_adapt_stage, b_adapt["summary"]["layers"],
                                     cfg.eval_users), compute)

    # -- the whole thing
    def run(self) -> dict:
        cfg = self.cfg
        out = {"models": {}}
        cd_models = cfg.cross_domain_models if cfg.cross_domain_models is not None else cfg.models[:1]
        for spec in cfg.models:
            r = {}
            if self.finetuning:  # the zero-shot side first: one model switch per model
                r["finetune"] = self.finetune(spec)
                r["zeroshot"] = {cfg.domain_a: self.zeroshot(spec, cfg.domain_a)}
                if spec in cd_models:
                    r["zeroshot"][cfg.domain_b] = self.zeroshot(spec, cfg.domain_b)
                r["importance_zeroshot"] = self.importance(spec, cfg.domain_a, zeroshot=True)
            r["importance"] = self.importance(spec, cfg.domain_a)
            r["selections"] = {s: self.selection(spec, cfg.domain_a, s) for s in cfg.strategies}
            primary = r["selections"][cfg.primary]["selection"]["layers"]
            r["adapters"] = self.adapters(spec, cfg.domain_a, primary)
            r["evaluation"] = self.evaluation(spec)
            r["curves"] = self.curves(spec, cfg.domain_a)
            r["calibration"] = {d: self.calibration(spec, d) for d in (cfg.domain_a, cfg.domain_b)
                                if d == cfg.domain_a or spec in cd_models}
            if spec in cd_models:
                r["b_selection"] = self.selection(spec, cfg.domain_b, cfg.primary)
                r["b_adapters"] = self.adapters(spec, cfg.domain_b, r["b_selection"]["selection"]["layers"])
                r["transfer"] = self.transfer(spec, f"{_slug(spec)}/{_slug(cfg.domain_a)}/adapters",
                                              primary, r["b_adapters"])
                if self.finetuning:
                    r["tuned_b"] = self.tuned_on(spec, cfg.domain_b)
            r["bench"] = self.bench(spec, primary)
            out["models"][spec] = r
        self._models.clear()
        tables = self.tables(out)
        for name, df in tables.items():
            store.write_parquet(cfg.folder / f"{name}.parquet", df)
            store.atomic_write(cfg.folder / f"{name}.csv", lambda tmp, df=df: df.to_csv(tmp, index=False))
        store.atomic_write(cfg.folder / "headline.tex", lambda tmp: Path(tmp).write_text(
            tables["headline"].to_latex(index=False, float_format="%.2f", escape=True)))
        store.write_json(cfg.folder / "manifest.json", store.manifest(cfg, cfg.seed, stages_run=self.stages.ran,
                                                                      stages_cached=self.stages.skipped))
        out["tables"] = tables
        return out

    # -- tables
    def tables(self, out: dict) -> dict[str, pd.DataFrame]:
        tables = {"headline": headline(out, self.cfg), "thirds": thirds_table(out, self.cfg),
                  "cross_model": cross_model(out, self.cfg), "cross_domain": cross_domain(out, self.cfg),
                  "variants": variants_table(out, self.cfg), "hypotheses": hypotheses(out, self.cfg)}
        if self.finetuning:
            tables["finetune"] = finetune_table(out, self.cfg)
        return tables


def _slug(s: str) -> str:
    return s.replace("/", "_").replace("\\", "_").strip("._") or "x"


def headline(out: dict, cfg: StudyConfig) -> pd.DataFrame:
    """model | L | k | compression | measured speedup | bound | memory ratio | NDCG@5/@10 retention [CI]."""
    rows = []
    for spec, r in out["models"].items():
        b = r["bench"]["bench"]
        ad = r["adapters"]
        s = ad["summary"]
        ret = ad["retention"].set_index("stage").iloc[-1]
        k_row = b[(b["k"] == s["k"]) & (b["adapters"])]
        k_row = k_row.iloc[0] if len(k_row) else None
        rows.append({"model": spec, "L": s["n_layers"], "k": s["k"], "compression": s["n_layers"] / s["k"],
                     "speedup": k_row["speedup"] if k_row is not None else np.nan,
                     "bound": k_row["bound"] if k_row is not None else np.nan,
                     "memory_ratio": k_row["memory_ratio"] if k_row is not None else np.nan,
                     "ndcg5_retention": ret["retention@5"], "ndcg5_low": ret["retention@5_low"],
                     "ndcg5_high": ret["retention@5_high"], "ndcg10_retention": ret["retention"],
                     "ndcg10_low": ret["retention_low"], "ndcg10_high": ret["retention_high"]})
    return pd.DataFrame(rows)


def thirds_table(out: dict, cfg: StudyConfig) -> pd.DataFrame:
    """Share of selected layers in the lower, middle and upper thirds, per model and strategy."""
    rows = []
    for spec, r in out["models"].items():
        for strategy, s in r["selections"].items():
            sel = s["selection"]
            t = sel["thirds"]
            rows.append({"model": spec, "strategy": strategy, "L": sel["n_layers"], "k": sel["k"],
                         **{f"{x}_share": t[x] / max(1, sel["k"]) for x in REGIONS},
                         "layers": sel["layers"], "depths": [round(float(d), 3) for d in depth(sel["layers"], sel["n_layers"])]})
    return pd.DataFrame(rows)


def variants_table(out: dict, cfg: StudyConfig, metric: str = "ndcg@10") -> pd.DataFrame:
    """Test ``metric`` of the full model, each plain-dropping variant, popularity and chance, per model.

    Retention = variant / full on the same users, with a paired bootstrap CI.
    """
    rows = []
    for spec, r in out["models"].items():
        ev = r["evaluation"]
        pu, full = ev["per_user"], ev["per_user"][f"full:{metric}"]
        layers = {v["variant"]: [int(i) for i in v["layers"]] for _, v in ev["variants"].iterrows()}
        for name in layers:
            m, lo, hi = metrics.bootstrap_ci(pu[f"{name}:{metric}"], seed=cfg.seed)
            ret, rlo, rhi = metrics.ratio_ci(pu[f"{name}:{metric}"], full, seed=cfg.seed)
            rows.append({"model": spec, "variant": name, "k": len(layers[name]), "layers": layers[name],
                         metric: m, "ci_low": lo, "ci_high": hi, "retention": ret, "retention_low": rlo,
                         "retention_high": rhi})
        c = ev["chance"][metric]
        rows.append({"model": spec, "variant": "chance", "k": 0, "layers": [], metric: c, "ci_low": c, "ci_high": c,
                     "retention": c / full.mean(), "retention_low": np.nan, "retention_high": np.nan})
    return pd.DataFrame(rows)


def _fused(r: dict) -> np.ndarray:
    t = r["importance"]["importance"]
    return t[t["criterion"] == "fused"].sort_values("layer")["value"].to_numpy()


def cross_model(out: dict, cfg: StudyConfig, grid_points: int = 21) -> pd.DataFrame:
    """Per model pair: rank correlation of importance profiles on a common depth grid, and selection overlap."""
    grid = np.linspace(0, 1, grid_points)
    specs = list(out["models"])
    rows = []
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            ra, rb = out["models"][a], out["models"][b]
            rho, lo, hi = spearman_ci(profile_on_grid(_fused(ra), grid), profile_on_grid(_fused(rb), grid), seed=cfg.seed)
            row = {"model_a": a, "model_b": b, "criterion": "fused", "spearman": rho, "ci_low": lo, "ci_high": hi}
            for s in cfg.strategies:
                sa, sb = ra["selections"][s]["selection"], rb["selections"][s]["selection"]
                row[f"overlap:{s}"] = depth_overlap(sa["layers"], sa["n_layers"], sb["layers"], sb["n_layers"])
            rows.append(row)
    return pd.DataFrame(rows)


def cross_domain(out: dict, cfg: StudyConfig) -> pd.DataFrame:
    """Transfer ratio: NDCG@10 on B with A's selection over NDCG@10 on B with B's own, plus baselines."""
    rows = []
    chance = metrics.chance(cfg.negatives + 1)["ndcg@10"]
    for spec, r in out["models"].items():
        if "transfer" not in r:
            continue
        t, bpu = r["transfer"]["per_user"], r["b_adapters"]["per_user"]
        last = r["b_adapters"]["retention"]["stage"].iloc[-1]
        own, own_plain, full = bpu[f"{last}:ndcg@10"], bpu["drop:ndcg@10"], bpu["full:ndcg@10"]
        for name, num, den in (("adapters", t["a_selection_adapters"], own), ("plain", t["a_selection_plain"], own_plain)):
            ratio, lo, hi = metrics.ratio_ci(num, den, seed=cfg.seed)
            rows.append({"model": spec, "domain_a": cfg.domain_a, "domain_b": cfg.domain_b, "variant": name,
                         "a_layers": r["selections"][cfg.primary]["selection"]["layers"],
                         "b_layers": r["b_selection"]["selection"]["layers"],
                         "ndcg10_b_with_a": float(np.mean(num)), "ndcg10_b_with_b": float(np.mean(den)),
                         "transfer_ratio": ratio, "ci_low": lo, "ci_high": hi,
                         "full_b": float(np.mean(full)), "popularity_b": float(t["popularity"].mean()),
                         "chance_b": chance, "gap_over_popularity": float(np.mean(num) - t["popularity"].mean()),
                         "gap_over_chance": float(np.mean(num)) - chance})
    return pd.DataFrame(rows)


def hypotheses(out: dict, cfg: StudyConfig) -> pd.DataFrame:
    """One row per claim of the paper plan, with measured evidence and a verdict computed from CIs."""
    rows = []
    for spec, r in out["models"].items():
        apu, pu = r["adapters"]["per_user"], r["evaluation"]["per_user"]
        L = r["adapters"]["summary"]["n_layers"]
        imp = r["importance"]["importance"]
        # H1: upper layers are the most important (fused score and single-layer ablation ground truth)
        for crit in ("ablation_loss", "fused"):
            vals = imp[imp["criterion"] == crit].sort_values("layer")["value"].to_numpy()
            if len(vals) == 0:
                continue
            d, lo, hi, means = _region_contrast(vals, cfg.seed)
            rows.append({"model": spec, "claim": "upper layers are the most important", "evidence": crit,
                         "value": d, "ci_low": lo, "ci_high": hi, "verdict": verdict(lo, hi),
                         "detail": "upper-third mean minus the larger other-third mean; means "
                                   + ", ".join(f"{k} {v:.3g}" for k, v in means.items())})
        # H1 also via selections: last_k and the reference (mapped by depth) against the primary selection
        for variant in ("select:last_k", "reference_mapped"):
            col = f"{variant}:ndcg@10"
            if col in pu and f"select:{cfg.primary}:ndcg@10" in pu:
                c = metrics.paired_comparison(pu[col], pu[f"select:{cfg.primary}:ndcg@10"], seed=cfg.seed)
                rows.append({"model": spec, "claim": "upper layers are the most important",
                             "evidence": f"{variant} minus {cfg.primary} (test NDCG@10, no adapters)",
                             "value": c["diff"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
                             "verdict": verdict(c["ci_low"], c["ci_high"]),
                             "detail": f"{variant} NDCG@10 {pu[col].mean():.3f}"})
        # H2: lower layers can be dropped (keep >= 90% of NDCG@10 without the lower third)
        ratio, lo, hi = metrics.ratio_ci(pu["drop_lower_third:ndcg@10"], pu["full:ndcg@10"], seed=cfg.seed)
        rows.append({"model": spec, "claim": "lower layers can be dropped",
                     "evidence": "NDCG@10 retention without the lower third (threshold 0.9)",
                     "value": ratio, "ci_low": lo, "ci_high": hi, "verdict": verdict(lo, hi, 0.9),
                     "detail": f"full {pu['full:ndcg@10'].mean():.3f}, without lower third "
                               f"{pu['drop_lower_third:ndcg@10'].mean():.3f}"})
        # H3: non-contiguous selections work with adapters (trained adapters beat plain dropping)
        last = r["adapters"]["retention"]["stage"].iloc[-1]
        c = metrics.paired_comparison(apu[f"{last}:ndcg@10"], apu["drop:ndcg@10"], seed=cfg.seed)
        rows.append({"model": spec, "claim": "non-contiguous selections work with adapters",
                     "evidence": f"NDCG@10 with adapters ({last}) minus plain dropping, {cfg.primary} selection",
                     "value": c["diff"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
                     "verdict": verdict(c["ci_low"], c["ci_high"]),
                     "detail": f"layers {r['adapters']['summary']['layers']}"})
        # H5: 8 of 32 layers give 4x speed with ~90% NDCG retained (k = L / 4 here)
        b = r["bench"]["bench"]
        s = r["adapters"]["summary"]
        row = b[(b["k"] == s["k"]) & (b["adapters"])]
        speed = float(row["speedup"].iloc[0]) if len(row) else np.nan
        ret = r["adapters"]["retention"].set_index("stage").loc[last]
        fast = speed >= 0.9 * 4
        kept = ret["retention_high"] >= 0.9
        v = "supported" if fast and ret["retention_low"] >= 0.8 and kept else (
            "contradicted" if (not fast or not kept) else "inconclusive")
        rows.append({"model": spec, "claim": f"{s['k']} of {L} layers: 4x speed with ~90% NDCG retained",
                     "evidence": "measured prefill speedup; NDCG@10 retention with adapters",
                     "value": speed, "ci_low": ret["retention_low"], "ci_high": ret["retention_high"],
                     "verdict": v, "detail": f"speedup {speed:.2f}x (FLOP bound "
                                             f"{float(row['bound'].iloc[0]) if len(row) else np.nan:.2f}x), "
                                             f"retention {ret['retention']:.2f}"})
    # fine-tuning moves which layers matter: zero-shot vs fine-tuned importance profiles of the same model
    for _, c in importance_shift(out, cfg).iterrows():
        v = "supported" if c["ci_high"] < MOVED_RHO else "contradicted" if c["ci_low"] > MOVED_RHO else "inconclusive"
        rows.append({"model": c["model"], "claim": "fine-tuning moves which layers matter",
                     "evidence": f"Spearman of {c['criterion']} importance, zero-shot vs fine-tuned "
                                 f"(moved if the CI lies below {MOVED_RHO})",
                     "value": c["spearman"], "ci_low": c["ci_low"], "ci_high": c["ci_high"], "verdict": v,
                     "detail": f"{c['layers']} layers; bootstrap over layers"})
    # H4: the pattern generalizes across models
    for _, c in cross_model(out, cfg).iterrows():
        rows.append({"model": f"{c['model_a']} vs {c['model_b']}", "claim": "the pattern generalizes across models",
                     "evidence": "Spearman of fused importance on a common depth grid",
                     "value": c["spearman"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
                     "verdict": verdict(c["ci_low"], c["ci_high"]),
                     "detail": ", ".join(f"{k} {v:.2f}" for k, v in c.items() if str(k).startswith("overlap:"))})
    return pd.DataFrame(rows)


QUALITY_METRICS = ("ndcg@5", "ndcg@10", "mrr", "hr@10", "precision@5")


def finetune_table(out: dict, cfg: StudyConfig) -> pd.DataFrame:
    """Zero-shot, fine-tuned, popularity and chance per model and dataset (test users, 95% CIs), plus the
    paired differences fine-tuned - zero-shot and fine-tuned - popularity. One row per (model, dataset,
    system, metric); ``calibration`` is the one each LLM scored with (chosen on validation users)."""
    rows = []
    for spec, r in out["models"].items():
        for dataset, zs in r.get("zeroshot", {}).items():
            zpu = zs["per_user"]
            ft = r["evaluation"]["per_user"] if dataset == cfg.domain_a else r["tuned_b"]["per_user"]
            base = {"model": spec, "dataset": dataset, "n_users": len(zpu)}
            cols = {"zero-shot": (zpu, "zeroshot", zs["meta"]["calibration"]),
                    "fine-tuned": (ft, "full", r["calibration"][dataset]["choice"]),
                    "popularity": (zpu, "popularity", None)}
            chance = metrics.chance(cfg.negatives + 1)
            for metric in QUALITY_METRICS:
                for system, (pu, prefix, cal) in cols.items():
                    m, lo, hi = metrics.bootstrap_ci(pu[f"{prefix}:{metric}"], seed=cfg.seed)
                    rows.append({**base, "system": system, "metric": metric, "mean": m, "ci_low": lo, "ci_high": hi,
                                 "calibration": cal})
                rows.append({**base, "system": "chance", "metric": metric, "mean": chance[metric],
                             "ci_low": chance[metric], "ci_high": chance[metric], "calibration": None})
                for other in ("zero-shot", "popularity"):
                    pu, prefix, _ = cols[other]
                    c = metrics.paired_comparison(ft[f"full:{metric}"], pu[f"{prefix}:{metric}"], seed=cfg.seed)
                    rows.append({**base, "system": f"fine-tuned - {other}", "metric": metric, "mean": c["diff"],
                                 "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p_value": c["p_value"],
                                 "calibration": None})
    return pd.DataFrame(rows)


def importance_shift(out: dict, cfg: StudyConfig, criteria=("fused", "ablation_loss")) -> pd.DataFrame:
    """Spearman between each model's zero-shot and fine-tuned importance profile, per criterion (CI over layers)."""
    rows = []
    for spec, r in out["models"].items():
        if "importance_zeroshot" not in r:
            continue
        zs, ft = r["importance_zeroshot"]["importance"], r["importance"]["importance"]
        for crit in criteria:
            a = zs[zs["criterion"] == crit].sort_values("layer")["value"].to_numpy()
            b = ft[ft["criterion"] == crit].sort_values("layer")["value"].to_numpy()
            if len(a) < 3 or len(a) != len(b):
                continue
            rho, lo, hi = spearman_ci(a, b, seed=cfg.seed)
            rows.append({"model": spec, "criterion": crit, "spearman": rho, "ci_low": lo, "ci_high": hi,
                         "layers": len(a)})
    return pd.DataFrame(rows, columns=["model", "criterion", "spearman", "ci_low", "ci_high", "layers"])


def _relation(low: float, high: float) -> str:
    return "better than" if low > 0 else "worse than" if high < 0 else "not distinguishable from"


def finetune_sentences(table: pd.DataFrame, metric: str = "ndcg@10") -> list[str]:
    """What ``finetune_table`` says, one sentence per model and dataset (paired CIs decide the wording)."""
    lines = []
    for (model, dataset), g in table[table["metric"] == metric].groupby(["model", "dataset"], sort=False):
        v = g.set_index("system")
        d, p = v.loc["fine-tuned - zero-shot"], v.loc["fine-tuned - popularity"]
        lines.append(
            f"{model} on {dataset} ({int(v.loc['zero-shot', 'n_users'])} test users): {metric} zero-shot "
            f"{v.loc['zero-shot', 'mean']:.3f} ({v.loc['zero-shot', 'calibration']}), fine-tuned "
            f"{v.loc['fine-tuned', 'mean']:.3f} ({v.loc['fine-tuned', 'calibration']}), popularity "
            f"{v.loc['popularity', 'mean']:.3f}, chance {v.loc['chance', 'mean']:.3f}. Fine-tuned minus zero-shot "
            f"{d['mean']:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]: {_relation(d.ci_low, d.ci_high)} the zero-shot "
            f"model; minus popularity {p['mean']:+.3f} [{p.ci_low:+.3f}, {p.ci_high:+.3f}]: "
            f"{_relation(p.ci_low, p.ci_high)} popularity.")
    return lines


def shift_sentences(shift: pd.DataFrame) -> list[str]:
    """What ``importance_shift`` says, one sentence per model and criterion."""
    out = []
    for _, c in shift.iterrows():
        moved = ("moved" if c.ci_high < MOVED_RHO else "kept (rank agreement above "
                 f"{MOVED_RHO})" if c.ci_low > MOVED_RHO else "not clearly moved or kept")
        out.append(f"{c.model}, {c.criterion}: Spearman between the zero-shot and the fine-tuned profile "
                   f"{c.spearman:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}] over {c.layers} layers: the layer "
                   f"ranking is {moved} by fine-tuning.")
    return out


def describe_base(cfg: StudyConfig) -> str:
    """One line saying which recommender the study analyses (notebooks label their figures with it)."""
    if not cfg.finetune:
        return "base: the pretrained LM, zero-shot (no finetune section in the config)"
    f = cfg.finetune
    how = "full fine-tuning" if f.get("full") else f"LoRA r={f.get('lora_r', 16)}"
    budget = ", ".join(f"{k} {f[k]}" for k in ("max_steps", "max_seconds", "epochs", "lr") if f.get(k) is not None)
    per = "; ".join(f"{spec}: " + ", ".join(f"{k} {v}" for k, v in over.items())
                    for spec, over in f.get("models", {}).items() if over)
    return (f"base: each model fine-tuned on {cfg.domain_a} ({how}, objective {f.get('objective', 'rank')}"
            f"{', ' + budget if budget else ''}{'; ' + per if per else ''}); the zero-shot model is evaluated "
            "alongside")


def smoke_config(models: list[str] | None = None, results_dir: str = "results", **over) -> StudyConfig:
    """A whole study at toy sizes on tiny random models (CI smoke runs of the notebooks and tests)."""
    raw = dict(name="smoke", models=["tiny-gemma3", "tiny-llama3"] if models is None else models, strategies=["importance_greedy", "last_k"],
               history_len=3, select_users=3, eval_users=4, negatives=9, calibration_users=3,
               finetune={"max_steps": 2, "eval_every": 2, "eval_users": 3, "eval_negatives": 4, "batch_size": 2,
                         "negatives": 3},
               importance={"samples": 3, "ablation_users": 2, "ablation_negatives": 4},
               adapters={"samples": 4, "policy": {"rank": 4}, "train": {"stage1_epochs": 2, "stage2_epochs": 1}},
               bench={"keep": [2], "runs": 1, "warmup": 0, "seq_len": 8, "prefill_batch": 1, "qps_queries": 1,
                      "query_batches": [10], "isolate": False},
               device="cpu", results_dir=results_dir)
    raw.update(over)
    return StudyConfig.from_dict(raw, where="smoke config")


def notebook_study(config: str | Path | None, smoke: bool = False, results_dir: str = "results",
                   device: str | None = None, overrides: dict | None = None, use_cache: bool = True,
                   models: list[str] | None = None, dataset: str | None = None) -> tuple[StudyConfig, dict]:
    """What every notebook does first: the study of ``config`` (or the CI smoke study), with overrides.

    ``models`` and ``dataset`` (domain A) are shorthands for those overrides. Finished stages are loaded
    from ``results_dir``; missing ones are computed and cached, so a notebook opened after
    ``layerviz run CONFIG`` only reads files.
    """
    over = dict(overrides or {})
    if models:
        over["models"] = [models] if isinstance(models, str) else list(models)
        over.setdefault("cross_domain_models", over["models"][:1])
    if dataset:
        over["domain_a"] = dataset
    if smoke:
        cfg = smoke_config(results_dir=results_dir, **over)
    else:
        raw = asdict(StudyConfig.from_yaml(config)) if config else {}
        cfg = StudyConfig.from_dict({**raw, **over, "results_dir": results_dir},
                                    where=f"{config or 'defaults'} with notebook overrides")
    if device is not None:
        cfg.device = device
    return cfg, Study(cfg, report=None, use_cache=use_cache).run()


def pick_models(out: dict, model: str | None) -> list[str]:
    """The study's models, or just ``model`` (refused with the choices if it is not one of them)."""
    names = list(out["models"])
    if model is None:
        return names
    if model not in names:
        raise ValueError(f"MODEL={model!r} is not in this study; its models: {', '.join(names)} "
                         "(set MODELS to run a study of another model)")
    return [model]


def run_study(path_or_cfg, report=print) -> dict:
    """``layerviz run CONFIG``: validate first, then run (or resume) every stage."""
    cfg = path_or_cfg if isinstance(path_or_cfg, StudyConfig) else StudyConfig.from_yaml(path_or_cfg)
    return Study(cfg, report).run()
