"""Masks that do not move during training: dense (no masks), a static random mask, one-shot magnitude pruning
followed by fine-tuning (methods.md §1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import masking
from ..criteria import magnitude
from .base import BaseSparsifier, Sparsifier


class Dense(BaseSparsifier):
    """No masks at all: the reference every method is compared with (same API, ``step()`` does nothing)."""

    name = "dense"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 total_steps: int | None = None, seed: int = 0, **ignored: Any):
        super().__init__(model, optimizer, total_steps=total_steps, seed=seed)
        self.sparsity, self.distribution = 0.0, "dense"


class Static(Sparsifier):
    """A random mask at the allocation's densities, never changed."""

    name = "static"

    def initialize(self) -> None:
        self.random_masks(self.target_counts())


class OneShot(Sparsifier):
    """Train dense, prune by magnitude once to the target at ``prune_at``, then fine-tune with the mask fixed.

    ``prune_at`` defaults to half of training (a fraction, or a step count).
    """

    name = "oneshot"

    def __init__(self, model, optimizer=None, *, prune_at: int | float = 0.5, **base):
        super().__init__(model, optimizer, **base)
        self.prune_at = self.steps(prune_at, "prune_at")

    def update(self, step: int) -> None:
        if step == self.prune_at:
            counts = self.target_counts()
            scores = {n: magnitude(masking.raw(m)) for n, m in self.layers.items()}
            self.select_masks(scores, counts)
            self.history.append({"step": step, "sparsity": self.actual_sparsity()})
