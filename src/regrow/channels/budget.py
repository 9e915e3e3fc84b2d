"""HALP's augmented knapsack: keep a prefix of every layer's importance-ordered groups under a latency budget.

Each layer ("coupled channel group" here) offers k = k_min..K groups of channels, the k most important ones
(a prefix), with a total value (their summed importance) and a total cost (the layer's latency with k·G
channels). One option per layer is chosen so that the summed cost stays within the budget and the summed
value is maximal: a multiple-choice knapsack, solved exactly by dynamic programming over costs put on an integer
grid. Costs are rounded *up* to the grid, so the chosen set always meets the real budget; with integer costs
and the default grid the answer is the exact optimum.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .groups import OUT, ChannelGroup


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


class ChannelBudget:
    """The allocation piece of the channel methods: what a choice of kept channels costs, and the most important
    channels that fit a cost.

    Args:
        model: the network the groups belong to.
        groups: its coupled channel groups (:func:`regrow.channels.groups.channel_groups`) that may be pruned.
        cost_model: a callable ``(layer, c_in, c_out) -> cost`` with the ``shapes`` of the layers it prices
            (:mod:`regrow.channels.costs`: a measured latency table, or MACs).
        group_size: G, channels per knapsack item (a group with its own ``chunk``, an attention head group, uses
            that instead: one head per item).
        resolution: grid steps of the knapsack's budget.
        min_width: the fraction of every group's channels that every answer keeps at least (rounded up to whole
            chunks; default 0: one chunk). On noisy importance (a model near its random initialisation) the
            knapsack alone can cut a layer to one chunk, e.g. MobileNetV2's last 1×1 conv to 4 of its 1280 channels.
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], cost_model, group_size: int,
                 resolution: int | None = 2000, min_width: float = 0.0):
        if not isinstance(min_width, (int, float)) or isinstance(min_width, bool) or not 0.0 <= min_width < 1.0:
            raise ConfigError(f"min_width is a fraction of every group's channels in [0, 1), got {min_width!r}")
        self.groups, self.cost_model = list(groups), cost_model
        self.group_size, self.resolution, self.min_width = group_size, resolution, float(min_width)
        self._wire_layers(model)

    def fewest(self, i: int) -> int:
        """The fewest channels group ``i`` may keep: one chunk, or ``min_width`` of it in whole chunks."""
        chunk, size = self.chunk(i), self.groups[i].size
        return min(size, max(chunk, math.ceil(self.min_width * size / chunk - 1e-9) * chunk))

    def _wire_layers(self, model: nn.Module) -> None:
        """For every costed layer: which group sets its output width and which groups its input width."""
        modules = dict(model.named_modules())
        self._costed = list(self.cost_model.shapes)
        self._out_group: dict[str, tuple[int, int]] = {}  # layer -> (group, its output rows per group unit)
        self._in_groups: dict[str, list[tuple[int, int]]] = {n: [] for n in self._costed}
        for i, group in enumerate(self.groups):
            for name, role, idxs in group.members:
                if name not in self._in_groups:
                    continue
                if role == OUT:
                    self._out_group[name] = (i, len(idxs) // group.size)
                elif getattr(modules[name], "groups", 1) == 1:
                    self._in_groups[name].append((i, len(idxs) // group.size))
        self._full = {}
        for name in self._costed:
            if self.cost_model.shapes[name].fixed is not None:  # not a module (nn.MultiheadAttention's q/k/v)
                self._full[name] = self.cost_model.shapes[name].fixed
                continue
            m = modules[name]
            full_in, full_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels,
                                                                                                m.out_channels)
            self._full[name] = (full_in, full_out)

    def channel_widths(self, kept: list[int]) -> dict[str, tuple[int, int]]:
        """(c_in, c_out) of every costed layer when group i keeps ``kept[i]`` channels."""
        widths = {}
        for name in self._costed:
            full_in, full_out = self._full[name]
            if name in self._out_group:
                i, factor = self._out_group[name]
                c_out = kept[i] * factor
            else:
                c_out = full_out
            if self.cost_model.shapes[name].depthwise:
                c_in = c_out
            else:
                pruned = sum((self.groups[i].size - kept[i]) * factor for i, factor in self._in_groups[name])
                c_in = full_in - pruned
            widths[name] = (c_in, c_out)
        return widths

    def cost_of(self, kept: list[int]) -> float:
        return float(sum(self.cost_model(n, c_in, c_out) for n, (c_in, c_out) in self.channel_widths(kept).items()))

    def width_grid(self) -> dict[str, tuple[list[int], list[int]]]:
        """Every (c_in, c_out) a layer can take when each group keeps a multiple of G channels (or all):
        the cells the knapsack asks the cost model for."""
        def options(i: int) -> list[int]:
            size, chunk = self.groups[i].size, self.chunk(i)
            return sorted(set(range(chunk, size + 1, chunk)) | {size})

        grid = {}
        for name in self._costed:
            full_in, full_out = self._full[name]
            if name in self._out_group:
                i, factor = self._out_group[name]
                outs = [k * factor for k in options(i)]
            else:
                outs = [full_out]
            ins = self._in_groups[name]
            if self.cost_model.shapes[name].depthwise:
                grid[name] = (outs, outs)
            elif len(ins) == 1:
                (i, factor), = ins
                size = self.groups[i].size
                grid[name] = ([full_in - (size - k) * factor for k in options(i)], outs)
            else:  # unpruned input, or several groups concatenated (those are measured when first asked for)
                grid[name] = ([full_in], outs)
        return grid

    SAVE_EVERY_CELLS = 200  # cells measured between two saves of an unfinished table

    DENSE_RETIMES = 2  # more timings of each dense cell at the end of a build that measured anything

    def precompute(self, progress: bool = False) -> int:
        """Ask the cost model for every cell of :meth:`width_grid` now (a latency table measures them once, on an
        idle machine, instead of in the middle of training) and save the cache; returns the number of cells.
        A build that measured anything then times every cell of the dense network :attr:`DENSE_RETIMES` times
        more and keeps each one's median (:meth:`regrow.channels.costs.LatencyTable.retime`): the dense sum is the
        denominator of every budget and predicted fraction, and the end of the build is another moment of the
        machine than its start, when the dense cells were timed first."""
        cells = sorted({(n, ci, co) for n, (ins, outs) in self.width_grid().items()
                        for ci in ins for co in outs if not self.cost_model.shapes[n].depthwise or ci == co})
        from tqdm.auto import tqdm

        measured = getattr(self.cost_model, "measurements", 0)
        for i, (name, c_in, c_out) in enumerate(tqdm(cells, disable=not progress, desc="latency table",
                                                     leave=False)):
            self.cost_model(name, c_in, c_out)
            if (i + 1) % self.SAVE_EVERY_CELLS == 0:  # a table of thousands of cells takes most of an hour:
                self.save_costs()  # an interrupted build keeps what it measured, and a rerun measures the rest
        if hasattr(self.cost_model, "retime") and self.cost_model.measurements > measured:
            timed = set()  # layers of one shape share a cell: each is timed again once
            for name, (c_in, c_out) in self.channel_widths([g.size for g in self.groups]).items():
                cell = (self.cost_model.shapes[name].key(), c_in, c_out)
                if cell not in timed:
                    timed.add(cell)
                    self.cost_model.retime(name, c_in, c_out, self.DENSE_RETIMES)
        self.save_costs()
        return len(cells)

    def save_costs(self) -> None:
        """Write the cost model's cache (a latency table keeps what it measured; MACs have nothing to keep)."""
        if hasattr(self.cost_model, "save"):
            self.cost_model.save()

    def select(self, scores: list[torch.Tensor], budget: float, allowed: list[torch.Tensor],
               forced: list[torch.Tensor] | None = None, rounds: int = 4, steps: int = 14,
               best_effort: bool = False) -> list[torch.Tensor]:
        """Kept channels per group: the most important ``allowed`` ones, ``forced`` ones first, a prefix per
        group, at most ``budget`` by the cost model.

        A layer's cost depends on its input width, which another group decides, so the knapsack charges input
        widths at a reference (HALP: the current widths). Charged costs are then only a proxy for the real cost of
        an answer; so the room given to the knapsack is bisected until the *real* cost of its answer meets the
        budget as closely as it can, and the reference is moved to that answer for another round. The best answer
        within the budget wins; if none is found (a noisy table that is not monotone), chunks are dropped greedily.
        ``best_effort``: a budget below the fewest allowed channels gives those (IEE's prune to (1 − Ω)·budget
        can ask for less than the model can reach) instead of an error. Every group keeps at least
        :meth:`fewest` channels (its most important allowed ones), or every allowed one where fewer are allowed.
        """
        forced = forced or [torch.zeros_like(a) for a in allowed]
        orders, values, min_groups = [], [], []
        for i, (score, allow, force) in enumerate(zip(scores, allowed, forced)):
            G = self.chunk(i)
            first = torch.nonzero(force).flatten()
            rest = torch.nonzero(allow & ~force).flatten()
            order = torch.cat([first[torch.argsort(score[first], descending=True, stable=True)],
                               rest[torch.argsort(score[rest], descending=True, stable=True)]])
            orders.append(order)
            values.append([float(score[order[j * G:(j + 1) * G]].sum()) for j in range(math.ceil(len(order) / G))])
            floor = min(len(order), self.fewest(i))
            min_groups.append(max(1, math.ceil(len(first) / G), math.ceil(floor / G)))
        best, best_value = None, -math.inf

        def consider(groups: list[int]) -> bool:
            nonlocal best, best_value
            keeps = self._keeps(orders, groups)
            if self.cost_of([int(k.sum()) for k in keeps]) > budget * (1 + 1e-9):
                return False
            value = sum(float(s[k].sum()) for s, k in zip(scores, keeps))
            if value > best_value:
                best, best_value = keeps, value
            return True

        reference = self._on_grid([int(a.sum()) for a in allowed])
        for _ in range(rounds):
            costs = self._group_costs(orders, values, reference)
            cheapest = sum(min(row[m - 1:]) for row, m in zip(costs, min_groups))
            dearest = sum(max(row[m - 1:]) for row, m in zip(costs, min_groups))

            def solve(room: float, costs=costs) -> list[int]:
                return prefix_knapsack(values, costs, room, min_groups, self.resolution)

            if consider(solve(dearest)):
                break  # everything allowed fits
            lo, hi, answer = cheapest, dearest, None
            if consider(solve(lo)):
                answer = solve(lo)
                for _ in range(steps):
                    mid = (lo + hi) / 2
                    groups = solve(mid)
                    if consider(groups):
                        lo, answer = mid, groups
                    else:
                        hi = mid
            if answer is None:  # even the fewest chunks overshoot at this reference: re-centre it on them
                new_reference = self._on_grid([int(k.sum()) for k in self._keeps(orders, min_groups)])
                if new_reference == reference:
                    break
                reference = new_reference
                continue
            new_reference = self._on_grid([int(k.sum()) for k in self._keeps(orders, answer)])
            if new_reference == reference:
                break
            reference = new_reference
        if best is None:  # a measured table that is not monotone defeated every solve: drop chunks greedily
            best = self._greedy_fit(orders, values, min_groups, budget)
        if best is not None:  # the proxy leaves room unused: add the best-value chunks that still fit
            best = self._greedy_fill(orders, values, best, budget)
        if best is None and best_effort:
            best = self._keeps(orders, min_groups)
        if best is None:
            raise ConfigError(f"could not meet the budget {budget:.4g} {self.cost_model.unit} even with the fewest "
                              "channels allowed")
        return best

    def chunk(self, i: int) -> int:
        """Units of group ``i`` per knapsack item: G, or the group's own (one attention head)."""
        return self.groups[i].chunk or self.group_size

    def _keeps(self, orders: list[torch.Tensor], groups: list[int]) -> list[torch.Tensor]:
        keeps = []
        for i, (order, k) in enumerate(zip(orders, groups)):
            keep = torch.zeros(self.groups[i].size, dtype=torch.bool)
            keep[order[: min(k * self.chunk(i), len(order))]] = True
            keeps.append(keep)
        return keeps

    def _greedy_fill(self, orders, values, keeps: list[torch.Tensor], budget: float) -> list[torch.Tensor]:
        """Add chunks, the most importance per unit of real cost first, while the real cost stays in budget."""
        groups = [math.ceil(int(k.sum()) / self.chunk(i)) if int(k.sum()) < len(o) else len(v)
                  for i, (k, o, v) in enumerate(zip(keeps, orders, values))]
        current = self._keeps(orders, groups)
        if any(not torch.equal(a, b) for a, b in zip(current, keeps)):
            return keeps  # the answer is not a chunk prefix (forced channels not a multiple of G): keep it as is
        cost = self.cost_of([int(k.sum()) for k in current])
        while True:
            best_gain, best_i, best_cost = -math.inf, None, None
            for i, g in enumerate(groups):
                if g >= len(values[i]):
                    continue
                trial = list(groups)
                trial[i] += 1
                new_cost = self.cost_of([int(k.sum()) for k in self._keeps(orders, trial)])
                if new_cost > budget * (1 + 1e-9):
                    continue
                gain = values[i][g] / max(new_cost - cost, 1e-12 * max(abs(budget), 1.0))
                if gain > best_gain:
                    best_gain, best_i, best_cost = gain, i, new_cost
            if best_i is None:
                return self._keeps(orders, groups)
            groups[best_i] += 1
            cost = best_cost

    def _greedy_fit(self, orders, values, min_groups, budget: float) -> list[torch.Tensor] | None:
        """Start from every allowed chunk and drop the least important last chunk of any group until the real
        cost fits: always ends, and finds an answer whenever the fewest allowed chunks fit."""
        groups = [len(v) for v in values]
        while True:
            keeps = self._keeps(orders, groups)
            if self.cost_of([int(k.sum()) for k in keeps]) <= budget:
                return keeps
            candidates = [i for i, g in enumerate(groups) if g > min_groups[i]]
            if not candidates:
                return None
            weakest = min(candidates, key=lambda i: values[i][groups[i] - 1])
            groups[weakest] -= 1

    def _on_grid(self, counts: list[int]) -> list[int]:
        """Round channel counts up to a multiple of G (or the group's size): the widths the cost table holds."""
        return [min(g.size, math.ceil(c / self.chunk(i)) * self.chunk(i))
                for i, (c, g) in enumerate(zip(counts, self.groups))]

    def _group_costs(self, orders, values, reference_counts: list[int]) -> list[list[float]]:
        """Each group's cost when it keeps k chunks, its layers' input widths charged at ``reference_counts``.
        Layers that no group prunes are left out (a constant)."""
        reference = self.channel_widths(reference_counts)
        costs = []
        for i, order in enumerate(orders):
            layers = [(n, factor) for n, (g, factor) in self._out_group.items() if g == i]
            row = []
            for k in range(1, len(values[i]) + 1):
                width = min(k * self.chunk(i), len(order))
                row.append(sum(self.cost_model(n, width * f if self.cost_model.shapes[n].depthwise else reference[n][0],
                                               width * f) for n, f in layers))
            # A wider layer is never cheaper: a measured table can say so (noise), and the knapsack would then
            # add chunks "for free" that cost real latency.
            costs.append(list(itertools.accumulate(row, max)))
        return costs
