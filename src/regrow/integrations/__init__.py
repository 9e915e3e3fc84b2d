"""Callbacks for the training loops users already have: the Hugging Face ``Trainer`` (:mod:`.huggingface`) and
Lightning (:mod:`.lightning`). Each builds a regrow sparsifier on the framework's model and optimizer when training
starts and calls ``sp.step()`` after every optimizer step; the frameworks are optional extras
(``pip install regrow[huggingface]`` or ``regrow[lightning]``) imported only by their module."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .. import masking, methods
from ..errors import CheckpointError, ConfigError


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Accelerate's, Lightning's): the optimizer guard hooks
    the optimizer whose ``step`` really runs."""
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"found no torch optimizer in {type(optimizer).__name__}")
    return optimizer


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel and ``torch.compile`` wrappers: masks go on the module that holds
    the parameters. Only those wrapper types are unwrapped (a model's own submodule named ``module`` is not)."""
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model, OptimizedModule):
            model = model._orig_mod
        else:
            return model


class SparsifierFactory:
    """``method`` (a name of ``regrow methods``, or a class) and its options, built once the framework has made
    the model and the optimizer and knows how many optimizer steps training takes."""

    def __init__(self, method: str | type = "rigl", **options: Any):
        if isinstance(method, str):
            methods.resolve(method, options.get("structure", "unstructured"))  # an unknown name fails now
        self.method, self.options = method, options

    def build(self, model: nn.Module, optimizer: Any, total_steps: int) -> methods.BaseSparsifier:
        model, optimizer = unwrap_model(model), unwrap_optimizer(optimizer)
        options = {"total_steps": int(total_steps), **self.options}
        if isinstance(self.method, str):
            return methods.create(self.method, model, optimizer, **options)
        return self.method(model, optimizer, **options)

    def resume(self, model: nn.Module, optimizer: Any, total_steps: int, masks: dict[str, torch.Tensor],
               state: dict[str, Any], source: Any) -> methods.BaseSparsifier:
        """Build on a model and optimizer the framework has just loaded from a checkpoint (``source``), then install
        that checkpoint's ``masks`` (state-dict keys such as ``layer.weight_mask``) and sparsifier ``state``.
        Building draws start masks, zeroing the weights and optimizer state outside them: both are kept aside and
        put back."""
        net, inner = unwrap_model(model), unwrap_optimizer(optimizer)
        weights = {n: p.detach().clone() for n, p in net.named_parameters()}
        optimizer_state = copy.deepcopy(inner.state_dict())
        sparsifier = self.build(model, optimizer, total_steps)
        modules = dict(net.named_modules())
        for key, mask in masks.items():
            owner, param = masking.mask_owner(key)
            if owner not in modules or not masking.is_masked(modules[owner]):
                raise CheckpointError(f"{source} holds a mask for {owner!r}, which the sparsifier does not mask here "
                                      "(other options than the saved run?)")
            masking.set_mask(modules[owner], mask.bool(), param)
        sparsifier.load_state_dict(state)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(weights[name])
        inner.load_state_dict(optimizer_state)
        return sparsifier


def mask_entries(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The keys of a state dict that are regrow masks (``layer.weight_mask``, ``layer.bias_mask``)."""
    return [k for k in state_dict if masking.mask_owner(k) is not None]
