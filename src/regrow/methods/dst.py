"""Dynamic sparse training at constant density (methods.md §1): SET and RigL.

SET and RigL share :meth:`DynamicSparsifier.drop_and_grow` (the library's one prune step, then one grow step)
and differ only in :meth:`grow_scores`: random for SET, |dense gradient| for RigL. A method of one's own that
drops by magnitude and grows by another rule is a subclass with its own ``grow_scores``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import masking
from ..criteria import magnitude
from ..errors import ConfigError
from ..schedules import check_schedule, update_fraction
from .base import Sparsifier


class DynamicSparsifier(Sparsifier):
    """Drop-and-grow at constant per-layer density: every ``interval`` steps until ``t_end``.

    At an update, each layer drops k = f(t)·(active count) active units by |w| and grows k inactive ones by
    :meth:`grow_scores` (just-dropped units are eligible). f is the ``schedule`` fraction (``cosine``:
    alpha/2·(1 + cos(pi t / t_end)); ``exponential`` too). Grown weights start at 0 with fresh optimizer state.
    The start mask is random at the allocation's densities.
    """

    grows = True

    def __init__(self, model, optimizer=None, *, interval: int = 100, alpha: float = 0.3,
                 t_end: int | float = 0.75, schedule: str = "cosine", **base):
        check_schedule(schedule)
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"alpha (initial update fraction) must be in (0, 1), got {alpha}")
        if not isinstance(interval, int) or interval <= 0:
            raise ConfigError(f"interval must be a positive number of steps, got {interval!r}")
        self.interval, self.alpha, self.schedule = interval, alpha, schedule
        super().__init__(model, optimizer, **base)
        self.t_end = self.steps(t_end, "t_end")
        self.update_fraction = update_fraction(schedule, alpha, self.t_end)
        self.prepare()

    def initialize(self) -> None:
        self.random_masks(self.target_counts())

    def fraction(self, step: int) -> float:
        return self.update_fraction(step)

    def is_update_step(self, step: int) -> bool:
        return step % self.interval == 0 and step < self.t_end

    def update(self, step: int) -> None:
        if self.is_update_step(step):
            self.drop_and_grow(step)
        self.prepare()

    def drop_and_grow(self, step: int) -> None:
        fraction = self.fraction(step)
        before = self.masks()
        pruned = {n: torch.zeros_like(m) for n, m in before.items()}
        record: dict[str, Any] = {"step": step, "fraction": fraction, "dropped": 0, "grown": 0, "layers": {}}
        for name, module in self.layers.items():
            mask = masking.mask_of(module)
            k = int(fraction * int(mask.sum()))
            if k == 0:
                record["layers"][name] = {"k": 0, "dropped": 0, "grown": 0}
                continue
            after_drop = self.structure.prune(mask, magnitude(masking.raw(module)), k)
            pruned[name] = mask & ~after_drop
            new_mask = self.structure.grow(after_drop, self.grow_scores(name, module), k)
            changed = self.set_layer_mask(name, new_mask, zero_grown=True)
            record["layers"][name] = {"k": k, **changed}
            record["dropped"] += k
            record["grown"] += k
        self.history.append(record)
        self.tracker.record(step, before, self.masks(), pruned=pruned)

    def grow_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError


class SET(DynamicSparsifier):
    """SET (Mocanu et al. 2018): regrow at random among inactive weights."""

    name = "set"

    def grow_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return self.random_scores(module)


class RigL(DynamicSparsifier):
    """RigL (Evci et al. 2020): regrow the inactive weights with the largest dense-gradient magnitude.

    The dense gradient is recorded during the backward pass of the update step's minibatch (the masking core
    captures dL/d(W ⊙ M) only at those steps), so ``step()`` must follow that step's ``loss.backward()``.
    """

    name = "rigl"

    def grow_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        grad = masking.dense_grad(module)
        if grad is None:
            raise ConfigError(f"RigL found no dense gradient for {name!r} at step {self.step_count}: either "
                              "sp.step() did not follow that step's loss.backward() and optimizer.step(), or the "
                              "layer's weight took no part in the step's forward (exclude it)")
        masking.clear_dense_grad(module)
        return grad.abs()

    def prepare(self) -> None:
        # Record the dense gradient during the next step only if that step updates masks.
        wanted = self.is_update_step(self.step_count + 1)
        for module in self.layers.values():
            masking.capture_dense_grad(module, wanted)

    def extra_flops(self, macs: dict[str, int], batch_size: int) -> float:
        # At an update step the weight gradient is computed dense, not sparse: (1 - d) of a dense backward-
        # weight pass (one forward's worth of FLOPs) comes on top of 3 × the sparse forward.
        if not self.is_update_step(self.step_count):
            return 0.0
        return float(sum(2 * macs[n] * (1.0 - masking.density(m)) for n, m in self.layers.items()) * batch_size)
