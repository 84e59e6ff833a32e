"""Normalized depth: the one place that says where a layer sits in a model.

Depth of layer ``i`` of ``L`` is ``i / (L - 1)`` in [0, 1]. The thirds are depth < 1/3 (lower),
< 2/3 (middle) and the rest (upper). Models of different depth are compared on a common grid
of depths. Nothing here imports torch: adapters, selection, importance and plots use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REGIONS = ("lower", "middle", "upper")
"""The thirds of the depth, bottom to top."""
THIRD_EDGES = (1 / 3, 2 / 3)
"""Depth boundaries between the thirds (lower < 1/3 <= middle < 2/3 <= upper)."""


def depth(layers, n_layers: int) -> np.ndarray:
    """Normalized depth i / (L - 1) of each layer index, in [0, 1] (0 for a one-layer model)."""
    return np.asarray(layers, dtype=float) / max(1, n_layers - 1)


def region(i: int, n_layers: int) -> str:
    """'lower', 'middle' or 'upper' third of layer ``i``; 'embedding' for i < 0, 'norm' for i >= L."""
    if i < 0:
        return "embedding"
    if i >= n_layers:
        return "norm"
    d = float(depth(i, n_layers))
    return REGIONS[0] if d < THIRD_EDGES[0] else REGIONS[1] if d < THIRD_EDGES[1] else REGIONS[2]


def thirds(layers: Sequence[int], n_layers: int) -> dict[str, int]:
    """How many of ``layers`` fall in the lower, middle and upper third."""
    out = dict.fromkeys(REGIONS, 0)
    for i in layers:
        out[region(int(i), n_layers)] += 1
    return out


def profile_on_grid(values, grid: np.ndarray) -> np.ndarray:
    """A per-layer profile interpolated onto a common normalized-depth grid."""
    values = np.asarray(values, dtype=float)
    return np.interp(grid, depth(range(len(values)), len(values)), values)


def depth_overlap(a: list[int], la: int, b: list[int], lb: int, bins: int = 10) -> float:
    """Jaccard overlap of the depth bins (tenths of the depth) two selections occupy."""
    ba = set(np.minimum((depth(a, la) * bins).astype(int), bins - 1))
    bb = set(np.minimum((depth(b, lb) * bins).astype(int), bins - 1))
    return len(ba & bb) / max(1, len(ba | bb))


def map_reference(layers: list[int], ref_layers: int, n_layers: int) -> list[int]:
    """A selection reported for a ``ref_layers``-layer model, mapped onto ``n_layers`` by depth."""
    return sorted({int(round(x)) for x in depth(layers, ref_layers) * (n_layers - 1)})


def without_lower_third(n_layers: int) -> list[int]:
    """Every layer whose depth is at least 1/3 (the model without its lower third)."""
    return [i for i in range(n_layers) if region(i, n_layers) != REGIONS[0]]
