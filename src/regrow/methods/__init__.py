"""Sparsification methods: each a short composition of structure, criterion, allocation and schedule."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, unknown
from .base import Sparsifier, method_options
from .baselines import GMP, SET, Dense, DynamicSparsifier, OneShot, RigL, Static
from .channel import HALP, ChannelIEE, ChannelSparsifier
from .iee import IEE

METHODS: dict[str, type[Sparsifier]] = {
    "dense": Dense, "static": Static, "oneshot": OneShot, "gmp": GMP, "set": SET, "rigl": RigL, "iee": IEE,
}
# Methods over channel groups (structure "channel"): the budget is a cost (latency or MACs), not a sparsity.
CHANNEL_METHODS: dict[str, type[Sparsifier]] = {"halp": HALP, "iee": ChannelIEE}


def create(method: str, model, optimizer=None, **options: Any) -> Sparsifier:
    """Build a sparsifier by name, rejecting options the method does not take.

    ``structure="channel"`` selects the channel version (``halp``, ``iee``)."""
    if options.get("structure") == "channel":
        options = {k: v for k, v in options.items() if k != "structure"}
        if method not in CHANNEL_METHODS:
            raise ConfigError(f"method {method!r} has no channel version; channel methods: "
                              f"{', '.join(CHANNEL_METHODS)}")
        cls = CHANNEL_METHODS[method]
    elif method in CHANNEL_METHODS and method not in METHODS:
        raise ConfigError(f"{method} prunes channels: use structure='channel' (--structure channel)")
    elif method not in METHODS:
        raise unknown("method", method, sorted(METHODS) + sorted(set(CHANNEL_METHODS) - set(METHODS)))
    else:
        cls = METHODS[method]
    if cls is not Dense:
        allowed = method_options(cls)
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise ConfigError(f"method {method!r} takes no option {', '.join(map(repr, bad))}; "
                              f"its options: {', '.join(sorted(allowed))}")
    return cls(model, optimizer, **options)


__all__ = ["CHANNEL_METHODS", "GMP", "HALP", "IEE", "METHODS", "SET", "ChannelIEE", "ChannelSparsifier", "Dense",
           "DynamicSparsifier", "OneShot", "RigL", "Sparsifier", "Static", "create", "method_options"]
