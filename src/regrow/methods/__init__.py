"""Sparsification methods: each a short composition of structure, criterion, allocation and schedule."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, unknown
from .base import BaseSparsifier, Sparsifier, method_options
from .channel import HALP, ChannelIEE, ChannelSparsifier
from .dst import SET, DynamicSparsifier, RigL
from .gmp import GMP
from .iee import IEE
from .registry import REGISTRY, lookup, names, register
from .static import Dense, OneShot, Static

for _cls in (Dense, Static, OneShot, GMP, SET, RigL, IEE):
    register(_cls.name, _cls)
register("halp", HALP)
register("iee", ChannelIEE)

METHODS: dict[str, type[BaseSparsifier]] = REGISTRY["weight"]  # live views: register() adds to them
# Methods over channel groups (structure "channel"): the budget is a cost (latency or MACs), not a sparsity.
CHANNEL_METHODS: dict[str, type[BaseSparsifier]] = REGISTRY["channel"]


def resolve(method: str, structure: str | None = None) -> type[BaseSparsifier]:
    """The class ``create`` would build for ``method`` under ``structure``, or a ConfigError saying why not."""
    if structure == "channel":
        cls = lookup(method, "channel")
        if cls is None:
            raise ConfigError(f"method {method!r} has no channel version; channel methods: "
                              f"{', '.join(names('channel'))}")
        return cls
    cls = lookup(method, "weight")
    if cls is None:
        if lookup(method, "channel") is not None:
            raise ConfigError(f"{method} prunes channels: add --structure channel (structure='channel' in Python)")
        raise unknown("method", method, names("weight") + sorted(set(names("channel")) - set(names("weight")))
                      + ["package.module:Class"])
    return cls


def create(method: str, model, optimizer=None, **options: Any) -> BaseSparsifier:
    """Build a sparsifier by name (or ``package.module:Class``), rejecting options the method does not take.

    ``structure="channel"`` selects the channel version (``halp``, ``iee``)."""
    channel = options.get("structure") == "channel"
    cls = resolve(method, "channel" if channel else None)
    if channel:
        options = {k: v for k, v in options.items() if k != "structure"}
    if cls is not Dense:
        allowed = method_options(cls)
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise ConfigError(f"method {method!r} takes no option {', '.join(map(repr, bad))}; "
                              f"its options: {', '.join(sorted(allowed))}")
        for option, value in options.items():  # a number where one is due, before any comparison trips on it
            if isinstance(allowed[option], float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{option} must be a number, got {value!r}")
    return cls(model, optimizer, **options)


__all__ = ["BaseSparsifier", "CHANNEL_METHODS", "ChannelIEE", "ChannelSparsifier", "Dense", "DynamicSparsifier", "GMP",
           "HALP", "IEE", "METHODS", "OneShot", "RigL", "SET", "Sparsifier", "Static", "create", "lookup",
           "method_options", "names", "register", "resolve"]
