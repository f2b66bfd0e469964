"""Pure functions over results: Pareto frontiers of metric versus cost (sweeps, dashboard, reports)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(costs: Sequence[float], metrics: Sequence[float], *, maximize: bool = True) -> list[int]:
    """Indices of the Pareto-optimal points, cheapest first: no other point costs at most as much and
    scores at least as well with one of the two strictly better. Points with a missing or non-finite
    cost or metric are never on the front; of exact duplicates, the first one is kept."""
    if len(costs) != len(metrics):
        raise ValueError(f"pareto_front: {len(costs)} costs but {len(metrics)} metrics")
    valid = [i for i in range(len(costs)) if _finite(costs[i]) and _finite(metrics[i])]
    sign = 1.0 if maximize else -1.0
    # cheapest first; at equal cost the best metric first, so it dominates the others at that cost
    order = sorted(valid, key=lambda i: (costs[i], -sign * metrics[i], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        score = sign * metrics[i]
        if score > best:
            front.append(i)
            best = score
    return front


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
