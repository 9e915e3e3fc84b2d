"""The method registry: names for sparsifier classes, open to methods written outside regrow.

    @regrow.register("mine")                 # or regrow.register("mine", Mine)
    class Mine(regrow.SET): ...

Out-of-tree packages can also declare methods in the ``regrow.methods`` entry-point group (``mine =
"mypkg.methods:Mine"`` in their ``pyproject.toml``); they are found the first time a name is not known, so
``regrow train --method mine`` works once the package is installed. ``--method mypkg.methods:Mine`` works too,
without any declaration. A class's ``family`` says which structure it sparsifies: ``"weight"`` (the masks of
weight entries, for ``unstructured`` and N:M) or ``"channel"`` (channel groups under a cost budget, selected with
``--structure channel``); one name can have one class of each family, as ``iee`` does.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..plugins import check_name, check_registration, is_import_spec, load_object, register_entry_points
from .base import BaseSparsifier

ENTRY_POINT_GROUP = "regrow.methods"
FAMILIES = ("weight", "channel")
# family -> name -> class; METHODS and CHANNEL_METHODS in regrow.methods are these dicts.
REGISTRY: dict[str, dict[str, type[BaseSparsifier]]] = {family: {} for family in FAMILIES}
_entry_points_loaded = False
_entry_point_errors: dict[str, str] = {}


def register(name: str, cls: type[BaseSparsifier] | None = None, *, replace: bool = False):
    """Register ``cls`` under ``name`` (in the family its ``family`` attribute names); usable as a decorator.

    A name already taken in that family is refused unless ``replace=True``."""
    if cls is None:
        return lambda c: register(name, c, replace=replace)
    check_name(name)
    if not (isinstance(cls, type) and issubclass(cls, BaseSparsifier)):
        raise ConfigError(f"method {name!r}: {cls!r} is not a subclass of regrow.BaseSparsifier")
    family = getattr(cls, "family", "weight")
    if family not in FAMILIES:
        raise ConfigError(f"method {name!r}: family {family!r} is not one of {', '.join(FAMILIES)}")
    check_registration(REGISTRY[family], name, cls, replace, "method")
    REGISTRY[family][name] = cls
    return cls


def load_entry_points() -> None:
    """Register the methods installed packages declare; a broken one is skipped with a warning (and named if
    asked for), so that it cannot break every other method."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    register_entry_points(ENTRY_POINT_GROUP, register, _entry_point_errors, "method")


def lookup(name: str, family: str = "weight") -> type[BaseSparsifier] | None:
    """The class registered as ``name`` in ``family``, importing ``package.module:Class`` names; None if unknown."""
    if is_import_spec(name):
        cls = load_object(name, "method")
        if not (isinstance(cls, type) and issubclass(cls, BaseSparsifier)):
            raise ConfigError(f"method {name!r} is not a subclass of regrow.BaseSparsifier")
        return cls if getattr(cls, "family", "weight") == family else None
    if name not in REGISTRY[family]:
        load_entry_points()
    if name in _entry_point_errors and name not in REGISTRY[family]:
        raise ConfigError(f"method {name!r} is installed but failed to load: {_entry_point_errors[name]}")
    return REGISTRY[family].get(name)


def names(family: str = "weight") -> list[str]:
    load_entry_points()
    return list(REGISTRY[family])
