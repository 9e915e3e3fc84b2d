"""HALP's augmented knapsack: keep a prefix of every layer's importance-ordered groups under a latency budget.

Each layer ("coupled channel group" here) offers k = k_min..K groups of channels, the k most important ones
(a prefix), with a total value (their summed importance) and a total cost (the layer's latency with k·G
channels). One option per layer is chosen so that the summed cost stays within the budget and the summed
value is maximal: a multiple-choice knapsack, solved exactly by dynamic programming over costs put on an integer
grid. Costs are rounded *up* to the grid, so the chosen set always meets the real budget; with integer costs
and the default grid the answer is the exact optimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError


def prefix_knapsack(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
                    min_groups: Sequence[int] | None = None, resolution: int | None = 4000) -> list[int]:
    """How many groups every layer keeps.

    Args:
        values: per layer, the importance of its groups in the order they must be kept (most important first;
            the k-th option keeps the first k).
        costs: per layer, ``costs[l][k-1]`` = the layer's cost when it keeps k groups (cumulative, any sign).
        budget: the largest allowed sum of costs.
        min_groups: per layer, the fewest groups it may keep (default 1: no layer disappears). IEE forces its
            active groups in this way, ordering them first.
        resolution: number of grid steps the budget is split into; ``None`` for integer costs used as they are.

    Returns the kept group count per layer. Raises :class:`ConfigError` when even the smallest allowed choice
    exceeds the budget.
    """
    if len(values) != len(costs):
        raise ConfigError("values and costs need one entry per layer")
    layers = len(values)
    min_groups = [1] * layers if min_groups is None else list(min_groups)
    options = []
    for layer, (v, c, lo) in enumerate(zip(values, costs, min_groups)):
        if len(v) != len(c) or not v:
            raise ConfigError(f"layer {layer}: need one value and one cost per group (got {len(v)} and {len(c)})")
        if not 1 <= lo <= len(v):
            raise ConfigError(f"layer {layer}: min_groups={lo} outside 1..{len(v)}")
        cumulative = np.cumsum(np.asarray(v, dtype=np.float64))
        options.append((lo, cumulative[lo - 1:], np.asarray(c, dtype=np.float64)[lo - 1:]))
    # Shift every layer by its cheapest option: the DP then runs over non-negative extra costs.
    floor = sum(float(c.min()) for _, _, c in options)
    slack = budget - floor
    if slack < -1e-9 * max(1.0, abs(budget)):
        raise ConfigError(f"the budget {budget:.6g} is below the cheapest allowed choice {floor:.6g} "
                          "(every layer at its fewest groups)")
    slack = max(slack, 0.0)
    if resolution is None:
        scale, bins = 1.0, int(math.floor(slack + 1e-9))
    else:
        scale = resolution / slack if slack > 0 else 1.0
        bins = resolution if slack > 0 else 0
    best = np.zeros(bins + 1)  # best value with extra cost <= b (monotone in b)
    choices = []
    for lo, value, cost in options:
        extra = cost - cost.min()
        grid = np.rint(extra) if resolution is None else np.ceil(extra * scale - 1e-9)
        steps = grid.astype(np.int64)
        new = np.full(bins + 1, -np.inf)
        pick = np.zeros(bins + 1, dtype=np.int64)
        for k in range(len(value)):
            s = steps[k]
            if s > bins:
                continue
            candidate = np.full(bins + 1, -np.inf)
            candidate[s:] = best[: bins + 1 - s] + value[k]
            better = candidate > new
            new[better], pick[better] = candidate[better], k
        best = new
        choices.append((lo, steps, pick))
    # Backtrack from the full budget.
    kept = [0] * layers
    b = bins
    for layer in range(layers - 1, -1, -1):
        lo, steps, pick = choices[layer]
        k = int(pick[b])
        kept[layer] = lo + k
        b -= int(steps[k])
    return kept
