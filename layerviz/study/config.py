"""The study's configuration: ``StudyConfig`` (configs/*.yaml), its validation, and the CI smoke config.

Every value that would fail hours into a run is refused here, before any work, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from layerviz.compression.config import (
    AdaptConfig,
    AdapterPolicy,
    AdapterTrainConfig,
    HealConfig,
    ImportanceConfig,
    parse_objective,
)
from layerviz.compression.importance import DIRECTION, check_fusion_weights
from layerviz.compression.selection import STRATEGIES, load_reference
from layerviz.data import PrepConfig
from layerviz.data.bundled import NAMED, SYNTHETIC, known
from layerviz.models import PRESETS
from layerviz.sasrec import SASRecConfig
from layerviz.settings import CALIBRATIONS, SHARED, BenchConfig, FinetuneConfig, Settings

# settings the study decides for every stage (a section of the config may not override them)
STUDY_OWNED = set(SHARED) | {"calibration"}
RENAMED = {"domain_a": "dataset", "domain_b": "transfer_dataset"}
"""Keys of earlier configs that now have another name (refused with the new one)."""


@dataclass
class StudyConfig:
    """A whole study (configs/*.yaml). Unknown keys and bad values are refused before any work."""

    name: str = "study"
    """Folder name under results_dir."""
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])
    """Model presets, hub ids or local paths."""
    dataset: str = "synthetic-electronics"
    """The main dataset: selection, adapters and the headline are measured here."""
    transfer_dataset: str = "synthetic-movies"
    """The transfer dataset: the cross-domain transfer target."""
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
    history_len: int = Settings.history_len
    """Protocol: the most recent positives shown to the model as the user's history (every stage)."""
    max_title_tokens: int = Settings.max_title_tokens
    """Each title is cut to this many tokens (prompt length, and the LM-head work per candidate)."""
    positive_threshold: float = Settings.positive_threshold
    """Protocol: a rating counts as a positive interaction when it is at least this."""
    kcore: int = Settings.kcore
    """Protocol: users and items are filtered to at least this many positives (k-core)."""
    cold_items: float = 0.0
    """Item cold start (both datasets' protocol): this seeded fraction of the items is held out of training
    entirely; the main dataset's test users whose positive is such an item are the cold-start test set, on which the
    zero-shot, fine-tuned and compact LLMs, SASRec and popularity are compared. 0: off."""
    item_noun: str | None = None
    """What the prompts call the items (None: each dataset's default, e.g. movies for MovieLens)."""
    sasrec: dict = field(default_factory=dict)
    """Overrides of SASRecConfig (the classical sequential baseline in every quality table), e.g. {max_len: 50}."""
    select_users: int = 16
    """Validation users scored per subset during selection (1 + 19 candidates)."""
    eval_users: int = 40
    """Test users for every reported NDCG (1 + 19 candidates)."""
    negatives: int = Settings.negatives
    """Negatives per candidate list of every evaluation (1 + negatives candidates)."""
    eval_strategies: list[str] = field(default_factory=lambda: ["last_k"])
    """Strategies (besides the primary) whose selections are also evaluated on the test users, without adapters."""
    finetune: dict = field(default_factory=dict)
    """Fine-tune each model on the main dataset first (overrides of FinetuneConfig: objective, max_steps, max_seconds,
    full, lora_r, lr, batch_size, ...); every later stage then analyses the fine-tuned recommender, and the
    zero-shot model is still evaluated and profiled alongside. {}: the zero-shot model only. A ``models``
    entry overrides settings per model, e.g. ``models: {gemma3-270m: {lr: 1.0e-3}}``."""
    calibration: str = "auto"
    """Likelihood calibration: 'auto', 'none' or 'pmi'. 'auto': none or pmi chosen per model and dataset on
    validation users for the zero-shot model; a fine-tuned model scores as it was trained (none)."""
    calibration_users: int = 40
    """Validation users on which calibration 'auto' chooses (1 + negatives candidates each)."""
    criterion: str = "auto"
    """Criterion ordering importance_greedy/top_k: 'auto' (the highest validity against the loss ablation,
    chosen per model) or a criterion name (fused, block_influence, fisher_sum, ...)."""
    importance: dict = field(default_factory=dict)
    """Overrides of ImportanceConfig (samples, ablation, ablation_users, ...)."""
    adapters: dict = field(default_factory=dict)
    """Overrides of AdaptConfig: samples, policy {...}, train {...}, objective, heal {...}, valid_users, control."""
    rq3: dict = field(default_factory=dict)
    """RQ3's comparison of adapter variants (empty: none): ``variants`` {name: overrides of the adapters section
    (objective, heal, policy, train)}, ``models`` (default: the first), ``ks`` (default: the primary's k) and
    ``selections`` (primary, first_k)."""
    bench: dict = field(default_factory=dict)
    """Overrides of BenchConfig (ks, runs, ...)."""
    seed: int = Settings.seed
    """Fixes users, candidates, sampling and training in every stage."""
    device: str = Settings.device
    """cpu, cuda, cuda:N or auto, for every stage."""
    dtype: str | None = Settings.dtype
    """float32, bfloat16 or float16 (None: float32 on CPU, bfloat16 on CUDA), for every stage."""
    results_dir: str = Settings.results_dir
    """Stages are cached under results_dir/name/, candidate lists under results_dir/candidates."""
    jobs: int = 1
    """CPU only: models whose stages run at once, each in its own process with cores/jobs threads (the
    benches then run one at a time with every core). It did not pay on 2 cores (README); the float results
    depend on the thread count, so keep it fixed."""

    @property
    def folder(self) -> Path:
        return Path(self.results_dir) / self.name

    @property
    def candidates_dir(self) -> Path:
        """The seeded candidate lists' folder (shared with every job of this results_dir, as Settings')."""
        return Path(self.results_dir) / "candidates"

    def k_of(self, n_layers: int) -> int:
        """The number of layers kept of ``n_layers``: round(L * k_fraction), at least 1."""
        return max(1, int(round(n_layers * self.k_fraction)))

    def settings(self, model: str, dataset: str) -> dict:
        """The shared settings (``Settings``) every stage's config gets from the study."""
        return {**{k: getattr(self, k) for k in SHARED if hasattr(self, k)}, "model": model, "dataset": dataset}

    def prep_config(self) -> PrepConfig:
        """The data protocol every stage applies."""
        return PrepConfig(self.positive_threshold, self.kcore, self.history_len, self.item_noun, None,
                          self.cold_items, self.seed)

    def finetune_config(self, spec: str) -> FinetuneConfig:
        """How ``spec`` is fine-tuned on the main dataset (shared settings, the section, its per-model overrides)."""
        return FinetuneConfig(**self.settings(spec, self.dataset), **self.finetune_for(spec))

    def finetune_for(self, spec: str) -> dict:
        """The fine-tuning settings of one model: the shared ones with its ``models`` overrides on top."""
        shared = {k: v for k, v in self.finetune.items() if k != "models"}
        return {**shared, **self.finetune.get("models", {}).get(spec, {})}

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyConfig:
        """Read and validate a YAML config; raise naming the key and the reason."""
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
            if key in RENAMED:
                raise ValueError(f"{where}: the key {key!r} is now called {RENAMED[key]!r}: rename it")
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        cfg = cls(**raw)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        """Check every value that would otherwise fail hours into a run."""
        def bad(key, why):
            raise ValueError(f"{where}: {key}: {why}")

        if not isinstance(self.models, list) or not self.models:
            bad("models", "give a non-empty list of model presets, hub ids or paths")
        for m in self.models:
            if not isinstance(m, str) or not (m in PRESETS or Path(m).exists() or m.count("/") == 1):
                bad("models", f"{m!r} is not a preset ({', '.join(PRESETS)}), an existing path or a hub id")
        for key in ("dataset", "transfer_dataset"):
            v = getattr(self, key)
            if not isinstance(v, str) or not known(v):
                bad(key, f"{v!r} is neither a real dataset ({', '.join(NAMED)}), a synthetic one "
                         f"({', '.join(SYNTHETIC)}) nor an existing path")
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
        self._check_finetune(bad)
        try:
            self.prep_config().validate()
            SASRecConfig(**self.sasrec)
        except (TypeError, ValueError) as e:
            bad("cold_items/sasrec", str(e))
        for key in ("history_len", "max_title_tokens", "select_users", "eval_users", "negatives", "calibration_users",
                    "jobs"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, f"{v!r} must be a positive integer")
        if self.jobs > 1 and self.device != "cpu":
            bad("jobs", f"{self.jobs} processes share the CPU cores; with device {self.device!r} use jobs: 1 "
                        "(several GPUs: torchrun)")
        self._check_sections(bad)
        self._check_rq3(bad)


# ----------------------------------------------------------------------------- cached stages


    def _check_sections(self, bad) -> None:
        """The importance, bench and adapters sections: known settings with valid values."""
        for key, cls, allowed in (("importance", ImportanceConfig, None), ("bench", BenchConfig, None),
                                  ("adapters", AdaptConfig, {"samples", "policy", "train", "objective", "heal",
                                                              "valid_users", "control"})):
            section = getattr(self, key)
            if not isinstance(section, dict):
                bad(key, "must be a mapping")
            names = allowed or {f.name for f in fields(cls)} - STUDY_OWNED
            for k in section:
                if k not in names:
                    bad(f"{key}.{k}", f"unknown setting; known: {', '.join(sorted(names))}")
        try:
            AdapterPolicy(**self.adapters.get("policy", {}))
            AdapterTrainConfig(**self.adapters.get("train", {}))
            HealConfig(**self.adapters.get("heal", {}))
            parse_objective(self.adapters.get("objective", "mse"))
            BenchConfig(**self.bench)
        except (TypeError, ValueError) as e:
            bad("adapters/bench", str(e))

    def _check_rq3(self, bad) -> None:
        """The rq3 section: known keys, models of the study, variants that are valid adapter settings."""
        r = self.rq3
        if not isinstance(r, dict):
            bad("rq3", "must be a mapping (variants, models, ks, selections)")
        for k in set(r) - {"variants", "models", "ks", "selections"}:
            bad(f"rq3.{k}", "unknown setting; known: ks, models, selections, variants")
        if r and not isinstance(r.get("variants"), dict):
            bad("rq3.variants", "give {name: {objective: ..., heal: {...}}, ...}")
        for m in r.get("models", []):
            if m not in self.models:
                bad(f"rq3.models.{m}", f"not one of models ({', '.join(self.models)})")
        for s in r.get("selections", []):
            if s not in ("primary", "first_k"):
                bad(f"rq3.selections.{s}", "use primary or first_k")
        for name, over in (r.get("variants") or {}).items():
            try:
                sec = {**self.adapters, **over}
                AdapterPolicy(**sec.get("policy", {}))
                HealConfig(**sec.get("heal", {}))
                parse_objective(sec.get("objective", "mse"))
            except (TypeError, ValueError) as e:
                bad(f"rq3.variants.{name}", str(e))

    def rq3_models(self) -> list[str]:
        """The models RQ3's comparison runs on (none without variants)."""
        return list(self.rq3.get("models") or self.models[:1]) if self.rq3.get("variants") else []

    def _check_finetune(self, bad) -> None:
        """The finetune section: known settings, per-model overrides of models in the study, valid values."""
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


def describe_base(cfg: StudyConfig) -> str:
    """One line saying which recommender the study analyses (notebooks label their figures with it)."""
    if not cfg.finetune:
        return "base: the pretrained LM, zero-shot (no finetune section in the config)"
    f = cfg.finetune
    how = "full fine-tuning" if f.get("full") else f"LoRA r={f.get('lora_r', 16)}"
    budget = ", ".join(f"{k} {f[k]}" for k in ("max_steps", "max_seconds", "epochs", "lr") if f.get(k) is not None)
    per = "; ".join(f"{spec}: " + ", ".join(f"{k} {v}" for k, v in over.items())
                    for spec, over in f.get("models", {}).items() if over)
    return (f"base: each model fine-tuned on {cfg.dataset} ({how}, objective {f.get('objective', 'rank')}"
            f"{', ' + budget if budget else ''}{'; ' + per if per else ''}); the zero-shot model is evaluated "
            "alongside")


def smoke_config(models: list[str] | None = None, results_dir: str = "results", **over) -> StudyConfig:
    """A whole study at toy sizes on tiny random models (CI smoke runs of the notebooks and tests)."""
    raw = dict(name="smoke", models=["tiny-gemma3", "tiny-llama3"] if models is None else models, strategies=["importance_greedy", "last_k"],
               history_len=3, select_users=3, eval_users=4, negatives=9, calibration_users=3, cold_items=0.3,
               finetune={"max_steps": 2, "eval_every": 2, "eval_users": 3, "batch_size": 2,
                         "train_negatives": 3},
               importance={"samples": 3, "ablation_users": 2, "ablation_negatives": 4},
               adapters={"samples": 4, "policy": {"rank": 4}, "train": {"stage1_epochs": 2, "stage2_epochs": 1},
                         "objective": "task+distill", "valid_users": 3,
                         "heal": {"steps": 2, "eval_every": 2, "batch_size": 2, "train_negatives": 3}},
               rq3={"variants": {"mse": {"objective": "mse"}, "task+distill": {}}, "ks": [2]},
               sasrec={"max_epochs": 2, "eval_every": 1, "valid_users": 20, "hidden": 8, "max_len": 10},
               bench={"ks": [2], "runs": 1, "warmup": 0, "seq_len": 8, "prefill_batch": 1, "qps_queries": 1,
                      "isolate": False},
               device="cpu", results_dir=results_dir)
    raw.update(over)
    return StudyConfig.from_dict(raw, where="smoke config")
