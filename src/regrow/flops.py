"""FLOPs and MACs of Linear/Conv layers, measured once by forward hooks on one sample.

Training FLOPs follow the project's convention: per step, 3 × the forward FLOPs of the network as it actually
ran (a masked layer counts its density), with FLOPs = 2 × MACs and only Linear/Conv layers counted (norms,
activations and pooling are a few percent on these nets and identical for every method).
"""

from __future__ import annotations

import torch
from torch import nn

from .masking import PRUNABLE_TYPES


def layer_macs(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> dict[str, int]:
    """MACs per sample of every Linear/Conv layer, for an input of ``input_shape`` (without the batch) and
    ``dtype`` (default the parameters'; ``torch.long`` for token ids, fed as zeros)."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            weight = module.weight
            per_output = weight[0].numel()  # in/groups * kernel for conv, in_features for linear
            macs[name] = macs.get(name, 0) + output[0].numel() * per_output
        return record

    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, *input_shape, device=param.device, dtype=dtype or param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def forward_flops(macs: dict[str, int], densities: dict[str, float] | None = None) -> float:
    """Forward FLOPs per sample with each layer scaled by its density (missing layers count dense)."""
    densities = densities or {}
    return float(sum(2 * m * densities.get(name, 1.0) for name, m in macs.items()))
