"""Counts of the model passes a computation runs, by kind: what ``layerviz run CONFIG --plan`` predicts and
what every study stage records in its ``done.json`` (``passes``).

A pass is one sequence through the model, however it is batched: batching changes the speed, not the work.

- ``prefix``: a user's history prompt (once per user and scoring; the candidates run behind it);
- ``candidate``: one candidate title scored behind a history;
- ``prior``: one title scored behind an empty history (the ``pmi`` calibration's prior, once per title and model);
- ``probe``: a probe prompt through the whole model (importance pass, teacher states, adapter
  validation, angular distances);
- ``ablation``: a probe prompt with one layer skipped (the loss ablation);
- ``backward``: a prompt back-propagated (Fisher, fine-tuning and adapter training examples);
- ``subset``: a layer subset evaluated on the validation users (its prefixes and candidates count above);
- ``train``: an optimizer step through the model (fine-tuning, adapter stage 2);
- ``prefill``: a timed prompt of the bench (``seq_len`` tokens).

Counting is cheap (a dict add) and off unless a ``recording()`` is open; nested recordings count
exclusively (a stage computed inside another stage's computation is not counted twice).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

KINDS = ("prefix", "candidate", "prior", "probe", "ablation", "backward", "subset", "train", "prefill")
# the same in every process under torchrun (each process runs every step on its share of the examples)
PER_RUN = ("subset", "train")

_open: list[Counter] = []


def count(kind: str, n: int = 1) -> None:
    """Add ``n`` passes of ``kind`` to the innermost open recording (nothing when none is open)."""
    if kind not in KINDS:
        raise ValueError(f"unknown pass kind {kind!r}; one of {', '.join(KINDS)}")
    if _open and n:
        _open[-1][kind] += int(n)


@contextmanager
def recording():
    """Count the passes run inside the block (and not inside a recording nested in it) -> a Counter."""
    counter: Counter = Counter()
    _open.append(counter)
    try:
        yield counter
    finally:
        _open.pop()


def combine(per_process: list[dict]) -> dict[str, int]:
    """The run's counts from each process's: shares of the examples add up, steps and subsets are the same."""
    out: dict[str, int] = {}
    for kind in KINDS:
        vals = [int(p.get(kind, 0)) for p in per_process]
        total = max(vals) if kind in PER_RUN else sum(vals)
        if total:
            out[kind] = total
    return out
