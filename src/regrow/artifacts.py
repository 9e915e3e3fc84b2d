"""What a run leaves in its folder, and the model metadata that rebuilds its model anywhere.

A run folder holds ``checkpoint.safetensors`` (resumable state), ``metrics.jsonl``, ``model.safetensors`` (the
final masked model), ``summary.json`` and ``recipe.yaml`` (its options, to repeat it). A model file's metadata
names the architecture (a registry name or a user's ``package.module:factory``) and the shapes it was built for,
so ``load_model`` needs nothing else.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from . import __version__, checkpoint, masking
from .errors import CheckpointError
from .models import create_model
from .plugins import is_import_spec

CHECKPOINT, MODEL, SUMMARY, METRICS = "checkpoint.safetensors", "model.safetensors", "summary.json", "metrics.jsonl"
RECIPE = "recipe.yaml"  # the options the run was started with (regrow.recipe)
RESULT_FILES = (CHECKPOINT, MODEL, SUMMARY, METRICS, RECIPE)  # what a training run writes into its folder
# Metadata keys an exported model carries over from the model it came from.
MODEL_KEYS = ("model", "dataset", "in_channels", "num_classes", "input_size", "input_shape", "input_dtype",
              "input_max", "method")

# What a checkpoint's metadata may ask a registry model to be built with: a damaged or edited header is refused
# before it can ask for a model of terabytes. A user's factory builds what its own code says.
_META_RANGES = {"in_channels": (1, 64), "input_size": (1, 4096), "num_classes": (1, 100_000)}
_MAX_SAMPLE_NUMEL = 2**31


def model_metadata(model: str, dataset: str, method: str, data) -> dict[str, Any]:
    """The metadata of a model trained on ``data`` (a :class:`regrow.data.Dataset`)."""
    meta = {"kind": "model", "model": model, "dataset": dataset, "in_channels": data.in_channels,
            "num_classes": data.num_classes, "input_size": data.input_size,
            "input_shape": list(data.images.shape[1:]), "method": method, "regrow_version": __version__}
    if not data.images.is_floating_point():  # token ids: what an example input may hold
        meta.update(input_dtype="int64", input_max=int(data.images.max()))
    return meta


def trace_inputs(meta: dict[str, Any]) -> torch.Tensor:
    """The one-sample input an export traces the model at ``meta`` on: zeros for float inputs; seeded random ids
    for token inputs (an all-zero sequence would hide a path that depends on the ids, and the exported model's
    output check draws its ids up to the largest in this example)."""
    return example_inputs(meta, 1, seed=0 if meta.get("input_dtype") == "int64" else None)


def example_inputs(meta: dict[str, Any], samples: int = 1, seed: int | None = None) -> torch.Tensor:
    """Inputs of the kind the model at ``meta`` takes: zeros, or (with ``seed``) a seeded random batch, N(0, 1)
    for float inputs and ids uniform in 0..input_max for token inputs."""
    shape = (samples, *input_shape(meta))
    if meta.get("input_dtype") == "int64":
        if seed is None:
            return torch.zeros(shape, dtype=torch.long)
        return torch.randint(0, int(meta["input_max"]) + 1, shape, generator=torch.Generator().manual_seed(seed))
    if seed is None:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def input_shape(meta: dict[str, Any]) -> tuple[int, ...]:
    """One sample's shape; files written before ``input_shape`` was recorded held square images."""
    shape = meta.get("input_shape")
    if shape is None:
        return (meta["in_channels"], meta["input_size"], meta["input_size"])
    return tuple(shape)


def check_model_metadata(meta: dict[str, Any], where: str) -> None:
    if not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{where}: the metadata names no model")
    user = is_import_spec(meta["model"])
    for key, (low, high) in _META_RANGES.items():
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= (math.inf if user else high):
            raise CheckpointError(f"{where}: metadata {key}={value!r} is not a size regrow builds models with "
                                  f"({low}..{high}); the file is damaged or was edited")
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            and math.prod(shape) <= _MAX_SAMPLE_NUMEL):
        raise CheckpointError(f"{where}: metadata input_shape={shape!r} is not a sample shape; the file is damaged "
                              "or was edited")
    if meta.get("input_dtype") not in (None, "int64") or (meta.get("input_dtype") == "int64" and not (
            isinstance(meta.get("input_max"), int) and not isinstance(meta.get("input_max"), bool)
            and meta["input_max"] >= 0)):
        raise CheckpointError(f"{where}: metadata input_dtype={meta.get('input_dtype')!r}, "
                              f"input_max={meta.get('input_max')!r} is not an input kind; the file is damaged or "
                              "was edited")


def check_data_fits(meta: dict[str, Any], data, where: str) -> None:
    """Refuse data whose samples or classes are not the ones the model at ``where`` was built for."""
    tokens, is_tokens = meta.get("input_dtype") == "int64", not data.images.is_floating_point()
    if tokens != is_tokens:
        raise CheckpointError(f"{where} takes {'token ids' if tokens else 'float inputs'}; the dataset holds "
                              f"{'token ids' if is_tokens else 'float inputs'}")
    if (tuple(data.images.shape[1:]), data.num_classes) != (input_shape(meta), meta["num_classes"]):
        raise CheckpointError(f"{where} expects inputs of shape {list(input_shape(meta))} and "
                              f"{meta['num_classes']} classes; the dataset has {list(data.images.shape[1:])} and "
                              f"{data.num_classes}")


def build_model(meta: dict[str, Any]) -> nn.Module:
    """A fresh (dense, unmasked) instance of the architecture ``meta`` names."""
    check_model_metadata(meta, "checkpoint")
    return create_model(meta["model"], in_channels=meta["in_channels"], num_classes=meta["num_classes"],
                        input_size=meta["input_size"])


def load_model(path: str | os.PathLike, expect_model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in a ``model.safetensors`` or ``checkpoint.safetensors`` (masks included)."""
    sections, meta = checkpoint.load(path)
    if "model" not in sections or "model" not in meta:
        raise CheckpointError(f"{path} holds no model")
    check_model_metadata(meta, str(path))
    if expect_model is not None and meta["model"] != expect_model:
        raise CheckpointError(f"{path} is a {meta['model']} checkpoint, not {expect_model}")
    model = build_model(meta)
    masking.load_state_dict(model, sections["model"])  # names the mismatch if the factory now builds another net
    return model, meta
