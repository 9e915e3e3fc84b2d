"""Schedules: when, and how much, masks change. Pure functions of the step, so a resumed run is exact.

The methods take schedules as small objects called with the step, as ``torch.ao.pruning`` and JaxPruner do:
``CosineFraction(alpha, t_end)(step)`` is the share of active units a drop-and-grow moves at ``step``,
``CubicSparsity(initial, final, begin, end)(step)`` GMP's sparsity. A method's ``schedule`` option is a name
(``"cosine"``, ``"exponential"``) or any such callable ``step -> fraction``. The formulas are plain functions
below (``cosine_fraction``…), which the objects call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError, unknown


def gmp_sparsity(step: int, initial: float, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta's cubic ramp: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3, clamped to [t0, t_end]."""
    if end <= begin:
        raise ConfigError(f"GMP needs end > begin, got begin={begin}, end={end}")
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_fraction(step: int, alpha: float, t_end: int) -> float:
    """RigL's update fraction f(t) = alpha/2 (1 + cos(pi t / T_end)); zero from T_end on."""
    if step >= t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


def exponential_fraction(step: int, alpha: float, t_end: int, decay: float = 0.01) -> float:
    """f(t) = alpha * decay^(t / T_end): falls from alpha to alpha*decay at T_end; zero from T_end on."""
    if step >= t_end:
        return 0.0
    return alpha * decay ** (step / t_end)


@dataclass(frozen=True)
class CosineFraction:
    """RigL's update fraction as an object: ``CosineFraction(0.3, 7500)(step)``."""
    alpha: float
    t_end: int

    def __call__(self, step: int) -> float:
        return cosine_fraction(step, self.alpha, self.t_end)


@dataclass(frozen=True)
class ExponentialFraction:
    """An update fraction falling from ``alpha`` to ``alpha * decay`` at ``t_end``."""
    alpha: float
    t_end: int
    decay: float = 0.01

    def __call__(self, step: int) -> float:
        return exponential_fraction(step, self.alpha, self.t_end, self.decay)


@dataclass(frozen=True)
class CubicSparsity:
    """GMP's cubic sparsity ramp from ``initial`` at ``begin`` to ``final`` at ``end``."""
    initial: float
    final: float
    begin: int
    end: int

    def __call__(self, step: int) -> float:
        return gmp_sparsity(step, self.initial, self.final, self.begin, self.end)


def exponential_path(k: int, steps: int, start: float, end: float) -> float:
    """HALP's path of cost targets: exp(α·log end + (1 − α)·log start), α = k / steps (clamped to [0, 1]); a
    geometric interpolation from ``start`` (k = 0) to ``end`` (k ≥ steps)."""
    alpha = min(max(k / steps, 0.0), 1.0)
    return math.exp(alpha * math.log(end) + (1 - alpha) * math.log(start))


# Update-fraction schedules by name: each built from (alpha, t_end).
FRACTIONS: dict[str, Callable[[float, int], Callable[[int], float]]] = {
    "cosine": CosineFraction, "exponential": ExponentialFraction}


def update_fraction(schedule: str | Callable[[int], float], alpha: float, t_end: int) -> Callable[[int], float]:
    """The update-fraction schedule a method's ``schedule`` option names (built from ``alpha`` and ``t_end``), or
    the callable itself when one is given (its own parameters then hold; ``alpha`` is not used)."""
    check_schedule(schedule)
    return FRACTIONS[schedule](alpha, t_end) if isinstance(schedule, str) else schedule


def check_schedule(schedule: object) -> None:
    """Refuse a ``schedule`` option that is neither a known name nor a callable (before a method touches the model)."""
    if isinstance(schedule, str):
        if schedule not in FRACTIONS:
            raise unknown("update-fraction schedule", schedule, FRACTIONS)
    elif not callable(schedule):
        raise ConfigError(f"schedule must be a name ({', '.join(FRACTIONS)}) or a callable step -> fraction, "
                          f"got {schedule!r}")


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, final_lr: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``final_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
