"""What every stage of a study shares: the study's resources (models and data, loaded lazily, so that a fully
cached rerun loads no weights), the stage configs' common form, and ``stage``, which caches one stage under a
key derived from its config and its data's fingerprint, or (planning) records the stage's cost instead.

A stage is one method of ``Study`` (``stages.py`` and the ``*_stages`` mixins) holding, side by side, its config
(a dataclass: everything that decides its outputs), its compute function and its cost function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from layerviz import arch, metrics, store
from layerviz.data import CandidateConfig, candidates_for, load
from layerviz.evaluate import TaskEvaluator, popularity_scores
from layerviz.models import PRESETS, check_base, load_model
from layerviz.settings import Settings
from layerviz.store import Stages, slug
from layerviz.study.config import StudyConfig
from layerviz.study.cost import Planner


@dataclass
class Scored(Settings):
    """The config of a stage that scores users' candidate lists: shared settings (``model`` is the label of the
    recommender scored: the spec, or spec+ft-<key> for the fine-tuned one), plus these fields."""

    users: int = 0
    """How many users of ``split`` (1 + negatives candidates each)."""
    split: str = "test"
    """test or valid."""
    cold: bool = False
    """The cold-start test set (users whose positive is a held-out item)."""
    calibration: str = "none"
    """The calibration scored with (the calibration stage's choice), or 'auto' for that stage itself."""
    variants: dict = field(default_factory=dict)
    """Layer variants scored, name -> kept layers ({}: the full model alone)."""
    adapters: dict | None = None
    """The config of the adapters stage whose compact model is scored too (None: none)."""


class StageBase:
    """The resources the stages share, and ``stage``. ``planner`` (``study.cost.Planner``): plan instead of run."""

    def __init__(self, cfg: StudyConfig, report=print, use_cache: bool = True, compute: bool = True,
                 planner: Planner | None = None):
        self.stages = Stages(cfg.folder, report, use_cache, compute)
        self.cfg, self.report = cfg, self.stages.report  # under torchrun rank 0 alone reports (Stages decides)
        self.planner = planner
        self._models, self._preps = {}, {}  # (spec, tuned) -> (model, tokenizer); dataset -> Prepared

    def stage(self, name: str, config, compute: Callable[[Path], dict], dataset: str | None,
              cost: Callable[[tuple], None] | None, spec: str | None = None, planned: dict | None = None,
              main_only: bool = False) -> dict:
        """Stage ``name`` (of model ``spec``): its outputs, cached under the key of ``config`` (asdict) and the
        fingerprint of ``dataset``'s prepared data. Planning: the key is recorded, ``cost(at)`` records the
        stage's passes once, at = (spec, dataset, name), and ``planned`` (stand-ins for the outputs later
        stages read) is returned."""
        if self.planner is None:
            return self.stages(name, self.key_parts(config, dataset), compute, main_only=main_only)
        if name not in self.planner.keys:
            self.planner.keys[name] = store.config_hash(store.where_free(self.key_parts(config, dataset)))
            if cost is not None:
                cost((spec, dataset or self.cfg.dataset, name))
        return planned or {}

    def key_parts(self, config, dataset: str | None) -> dict:
        """What a stage's cache key is made of: its config and its data's fingerprint (no list by hand)."""
        prep = None if dataset is None else self.planner.data[dataset].prep if self.planner else self.prep(dataset)
        return {"config": asdict(config), "data": prep and prep.fingerprint}

    # -- shared resources, loaded lazily (a fully cached rerun loads no weights)
    def release(self) -> None:  # drop the model held in memory
        self._models.clear()

    @property
    def finetuning(self) -> bool:
        """Whether the study analyses a fine-tuned recommender (the config has a finetune section)."""
        return bool(self.cfg.finetune)

    def ft_config(self, spec: str):
        return self.cfg.finetune_config(spec)

    def shared(self, model: str, dataset: str) -> dict:
        """The shared settings (``Settings``) every stage's config gets from the study."""
        return self.cfg.settings(model, dataset)

    def label(self, spec: str, zeroshot: bool = False) -> str:
        """The name results are cached under: the spec, or spec+ft-<key> for the fine-tuned recommender."""
        if zeroshot or not self.finetuning:
            return spec
        key = {k: v for k, v in asdict(self.ft_config(spec)).items() if k != "results_dir"}
        return f"{spec}+ft-{store.config_hash(key)[:8]}"

    def scored(self, spec: str, dataset: str, users: int, zeroshot: bool = False, **fields) -> Scored:
        """A scoring stage's config: the shared settings of (the label of) ``spec`` on ``dataset``, and ``fields``."""
        return Scored(**self.shared(self.label(spec, zeroshot), dataset), users=users, **fields)

    def ft_folder(self, spec: str) -> Path:
        return self.stages.root / slug(spec) / slug(self.cfg.dataset) / "finetune" / "model"

    def model(self, spec: str, zeroshot: bool = False):
        """(model, tokenizer) that the stages analyse: the fine-tuned recommender unless ``zeroshot``."""
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
        if dataset not in self._preps:
            self._preps[dataset] = load(dataset, "auto", self.cfg.prep_config(), report=None)
        return self._preps[dataset]

    def evaluator(self, spec: str, dataset: str, split: str, users: int, zeroshot: bool = False, cold: bool = False):
        prep = self.prep(dataset)
        cands, _ = candidates_for(prep, CandidateConfig(self.cfg.negatives, "uniform", users, split, self.cfg.seed,
                                                        cold), self.cfg.candidates_dir)
        calibration = self.calibration(spec, dataset, zeroshot)["choice"]
        return TaskEvaluator(prep, cands, self.model(spec, zeroshot)[1], split=split,
                             max_title_tokens=self.cfg.max_title_tokens, calibration=calibration), cands

    def popularity(self, dataset: str, cands: pd.DataFrame) -> pd.DataFrame:
        """Per-user metrics of the popularity baseline on these candidate lists."""
        scores, pos = np.stack(popularity_scores(self.prep(dataset), cands)), cands["pos_index"].to_numpy()
        return metrics.per_user(metrics.pessimistic_ranks(scores, pos))

    def n_layers(self, spec: str) -> int:
        if self.planner is not None:
            return self.planner.shape(spec).n
        return PRESETS[spec].num_layers if spec in PRESETS else arch.num_layers(self.model(spec, zeroshot=True)[0])

    def k(self, spec: str) -> int:
        return self.cfg.k_of(self.n_layers(spec))
