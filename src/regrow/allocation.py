"""Allocation: how many weights each layer keeps, for a global target sparsity S.

Everything returns integer *keep counts* per layer, so "exact sparsity per layer" is a property of the counts
and not of floating-point rounding later on. For ``erk``, ``er`` and ``global`` the counts add up to
round((1 - S)·N) exactly; ``uniform`` rounds each layer on its own (and leaves optional first/last layers dense).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError, check_sparsity, unknown

DISTRIBUTIONS = ("uniform", "global", "er", "erk")


def _er_score(shape: torch.Size, with_kernel: bool) -> float:
    n_out, n_in = shape[0], shape[1]
    kernel = list(shape[2:]) if with_kernel else []
    numel = n_out * n_in * math.prod(kernel)
    return (n_out + n_in + sum(kernel)) / numel


def erk_densities(shapes: dict[str, torch.Size], sparsity: float, with_kernel: bool = True) -> dict[str, float]:
    """ERK (``with_kernel``) or ER densities.

    d_l = eps * score_l with eps chosen so that sum d_l N_l = (1 - S) sum N_l; any layer whose density would
    exceed 1 is made dense, taken out of the pool, and eps is solved again until none does.
    """
    sparsity = check_sparsity(sparsity)
    numel = {n: torch.Size(s).numel() for n, s in shapes.items()}
    score = {n: _er_score(torch.Size(s), with_kernel) for n, s in shapes.items()}
    dense: set[str] = set()
    budget_total = (1.0 - sparsity) * sum(numel.values())
    while True:
        pool = [n for n in shapes if n not in dense]
        budget = budget_total - sum(numel[n] for n in dense)
        if not pool:
            break
        eps = budget / sum(score[n] * numel[n] for n in pool)
        too_dense = [n for n in pool if eps * score[n] > 1.0]
        if not too_dense:
            break
        # Only the largest offender is made dense per round, as in the RigL reference: others may fit afterwards.
        dense.add(max(too_dense, key=lambda n: score[n]))
    return {n: 1.0 if n in dense else eps * score[n] for n in shapes}


def _counts_summing_to(raw: dict[str, float], numel: dict[str, int], total: int) -> dict[str, int]:
    """Integer counts close to ``raw`` whose sum is exactly ``total`` (largest remainders get the extra ones)."""
    counts = {n: min(int(math.floor(raw[n])), numel[n]) for n in raw}
    spare = total - sum(counts.values())
    order = sorted(raw, key=lambda n: (raw[n] - math.floor(raw[n])), reverse=True)
    step = 1 if spare >= 0 else -1
    i = 0
    while spare != 0 and i < 10 * len(order) + 10:
        name = order[i % len(order)]
        if 0 <= counts[name] + step <= numel[name]:
            counts[name] += step
            spare -= step
        i += 1
    return counts


def keep_counts(shapes: dict[str, torch.Size], sparsity: float, distribution: str = "erk", *,
                dense_first: bool = False, dense_last: bool = False,
                scores: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Per-layer keep counts for a global target ``sparsity``.

    ``shapes`` must be in module order (first and last matter for ``dense_first``/``dense_last``, which apply to
    every distribution: those layers are kept dense and the rest share the remaining budget).
    ``global`` ranks ``scores`` (e.g. |w|) of all layers together.
    """
    sparsity = check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise unknown("distribution", distribution, DISTRIBUTIONS)
    if not shapes:
        raise ConfigError("no prunable layers to allocate over")
    names = list(shapes)
    numel = {n: torch.Size(s).numel() for n, s in shapes.items()}
    forced_dense = set()
    if dense_first:
        forced_dense.add(names[0])
    if dense_last:
        forced_dense.add(names[-1])
    rest = {n: shapes[n] for n in names if n not in forced_dense}
    counts = {n: numel[n] for n in forced_dense}
    if not rest:
        return {n: counts[n] for n in names}
    if distribution == "uniform":
        counts.update({n: int(round((1.0 - sparsity) * numel[n])) for n in rest})
    else:
        total = int(round((1.0 - sparsity) * sum(numel[n] for n in rest)))
        if distribution == "global":
            if scores is None:
                raise ConfigError("the global distribution needs scores (e.g. weight magnitudes)")
            flat = torch.cat([scores[n].detach().float().reshape(-1) for n in rest])
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[torch.topk(flat, total).indices] = True
            offset = 0
            for n in rest:
                counts[n] = int(chosen[offset: offset + numel[n]].sum())
                offset += numel[n]
        else:
            dens = erk_densities(rest, sparsity, with_kernel=(distribution == "erk"))
            counts.update(_counts_summing_to({n: dens[n] * numel[n] for n in rest},
                                             {n: numel[n] for n in rest}, total))
    return {n: counts[n] for n in names}
