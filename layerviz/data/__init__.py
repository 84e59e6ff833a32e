"""Recommendation data: official-format readers, the shared protocol, fixed candidate lists."""

from __future__ import annotations

from collections.abc import Callable

from layerviz.data.bundled import BUNDLED, resolve
from layerviz.data.candidates import CandidateConfig, build_candidates, candidates_for
from layerviz.data.formats import DataFormatError, DataWarning, RawData, read_dataset
from layerviz.data.prepare import Prepared, PrepConfig, prepare

__all__ = [
    "BUNDLED", "CandidateConfig", "DataFormatError", "DataWarning", "PrepConfig", "Prepared",
    "RawData", "build_candidates", "candidates_for", "load", "prepare", "read_dataset", "resolve",
]


def load(dataset: str, format: str = "auto", config: PrepConfig | None = None,
         report: Callable[[str], None] | None = print) -> Prepared:
    """Read a bundled name, folder or file and apply the protocol -> Prepared."""
    raw = read_dataset(resolve(dataset), format, report=report)
    if dataset in BUNDLED:
        raw.name = dataset
    return prepare(raw, config, report=report)
