"""A whole study: ``layerviz run CONFIG`` and the notebooks.

- ``config``: ``StudyConfig`` and its validation;
- ``stages``: each stage, cached by ``store.Stages``; ``runner``: the stages in order;
- ``result``: ``StudyResult``, the tidy frames everything downstream reads;
- ``tables`` and ``hypotheses``: one function per table and per claim; ``text``: the notebooks' sentences;
- ``depth``: normalized depth and thirds;
- ``cost`` (on ``workload``): ``plan``, what every stage will cost before anything runs (``--plan``).

Names are imported lazily (PEP 562), so that ``layerviz.study.depth``, which adapters and selection
use, does not pull in the runner (and through it those very modules).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "StudyConfig": "config", "smoke_config": "config", "describe_base": "config", "STUDY_OWNED": "config",
    "Study": "stages",
    "run": "runner", "run_study": "runner", "notebook_study": "runner", "open_study": "runner",
    "pick_models": "runner", "all_tables": "runner",
    "StudyResult": "result", "collect": "result",
    "headline": "tables", "thirds_table": "tables", "variants_table": "tables", "cross_model": "tables",
    "cross_domain": "tables", "finetune_table": "tables", "importance_shift": "tables", "verdict": "tables",
    "relation": "tables", "spearman_ci": "tables",
    "hypotheses": "hypotheses",
    "plan": "cost", "by_stage": "cost_tables", "recorded": "cost_tables", "against_run": "cost_tables",
    "minutes": "cost_tables",
    "profile_on_grid": "depth", "depth_overlap": "depth", "map_reference": "depth",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"layerviz.study.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'layerviz.study' has no attribute {name!r}")
