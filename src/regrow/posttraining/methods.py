"""Post-training methods as classes in a registry, open to methods written outside regrow.

A method has a ``name``, its ``defaults`` (every option it takes, with the value that sets its kind: a number, a
boolean or text), ``choices`` for options that take one of a few words, and :meth:`PostTrainingMethod.sparsify`,
which turns the dense copy it is handed into a sparse one and returns the masks. What the methods share (the
calibration set, the dense model, the structure and target, the cost counter, the summary's extra fields) comes
from the run, a :class:`regrow.posttraining.runner.PostTraining`. ``register_pts("mine", Mine)`` adds a method;
installed packages can declare theirs in the ``regrow.pts_methods`` entry-point group, and
``regrow pts --method package.module:Class`` loads one directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, unknown
from ..plugins import check_name, check_registration, is_import_spec, load_object, register_entry_points
from ..structures import NM, Unstructured
from .calibration import apply_masks, magnitude_masks, recalibrate_batchnorm

# ``run`` below: the PostTraining run (regrow.posttraining.runner, which imports this module).
Run = Any

ENTRY_POINT_GROUP = "regrow.pts_methods"


class PostTrainingMethod:
    """A dense model and a calibration set in, masks out (see the module docstring)."""

    name = "base"
    defaults: dict[str, Any] = {}
    choices: dict[str, tuple[str, ...]] = {}
    # Runs on a model and unlabelled inputs held in memory (posttraining.sparsify_model), not only in a run folder.
    in_memory = False

    def __init__(self, options: dict[str, Any]):
        self.options = options

    @classmethod
    def check(cls, options: dict[str, Any], target: float, structure: Unstructured | NM) -> None:
        """Checks of the options against each other and the target, before any work (raise ConfigError)."""

    def sparsify(self, run: Run, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Make ``model`` (a copy of the dense one) sparse on ``layers``; return their masks. Record the per-layer
        sparsities in ``run.extra["layer_sparsities"]`` and the FLOPs spent in ``run.cost``."""
        raise NotImplementedError


class MaskingMethod(PostTrainingMethod):
    """One pass at the same sparsity in every layer: :meth:`select` gives the masks (and may refit the kept
    weights), they go on the masking core, and with the option ``recalibrate_bn`` the BatchNorm statistics are
    re-estimated on the calibration images. Timed as one stage named after the method."""

    in_memory = True

    def select(self, run: Run, model: nn.Module, layers: dict[str, nn.Module],
               sparsities: dict[str, float]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sparsify(self, run, model, layers):
        return run.timed(self.name, self._one_pass, run, model, layers)

    def _one_pass(self, run: Run, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        sparsities = run.extra["layer_sparsities"] = run.uniform_sparsities(layers)
        masks = self.select(run, model, layers, sparsities)
        apply_masks(layers, masks)
        if self.options.get("recalibrate_bn", False):
            images = run.calibration.images
            recalibrate_batchnorm(model, images, seed=run.config.seed)
            run.cost.forward(len(images), {n: float(masks[n].float().mean()) for n in masks})
        return masks


class Magnitude(MaskingMethod):
    """Per-layer magnitude masks at the target, then BatchNorm recalibration."""

    name = "magnitude"
    defaults = {"recalibrate_bn": True}

    def select(self, run, model, layers, sparsities):
        return magnitude_masks(layers, sparsities, run.structure)


REGISTRY: dict[str, type[PostTrainingMethod]] = {}
_entry_points_loaded = False
_entry_point_errors: dict[str, str] = {}


def register_pts(name: str, cls: type[PostTrainingMethod] | None = None, *, replace: bool = False):
    """Register a post-training method class under ``name``; usable as a decorator."""
    if cls is None:
        return lambda c: register_pts(name, c, replace=replace)
    check_name(name)
    if not (isinstance(cls, type) and issubclass(cls, PostTrainingMethod)):
        raise ConfigError(f"post-training method {name!r}: {cls!r} is not a subclass of PostTrainingMethod")
    check_registration(REGISTRY, name, cls, replace, "post-training method")
    REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    register_entry_points(ENTRY_POINT_GROUP, register_pts, _entry_point_errors, "post-training method")


def pts_names() -> list[str]:
    _load_entry_points()
    return list(REGISTRY)


def resolve_pts(name: str) -> type[PostTrainingMethod]:
    """The class of post-training method ``name`` (or ``package.module:Class``), or a ConfigError."""
    if is_import_spec(name):
        cls = load_object(name, "post-training method")
        if not (isinstance(cls, type) and issubclass(cls, PostTrainingMethod)):
            raise ConfigError(f"post-training method {name!r} is not a subclass of "
                              "regrow.posttraining.PostTrainingMethod")
        return cls
    if name not in REGISTRY:
        _load_entry_points()
    if name in _entry_point_errors and name not in REGISTRY:
        raise ConfigError(f"post-training method {name!r} is installed but failed to load: "
                          f"{_entry_point_errors[name]}")
    if name not in REGISTRY:
        raise unknown("post-training method", name, pts_names() + ["package.module:Class"])
    return REGISTRY[name]
