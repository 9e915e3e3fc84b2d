"""Users' own code by name: ``package.module:attribute`` strings for models, datasets and methods.

The CLI takes ``--model mypkg.nets:build`` wherever it takes a registry name. The module is imported the way
``python -m`` would find it: the current folder is searched first, then the installed packages. A factory is
called with the keyword arguments it declares among the ones offered (``in_channels``, ``num_classes``,
``input_size`` for models), so a factory that needs none of them takes none.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .errors import ConfigError


def is_import_spec(name: str) -> bool:
    """``module:attribute`` (the colon is what tells a user's factory from a registry name)."""
    return isinstance(name, str) and ":" in name


def load_object(spec: str, what: str) -> Any:
    """Import ``package.module:attr.path`` and return the attribute; every failure is one ConfigError line."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or any(not part.isidentifier() for part in
                                               module_name.split(".") + attr_path.split(".")):
        raise ConfigError(f"{what} {spec!r} is not of the form package.module:name")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` does: the current folder first
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import {e.name!r} (not in the current folder nor "
                          "installed)") from None
    except Exception as e:  # an error inside the user's module: name it without a traceback
        raise ConfigError(f"{what} {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: {module_name} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def call_factory(factory: Callable[..., Any], spec: str, what: str, **offered: Any) -> Any:
    """Call ``factory`` with the offered keyword arguments it declares (all of them if it takes ``**kwargs``)."""
    if not callable(factory):
        raise ConfigError(f"{what} {spec!r} is not callable")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: offer nothing
        parameters = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in parameters}
    try:
        return factory(**kwargs)
    except Exception as e:
        raise ConfigError(f"{what} {spec!r} failed when called with {kwargs or 'no arguments'}: "
                          f"{type(e).__name__}: {e}") from None


# ----- registries of named classes (sparsifiers, post-training methods) ------------------------------------------
def check_name(name: str) -> None:
    """A registry name is a plain word: no ``:`` (that marks ``package.module:Class``), no surrounding spaces."""
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ConfigError(f"a method name is a non-empty word without ':', got {name!r}")


def check_registration(table: dict[str, type], name: str, cls: type, replace: bool, what: str) -> None:
    """Refuse a name that is not a plain word, or one ``table`` already holds for another class (unless
    ``replace``)."""
    check_name(name)
    taken = table.get(name)
    if taken is not None and taken is not cls and not replace:
        raise ConfigError(f"{what} name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; pass "
                          "replace=True to replace it")


def register_entry_points(group: str, register: Callable[[str, Any], Any], errors: dict[str, str],
                          what: str) -> None:
    """Register every class the installed packages declare in entry-point ``group``; one that fails to import or
    register is skipped with a warning and its error kept in ``errors`` (named if it is asked for), so that it
    cannot break every other method."""
    for ep in entry_points(group=group):
        try:
            register(ep.name, ep.load())
        except Exception as e:  # an installed plugin that fails to import or register
            errors[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            warnings.warn(f"regrow {what} {ep.name!r} from entry point {ep.value} skipped: {e}", stacklevel=3)
