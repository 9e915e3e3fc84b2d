import itertools
import random

import pytest

from regrow import ConfigError
from regrow.channels.budget import prefix_knapsack


def brute_force(values, costs, budget, min_groups):
    best, best_value = None, -1.0
    for ks in itertools.product(*[range(lo, len(v) + 1) for v, lo in zip(values, min_groups)]):
        cost = sum(c[k - 1] for c, k in zip(costs, ks))
        value = sum(sum(v[:k]) for v, k in zip(values, ks))
        if cost <= budget and value > best_value:
            best, best_value = ks, value
    return best, best_value


@pytest.mark.parametrize("seed", range(40))
def test_equals_brute_force_on_small_integer_instances(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 4)
    values = [sorted((rng.uniform(0, 10) for _ in range(rng.randint(1, 4))), reverse=True) for _ in range(layers)]
    costs = []
    for v in values:  # cumulative latency of k groups: roughly increasing, with measurement-like dips allowed
        c, total = [], rng.randint(0, 5)
        for _ in v:
            total += rng.randint(-1, 6)
            c.append(max(total, 0))
        costs.append(c)
    min_groups = [rng.randint(1, len(v)) for v in values]
    cheapest = sum(min(c[lo - 1:]) for c, lo in zip(costs, min_groups))
    budget = cheapest + rng.randint(0, 15)
    kept = prefix_knapsack(values, costs, budget, min_groups, resolution=None)
    _, best_value = brute_force(values, costs, budget, min_groups)
    value = sum(sum(v[:k]) for v, k in zip(values, kept))
    assert value == pytest.approx(best_value)
    assert sum(c[k - 1] for c, k in zip(costs, kept)) <= budget
    assert all(lo <= k <= len(v) for k, v, lo in zip(kept, values, min_groups))


@pytest.mark.parametrize("seed", range(10))
def test_float_costs_never_exceed_the_budget(seed):
    rng = random.Random(seed)
    values = [sorted((rng.random() for _ in range(8)), reverse=True) for _ in range(6)]
    costs = [list(itertools.accumulate(rng.uniform(0.1, 1.0) for _ in range(8))) for _ in range(6)]
    budget = 0.5 * sum(c[-1] for c in costs)
    kept = prefix_knapsack(values, costs, budget, resolution=500)
    assert sum(c[k - 1] for c, k in zip(costs, kept)) <= budget
    # Near-optimal: within the grid's rounding of the exact answer on a finer grid.
    fine = prefix_knapsack(values, costs, budget, resolution=20000)
    assert sum(sum(v[:k]) for v, k in zip(values, kept)) >= 0.95 * sum(sum(v[:k]) for v, k in zip(values, fine))


def test_a_budget_below_the_fewest_groups_is_an_error():
    with pytest.raises(ConfigError, match="below the cheapest"):
        prefix_knapsack([[3.0, 1.0]], [[5.0, 8.0]], budget=4.0)
    with pytest.raises(ConfigError, match="min_groups"):
        prefix_knapsack([[3.0, 1.0]], [[5.0, 8.0]], budget=10.0, min_groups=[3])
