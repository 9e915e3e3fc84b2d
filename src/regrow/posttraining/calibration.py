"""Calibration: the pieces every post-training method shares.

- :func:`calibration_set`: N distinct training samples, seeded, class-balanced by default (never the test set).
- :func:`recalibrate_batchnorm`: reset BatchNorm statistics and re-estimate them on calibration images.
- :func:`observe_inputs`: every prunable layer's input on calibration data handed to a function batch by batch
  (Wanda accumulates its norms there, so memory does not grow with the calibration set); :func:`layer_inputs`
  keeps them all (POT refits with them); :func:`input_columns`, a layer's input unfolded so that its output is a
  matrix product.
- Masks at a per-layer sparsity (:func:`keep_count`, :func:`select_mask`, :func:`magnitude_masks`) and
  :func:`apply_masks`, which puts them on the masking core.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import masking
from ..data import Dataset, subset_indices
from ..errors import ConfigError, DataError
from ..structures import NM, Unstructured


def calibration_set(train: Dataset, size: int, seed: int = 0, balanced: bool = True) -> Dataset:
    """``size`` distinct samples of the *training* split, the same for the same seed."""
    if not isinstance(size, int) or size <= 0:
        raise DataError(f"calibration size must be a positive integer, got {size!r}")
    if size > len(train):
        raise DataError(f"calibration size {size} is larger than the training set ({len(train)} samples)")
    return train.subset(subset_indices(train.labels, size, seed, balanced=balanced))


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 64, noise_std: float = 0.0,
                          seed: int = 0) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) on ``images``
    (optionally with N(0, noise_std²) added, as UniPTS's fitness does)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:  # nothing to re-estimate (a transformer's LayerNorms hold no running statistics)
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    was_training = model.training
    model.train()
    generator = torch.Generator().manual_seed(seed)
    try:
        for x in _batches(images, batch_size):
            if noise_std and x.is_floating_point():  # token ids take no noise
                x = x + noise_std * torch.randn(x.shape, generator=generator)
            model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


@torch.no_grad()
def observe_inputs(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor,
                   observe: Callable[[str, nn.Module, torch.Tensor], None], batch_size: int = 256) -> None:
    """Run ``model`` (in eval mode) on ``images`` batch by batch and call ``observe(name, layer, input)`` with the
    input of every layer in ``layers`` as it runs: statistics can be accumulated without keeping the inputs."""
    seen = dict.fromkeys(layers, False)

    def hook(module, inputs, output, name):
        seen[name] = True
        observe(name, module, inputs[0].detach())

    hooks = [m.register_forward_hook(functools.partial(hook, name=name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in _batches(images, batch_size):
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    silent = [name for name, ran in seen.items() if not ran]
    if silent:
        raise ConfigError(f"{', '.join(silent)} never ran as a module on the calibration data (another module reads "
                          "its weight directly, as nn.MultiheadAttention does with out_proj), so there are no inputs "
                          "to score or refit it with: leave it out (regrow pts --exclude NAME; in Python, out of "
                          "the layers to prune)")


def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor,
                 batch_size: int = 256) -> dict[str, list[torch.Tensor]]:
    """The input of every layer in ``layers`` on ``images`` (model in eval mode), batch by batch. Memory grows with
    the calibration set; :func:`observe_inputs` keeps only what a method accumulates."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    observe_inputs(model, layers, images, lambda name, module, x: seen[name].append(x), batch_size)
    return seen


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows = samples (and positions), columns = the weight's input entries: X such that out = X Wᵀ per group."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(module, nn.Conv2d):
        raise ConfigError(f"post-training methods support Linear and Conv2d layers, not {type(module).__name__}")
    if isinstance(module.padding, str):
        raise ConfigError("string padding is not supported by the post-training methods")
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C·k·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def keep_count(weight: torch.Tensor, sparsity: float, structure: Unstructured | NM) -> int:
    """How many entries a layer keeps: round((1 − s)·N), at least one; N·n/m under N:M (all if unsupported)."""
    if isinstance(structure, NM):
        return structure.keep_count(weight.shape, structure.density) if structure.supports(weight.shape) \
            else weight.numel()
    return max(1, int(round((1 - sparsity) * weight.numel())))


def select_mask(scores: torch.Tensor, sparsity: float, structure: Unstructured | NM | None = None) -> torch.Tensor:
    """The mask a post-training method keeps for one layer: the top scores at ``sparsity`` (layer-wise), or the
    top N of every group of M under N:M (a layer whose input dimension N:M cannot split stays dense)."""
    structure = structure or Unstructured()
    if isinstance(structure, NM):
        if not structure.supports(scores.shape):
            return torch.ones_like(scores, dtype=torch.bool)
        return structure.select(scores)
    return structure.select(scores, keep_count(scores, sparsity, structure))


def magnitude_masks(layers: dict[str, nn.Module], sparsities: dict[str, float],
                    structure: Unstructured | NM | None = None) -> dict[str, torch.Tensor]:
    """Per layer, keep the largest |w|: round((1 − s_l)·N_l) of them, or N of every M."""
    return {name: select_mask(masking.raw(m).detach().abs(), sparsities[name], structure)
            for name, m in layers.items()}


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Attach (or replace) the masks of ``layers`` on the masking core."""
    for name, m in layers.items():
        masking.add_mask(m)
        masking.set_mask(m, masks[name])
