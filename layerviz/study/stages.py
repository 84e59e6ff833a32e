"""``Study``: every stage of a study, each a method that holds, side by side, its config (a dataclass: what decides
its outputs, the cache key with the data's fingerprint), its compute function and its cost function (``--plan``).

- ``stage_base``: the shared resources (models and data, loaded lazily) and ``stage``, which caches or plans;
- ``model_stages``: fine-tuning, calibration, the zero-shot and fine-tuned model on test users, importance;
- ``select_stages``: selections, the RQ2 curves, the test evaluation of plain-dropping variants;
- ``compact_stages``: adapters, transfer to the transfer dataset, the cold-start test set, the bench;
- ``baseline_stages``: SASRec, popularity and the positives' slices (model-free).

``runner.run_model`` calls them in order, to run a study and (with a planner) to plan it.
"""

from __future__ import annotations

from layerviz.study.baseline_stages import BaselineStages
from layerviz.study.compact_stages import CompactStages
from layerviz.study.model_stages import ModelStages
from layerviz.study.select_stages import SelectStages
from layerviz.study.stage_base import StageBase


class Study(ModelStages, SelectStages, CompactStages, BaselineStages, StageBase):
    """Executes a StudyConfig (or, with ``planner``, plans it); every stage cached under results_dir/name/."""
