"""Structures: what one prunable unit is, and how a mask is chosen, shrunk and grown from scores.

Every method uses the same three operations, so that a new method never writes its own top-k:

* ``select(scores, keep)``  -> a fresh mask keeping the ``keep`` highest-scored units;
* ``prune(mask, scores, k)`` -> the mask with its ``k`` lowest-scored *active* units switched off
  (the one prune step shared by GMP, SET, RigL and IEE);
* ``grow(mask, scores, k)`` -> the mask with ``k`` highest-scored *inactive* units switched on.

Ties are broken by ``torch.topk``, which is deterministic on a given device.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, unknown


def _flat_topk(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    flat = scores.reshape(-1)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        chosen[torch.topk(flat, k, largest=largest, sorted=False).indices] = True
    return chosen.view_as(scores)


class Unstructured:
    """One unit = one weight."""

    name = "unstructured"

    def supports(self, shape: torch.Size) -> bool:
        return True

    def keep_count(self, shape: torch.Size, density: float) -> int:
        return int(round(density * torch.Size(shape).numel()))

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        if not 0 <= keep <= scores.numel():
            raise ConfigError(f"cannot keep {keep} of {scores.numel()} weights")
        return _flat_topk(scores.float(), keep, largest=True)

    def prune(self, mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        active = int(mask.sum())
        if k > active:
            raise ConfigError(f"cannot prune {k} units: only {active} are active")
        candidates = scores.float().masked_fill(~mask, float("inf"))
        return mask & ~_flat_topk(candidates, k, largest=False)

    def grow(self, mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        inactive = mask.numel() - int(mask.sum())
        if k > inactive:
            raise ConfigError(f"cannot grow {k} units: only {inactive} are inactive")
        candidates = scores.float().masked_fill(mask, float("-inf"))
        return mask | _flat_topk(candidates, k, largest=True)

    def describe(self) -> str:
        return self.name


class NM:
    """N:M sparsity: in every group of M consecutive weights along the input-channel dimension, N stay active.

    For a conv weight (out, in, kh, kw) the groups run along ``in`` at each kernel position (the layout sparse
    tensor cores use after a channels-last permute). Layers whose input dimension is not a multiple of M are
    not supported (``supports`` says so; allocation leaves them dense and reports it).
    """

    def __init__(self, n: int = 2, m: int = 4):
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ConfigError(f"N:M needs integers 0 < N < M, got {n}:{m}")
        self.n, self.m = n, m
        self.name = f"{n}:{m}"

    @property
    def density(self) -> float:
        return self.n / self.m

    def supports(self, shape: torch.Size) -> bool:
        return len(shape) >= 2 and shape[1] % self.m == 0

    def _to_groups(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() > 2:  # (out, in, *k) -> (out, *k, in)
            t = t.movedim(1, -1)
        return t.reshape(-1, self.m)

    def _from_groups(self, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if len(shape) > 2:
            moved = (shape[0], *shape[2:], shape[1])
            return g.reshape(moved).movedim(-1, 1).contiguous()
        return g.reshape(shape)

    def keep_count(self, shape: torch.Size, density: float) -> int:
        return torch.Size(shape).numel() * self.n // self.m

    def select(self, scores: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        if not self.supports(scores.shape):
            raise ConfigError(f"{self.name} sparsity needs the input dimension of {tuple(scores.shape)} "
                              f"to be a multiple of {self.m}")
        groups = self._to_groups(scores.float())
        top = torch.topk(groups, self.n, dim=1).indices
        chosen = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
        return self._from_groups(chosen, scores.shape)

    def prune(self, mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        return Unstructured().prune(mask, scores, k)

    def grow(self, mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Refill every group to exactly N with its highest-scored inactive weights; ``k`` must be the deficit."""
        active = self._to_groups(mask)
        deficit = self.n - active.sum(dim=1)
        if int(deficit.sum()) != k or bool((deficit < 0).any()):
            raise ConfigError(f"{self.name} grow must refill the groups exactly: deficit {int(deficit.sum())}, "
                              f"asked to grow {k}")
        candidates = self._to_groups(scores.float()).masked_fill(active, float("-inf"))
        order = torch.argsort(candidates, dim=1, descending=True, stable=True)
        rank = torch.argsort(order, dim=1)
        grown = active | (rank < deficit[:, None])
        return self._from_groups(grown, mask.shape)

    def describe(self) -> str:
        return self.name


def get_structure(spec: str | Unstructured | NM) -> Unstructured | NM:
    """``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``), or a structure object."""
    if isinstance(spec, (Unstructured, NM)):
        return spec
    if spec == "unstructured":
        return Unstructured()
    if isinstance(spec, str) and ":" in spec:
        n, _, m = spec.partition(":")
        try:
            return NM(int(n), int(m))
        except ValueError:
            pass
    raise unknown("structure", str(spec), ["unstructured", "N:M (e.g. 2:4)"])
