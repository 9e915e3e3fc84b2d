"""FLOPs and MACs of Linear/Conv layers, measured once by forward hooks on one sample.

Training FLOPs follow the project's convention: per step, 3 × the forward FLOPs of the network as it actually
ran (a masked layer counts its density), with FLOPs = 2 × MACs and only Linear/Conv layers counted (norms,
activations and pooling are a few percent on these nets and identical for every method).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .masking import PRUNABLE_TYPES


def attention_projections(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, tuple[int, int, int]]:
    """The projections an ``nn.MultiheadAttention`` forward runs functionally, from its inputs (one sample):
    suffix -> (in width, out width, rows). The q/k/v input projection is one packed ``in_proj_weight`` when its
    three parts share widths and token counts (self-attention), else ``q_proj_weight``, ``k_proj_weight`` and
    ``v_proj_weight``; then ``out_proj``."""
    query, key, value = (list(args) + [kwargs.get(k) for k in ("query", "key", "value")[len(args):]])[:3]
    e = module.embed_dim
    parts = {"q": (e, query.numel() // e), "k": (module.kdim, key.numel() // module.kdim),
             "v": (module.vdim, value.numel() // module.vdim)}
    if module._qkv_same_embed_dim and len({rows for _, rows in parts.values()}) == 1:
        out = {"in_proj_weight": (e, 3 * e, parts["q"][1])}
    else:
        out = {f"{p}_proj_weight": (width, e, rows) for p, (width, rows) in parts.items()}
    return {**out, "out_proj": (e, e, parts["q"][1])}


def layer_macs(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> dict[str, int]:
    """MACs per sample of every Linear/Conv layer, for an input of ``input_shape`` (without the batch) and
    ``dtype`` (default the parameters'; ``torch.long`` for token ids, fed as zeros).

    ``nn.MultiheadAttention`` never calls its projections as modules (it hands their weights to a functional
    forward), so its hook counts them (:func:`attention_projections`): ``<attention>.out_proj`` under the Linear's
    own name (so that its density applies) and the q/k/v input projection, which regrow does not mask. Any other
    Linear/Conv that never ran as a module counts 0 MACs, with a warning naming it: its weight may be used by a
    forward regrow cannot see."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            weight = module.weight
            per_output = weight[0].numel()  # in/groups * kernel for conv, in_features for linear
            # one sample went in (batch 1), so the whole output is its: output[0] would be one token of a
            # sequence-first (tokens, batch, features) layout
            macs[name] = macs.get(name, 0) + output.numel() * per_output
        return record

    def attention_hook(name):
        def record(module, args, kwargs, output):
            for suffix, (c_in, c_out, rows) in attention_projections(module, args, kwargs).items():
                macs[f"{name}.{suffix}"] = macs.get(f"{name}.{suffix}", 0) + rows * c_in * c_out
        return record

    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            handles.append(module.register_forward_hook(hook(name)))
        elif isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_hook(attention_hook(name), with_kwargs=True))
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # fused encoder layers would run no projection as a module
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, *input_shape, device=param.device, dtype=dtype or param.dtype))
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    unseen = [name for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES) and name not in macs]
    if unseen:
        warnings.warn(f"{len(unseen)} Linear/Conv layer(s) never ran as modules and count 0 MACs in the FLOPs: "
                      f"{', '.join(unseen[:4])}{' ...' if len(unseen) > 4 else ''}", stacklevel=2)
        macs.update(dict.fromkeys(unseen, 0))
    return macs


def forward_flops(macs: dict[str, int], densities: dict[str, float] | None = None) -> float:
    """Forward FLOPs per sample with each layer scaled by its density (missing layers count dense)."""
    densities = densities or {}
    return float(sum(2 * m * densities.get(name, 1.0) for name, m in macs.items()))


def sparse_macs(macs: dict[str, int], densities: dict[str, float]) -> float:
    """MACs per sample of the network as it runs: each counted projection at its layer's density (one that is not
    a masked layer, such as nn.MultiheadAttention's packed input projection, dense)."""
    return forward_flops(macs, densities) / 2
