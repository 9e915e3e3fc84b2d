"""Schedules: when, and how much, masks change. Pure functions of the step, so a resumed run is exact."""

from __future__ import annotations

import math

from .errors import ConfigError


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


FRACTIONS = {"cosine": cosine_fraction, "exponential": exponential_fraction}


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, final_lr: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``final_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
