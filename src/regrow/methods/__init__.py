"""Sparsification methods: each a short composition of structure, criterion, allocation and schedule."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, unknown
from .base import Sparsifier, method_options
from .baselines import GMP, SET, Dense, DynamicSparsifier, OneShot, RigL, Static
from .iee import IEE

METHODS: dict[str, type[Sparsifier]] = {
    "dense": Dense, "static": Static, "oneshot": OneShot, "gmp": GMP, "set": SET, "rigl": RigL, "iee": IEE,
}


def create(method: str, model, optimizer=None, **options: Any) -> Sparsifier:
    """Build a sparsifier by name, rejecting options the method does not take."""
    if method not in METHODS:
        raise unknown("method", method, METHODS)
    cls = METHODS[method]
    if cls is not Dense:
        allowed = method_options(cls)
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise ConfigError(f"method {method!r} takes no option {', '.join(map(repr, bad))}; "
                              f"its options: {', '.join(sorted(allowed))}")
    return cls(model, optimizer, **options)


__all__ = ["GMP", "IEE", "METHODS", "SET", "Dense", "DynamicSparsifier", "OneShot", "RigL", "Sparsifier", "Static",
           "create", "method_options"]
