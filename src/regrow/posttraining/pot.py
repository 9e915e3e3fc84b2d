"""POT (post-training with refit): magnitude masks, then every layer's kept weights (and bias) refitted to the
dense layer's output on the dense model's inputs, least squares solved exactly per output row."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import masking
from .calibration import input_columns, layer_inputs, magnitude_masks
from .methods import MaskingMethod


@torch.no_grad()
def pot_refit(module: nn.Module, mask: torch.Tensor, inputs: list[torch.Tensor], ridge: float = 1e-4) -> None:
    """POT: refit the kept weights (and the bias) of one layer so that its output on the dense inputs matches
    the dense layer's in mean squared error: per output row, the exact least-squares solution on its kept
    inputs (Gram matrix of the unfolded inputs, a small ridge relative to its diagonal for stability).

    Grouped and depthwise convs are refitted too: an output row sees only its group's input channels, so every
    group has its own Gram matrix (a depthwise 3×3 row solves a 10×10 system: 9 taps and the bias)."""
    groups = getattr(module, "groups", 1)
    weight_param, bias_param = masking.raw(module), masking.raw(module, "bias")  # the parameters, never masked views
    has_bias = bias_param is not None
    gram, count = None, 0
    # a few samples at a time: a depthwise layer's unfolded input in float64 is 9× the activation, ×2 again
    for x in (part for batch in inputs for part in batch.split(16)):
        # unfold orders columns channel by channel, so each group owns one contiguous block of them
        cols = input_columns(module, x).double()
        cols = cols.reshape(cols.shape[0], groups, -1)
        if has_bias:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], groups, 1)], 2)
        g = torch.einsum("ngi,ngj->gij", cols, cols)
        gram = g if gram is None else gram + g
        count += cols.shape[0]
    gram /= max(count, 1)  # (groups, d, d)
    weight = weight_param.reshape(weight_param.shape[0], -1).double()
    dense = torch.cat([weight, bias_param.double()[:, None]], 1) if has_bias else weight
    flat_mask = mask.reshape(mask.shape[0], -1)
    rows_per_group = dense.shape[0] // groups
    new = torch.zeros_like(dense)
    for group in range(groups):
        g_gram = gram[group]
        eye_scale = ridge * g_gram.diagonal().mean()
        rows = range(group * rows_per_group, (group + 1) * rows_per_group)
        target = dense[rows.start:rows.stop] @ g_gram  # X_allᵀ y for each row, y = X_all · dense_row
        for i, row in enumerate(rows):
            support = torch.nonzero(flat_mask[row]).flatten()
            if has_bias:
                support = torch.cat([support, torch.tensor([dense.shape[1] - 1])])
            sub = g_gram[support][:, support] + eye_scale * torch.eye(len(support), dtype=g_gram.dtype)
            new[row, support] = torch.linalg.solve(sub, target[i, support])
    if has_bias:
        bias_param.copy_(new[:, -1].to(bias_param.dtype))
        new = new[:, :-1]
    weight_param.copy_(new.reshape(weight_param.shape).to(weight_param.dtype))


class POT(MaskingMethod):
    """Magnitude masks, then every layer's kept weights refitted to the dense layer's output (ridge ``ridge``)."""

    name = "pot"
    defaults: dict[str, Any] = {"recalibrate_bn": False, "ridge": 1e-4}

    def select(self, run, model, layers, sparsities):
        images = run.calibration.images
        masks = magnitude_masks(layers, sparsities, run.structure)
        inputs = layer_inputs(model, layers, images)  # dense inputs, taken before any refit
        run.cost.forward(len(images))
        for name, m in layers.items():
            pot_refit(m, masks[name], inputs[name], ridge=self.options["ridge"])
        del inputs
        return masks
