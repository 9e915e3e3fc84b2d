"""Callbacks for the training loops users already have: the Hugging Face ``Trainer`` (:mod:`.huggingface`) and
Lightning (:mod:`.lightning`). Each builds a regrow sparsifier on the framework's model and optimizer when training
starts and calls ``sp.step()`` after every optimizer step; the frameworks are optional extras
(``pip install regrow[huggingface]`` or ``regrow[lightning]``) imported only by their module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import methods
from ..errors import ConfigError


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
