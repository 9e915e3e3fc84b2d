"""Wanda (Sun et al. 2024): score |W_ij|·‖X_j‖₂ on calibration inputs of the dense model, prune per output row;
no weight update. Convolutions use their unfolded inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import masking
from ..structures import NM, Unstructured
from .calibration import input_columns, layer_inputs, select_mask
from .methods import MaskingMethod


def input_norms(module: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """‖X_j‖₂ for every weight entry's input, shaped like the weight (Wanda's activation term)."""
    total = None
    for x in inputs:
        cols = input_columns(module, x)
        sq = cols.pow(2).sum(0)
        total = sq if total is None else total + sq
    norms = total.sqrt()
    weight = masking.raw(module)
    if isinstance(module, nn.Linear):
        return norms.expand_as(weight)
    per_group = weight.shape[1] * weight[0, 0].numel()  # (C_in/groups)·k·k
    groups = module.groups
    out_per_group = weight.shape[0] // groups
    grouped = norms.reshape(groups, per_group)
    return grouped.repeat_interleave(out_per_group, 0).reshape(weight.shape)


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, keep the round((1 − s)·row length) highest scores (at least one)."""
    rows = scores.reshape(scores.shape[0], -1)
    keep = max(1, int(round((1 - sparsity) * rows.shape[1])))
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, torch.topk(rows, keep, dim=1).indices, True)
    return mask.reshape(scores.shape)


def wanda_masks(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor,
                sparsity: float, structure: Unstructured | NM | None = None) -> dict[str, torch.Tensor]:
    """Wanda: score |W_ij|·‖X_j‖₂ on calibration inputs of the dense model; prune per output row (under N:M, per
    group of M, which lies inside a row)."""
    inputs = layer_inputs(model, layers, images)
    masks = {}
    for name, m in layers.items():
        scores = masking.raw(m).detach().abs() * input_norms(m, inputs[name])
        masks[name] = select_mask(scores, sparsity, structure) if isinstance(structure, NM) \
            else row_masks(scores, sparsity)
    return masks


class Wanda(MaskingMethod):
    """|W_ij|·‖X_j‖₂ per output row (N of every M under N:M), no weight update, no recalibration by default."""

    name = "wanda"
    defaults: dict[str, Any] = {"recalibrate_bn": False}

    def select(self, run, model, layers, sparsities):
        images = run.calibration.images
        masks = wanda_masks(model, layers, images, run.target, run.structure)
        run.cost.forward(len(images))
        return masks
