"""A whole study: ``layerviz run CONFIG`` and the notebooks.

- ``config``: ``StudyConfig`` and its validation;
- ``stages`` (with ``baseline_stages``): each stage, cached by ``store.Stages``; ``runner``: the stages in order;
- ``result``: ``StudyResult``, the tidy frames everything downstream reads;
- ``tables`` and ``hypotheses`` (modules): one function per table and per claim; ``text``: the notebooks' sentences;
- ``cost`` (on ``workload``): the ``Planner`` each stage's cost function records into; ``runner.plan`` walks
  the stages with it: what every stage will cost before anything runs (``--plan``).

Normalized depth lives below the whole package, in ``layerviz.depth``.
"""

from layerviz.depth import depth_overlap, map_reference, profile_on_grid
from layerviz.study.config import STUDY_OWNED, StudyConfig, describe_base, smoke_config
from layerviz.study.cost_tables import against_run, by_stage, minutes, recorded_passes
from layerviz.study.result import StudyResult, collect
from layerviz.study.runner import (
    all_tables,
    notebook_study,
    open_study,
    pick_models,
    plan,
    run,
    run_study,
)
from layerviz.study.stages import Study
from layerviz.study.tables import (
    cross_domain,
    cross_model,
    finetune_table,
    headline,
    importance_shift,
    relation,
    spearman_ci,
    thirds_table,
    variants_table,
    verdict,
)

__all__ = [
    "STUDY_OWNED", "Study", "StudyConfig", "StudyResult", "against_run", "all_tables", "by_stage", "collect",
    "cross_domain", "cross_model", "depth_overlap", "describe_base", "finetune_table", "headline",
    "importance_shift", "map_reference", "minutes", "notebook_study", "open_study", "pick_models", "plan",
    "profile_on_grid", "recorded_passes", "relation", "run", "run_study", "smoke_config", "spearman_ci", "thirds_table",
    "variants_table", "verdict",
]
