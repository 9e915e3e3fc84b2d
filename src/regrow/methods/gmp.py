"""Gradual magnitude pruning (methods.md §1): from dense to the target along a cubic ramp."""

from __future__ import annotations

from .. import masking
from ..criteria import magnitude
from ..errors import ConfigError
from ..schedules import CubicSparsity
from ..structures import NM
from .base import Sparsifier


class GMP(Sparsifier):
    """Gradual magnitude pruning (Zhu & Gupta 2017): dense start, cubic ramp, fixed mask after ``end``.

    Every ``interval`` steps in (``begin``, ``end``] (and at ``end``) each layer is pruned by magnitude to its
    allocation at s_t; pruned weights never return. Defaults: begin 0, end 75 % of training, interval 100.
    """

    name = "gmp"

    def __init__(self, model, optimizer=None, *, initial_sparsity: float = 0.0, begin: int | float = 0,
                 end: int | float = 0.75, interval: int = 100, **base):
        super().__init__(model, optimizer, **base)
        if isinstance(self.structure, NM):
            raise ConfigError("GMP's gradual ramp cannot express N:M sparsity; use oneshot, static, set or rigl")
        if not 0.0 <= initial_sparsity <= self.sparsity:
            raise ConfigError(f"initial_sparsity must be in [0, sparsity], got {initial_sparsity}")
        self.initial_sparsity = initial_sparsity
        self.begin = self.steps(begin, "begin")
        self.end = self.steps(end, "end")
        if self.end <= self.begin:
            raise ConfigError(f"GMP needs end > begin (got {self.begin} and {self.end} steps)")
        if not isinstance(interval, int) or interval <= 0:
            raise ConfigError(f"interval must be a positive number of steps, got {interval!r}")
        self.interval = interval
        self.ramp = CubicSparsity(initial_sparsity, self.sparsity, self.begin, self.end)

    def is_prune_step(self, step: int) -> bool:
        return self.begin < step <= self.end and ((step - self.begin) % self.interval == 0 or step == self.end)

    def update(self, step: int) -> None:
        if not self.is_prune_step(step):
            return
        target = self.ramp(step)
        counts = self.target_counts(target)
        for name, module in self.layers.items():
            mask = masking.mask_of(module)
            excess = int(mask.sum()) - counts[name]
            if excess > 0:
                self.set_layer_mask(name, self.structure.prune(mask, magnitude(masking.raw(module)), excess))
        self.history.append({"step": step, "target": target, "sparsity": self.actual_sparsity()})
