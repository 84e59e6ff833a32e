"""The settings every job shares, with one set of defaults.

``EvalConfig``, ``ImportanceConfig``, ``SelectConfig``, ``AdaptConfig``, ``BenchConfig`` and
``FinetuneConfig`` inherit ``Settings``; the CLI builds each command's flags from these fields and their
docstrings (``layerviz.cli``), and a study sets them once for all its stages (``StudyConfig``).
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

from layerviz.data.prepare import PrepConfig


@dataclass
class Settings:
    """Model, data protocol, candidates, seed and device: what every job needs to know."""

    model: str = "smollm2-135m"
    """Model preset (`layerviz models`), hub id, local folder or .gguf file."""
    dataset: str = "synthetic-electronics"
    """A real dataset name (ml-100k, ml-1m: `layerviz data list`), a SYNTHETIC one (synthetic-electronics,
    synthetic-movies: for tests), a folder of official or RecBole atomic files, or a file."""
    format: str = "auto"
    """Dataset format (auto: detected from the files; recbole for atomic files)."""
    title_field: str | None = None
    """RecBole atomic files: the .item field holding titles (None: title, movie_title, item_name or name)."""
    item_noun: str | None = None
    """What the prompts call the items ('movies', 'products', 'games', ...; 'game/games' gives the singular).
    None: the dataset's default (movies for MovieLens, products for Amazon, items for RecBole files)."""
    cold_items: float = 0.0
    """Item cold start: this seeded fraction of items (in (0, 0.5]) is removed from training entirely; 0: off."""
    positive_threshold: float = 4.0
    """Protocol: a rating counts as a positive interaction when it is at least this."""
    kcore: int = 5
    """Protocol: users and items are filtered to at least this many positives (k-core)."""
    history_len: int = 20
    """Protocol: the most recent positives shown to the model as the user's history."""
    max_title_tokens: int = 32
    """Each title is cut to this many tokens (prompt length, and the LM-head work per candidate)."""
    negatives: int = 19
    """Sampled negatives per candidate list: each user ranks 1 positive + this many (19 or 99)."""
    seed: int = 0
    """Fixes users, candidates, sampling and training order."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (None: float32 on CPU, bfloat16 on CUDA)."""
    results_dir: str = "results"
    """Where caches, candidate lists and results live (candidates under results_dir/candidates)."""

    def prep_config(self) -> PrepConfig:
        """The protocol these settings describe (threshold, k-core, history length, noun, titles, cold start)."""
        return PrepConfig(self.positive_threshold, self.kcore, self.history_len, self.item_noun, self.title_field,
                          self.cold_items, self.seed)

    @property
    def candidates_dir(self) -> Path:
        """The seeded candidate lists' folder (shared by every job of this results_dir)."""
        return Path(self.results_dir) / "candidates"


SHARED = tuple(f.name for f in fields(Settings))
"""The names of the shared settings."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal after it), over the class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(inspect.getsource(klass).lstrip())
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:], strict=False):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs
