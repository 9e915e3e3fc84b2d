"""Wanda (Sun et al. 2024): score |W_ij|·‖X_j‖₂ on calibration inputs of the dense model, prune per output row;
no weight update. Convolutions use their unfolded inputs. The norms are running sums of squares, accumulated as
the calibration batches pass (the inputs themselves are never kept)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import masking
from ..structures import NM, Unstructured
from .calibration import input_columns, observe_inputs, select_mask
from .methods import MaskingMethod


def input_square_sums(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """Σ X_j² over the calibration set for every input entry j of every layer, accumulated batch by batch as the
    model runs (memory: one vector per layer, whatever the calibration set's size)."""
    totals: dict[str, torch.Tensor] = {}

    def accumulate(name: str, module: nn.Module, x: torch.Tensor) -> None:
        sq = input_columns(module, x).pow(2).sum(0)
        totals[name] = sq if name not in totals else totals[name] + sq

    observe_inputs(model, layers, images, accumulate)
    return totals


def input_norms(module: nn.Module, square_sum: torch.Tensor) -> torch.Tensor:
    """‖X_j‖₂ for every weight entry's input, shaped like the weight (Wanda's activation term)."""
    norms = square_sum.sqrt()
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
    square_sums = input_square_sums(model, layers, images)
    masks = {}
    for name, m in layers.items():
        scores = masking.raw(m).detach().abs() * input_norms(m, square_sums[name])
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
