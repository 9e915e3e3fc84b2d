"""Criteria: how important each weight is. A criterion maps (weight, gradient) to a score of the same shape.

``magnitude`` needs no gradient. ``gradient`` and ``taylor`` need the *dense* gradient dL/d(W ⊙ M), which the
masking core records on request (``masking.capture_dense_grad``); :class:`ScoreAccumulator` sums it over steps.
``channel_taylor`` scores whole channels (HALP's Taylor-BN), for the channel methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import masking
from .channels.groups import OUT, ChannelMasks
from .errors import ConfigError, unknown


def magnitude(weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """|w|."""
    return weight.detach().abs()


def gradient(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """|g|: RigL's growth score."""
    if grad is None:
        raise ConfigError("the gradient criterion needs a recorded gradient")
    return grad.detach().abs()


def taylor(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """|w·g|: first-order Taylor estimate of the loss change when the weight is removed."""
    if grad is None:
        raise ConfigError("the taylor criterion needs a recorded gradient")
    return (weight.detach() * grad.detach()).abs()


CRITERIA: dict[str, Callable] = {"magnitude": magnitude, "gradient": gradient, "taylor": taylor}
NEEDS_GRADIENT = {"gradient", "taylor"}


def get_criterion(name: str) -> Callable:
    if name not in CRITERIA:
        raise unknown("criterion", name, CRITERIA)
    return CRITERIA[name]


class ScoreAccumulator:
    """Accumulate a gradient criterion over several steps, e.g. IEE's H importance-estimation steps.

    ``mode="abs_of_sum"`` keeps the signed per-step terms (w·g or g) and takes |Σ| at the end, the Taylor
    estimate of the loss change over the interval; ``"sum_of_abs"`` sums the per-step scores instead.
    """

    def __init__(self, criterion: str = "taylor", mode: str = "abs_of_sum"):
        if criterion not in NEEDS_GRADIENT:
            raise ConfigError(f"only gradient criteria accumulate ({', '.join(sorted(NEEDS_GRADIENT))})")
        if mode not in ("abs_of_sum", "sum_of_abs"):
            raise unknown("accumulation mode", mode, ["abs_of_sum", "sum_of_abs"])
        self.criterion, self.mode = criterion, mode
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, weight: torch.Tensor, grad: torch.Tensor) -> None:
        term = grad.detach() if self.criterion == "gradient" else weight.detach() * grad.detach()
        if self.mode == "sum_of_abs":
            term = term.abs()
        self.total = term.clone() if self.total is None else self.total + term
        self.count += 1

    def score(self) -> torch.Tensor:
        if self.total is None:
            raise ConfigError("no step was accumulated")
        return (self.total / self.count).abs()

    def reset(self) -> None:
        self.total, self.count = None, 0


def channel_taylor(masks: ChannelMasks, index: int) -> torch.Tensor:
    """HALP's first-order Taylor importance of every channel of group ``index``, from the current ``.grad``s.

    |Σ over the group's BatchNorms of (γ·∂L/∂γ + β·∂L/∂β)| per channel; a group without BatchNorm uses
    |Σ over its producing layers of Σ_filter w·∂L/∂w|. Masked channels have zero gradient and score 0.
    """
    group = masks.groups[index]
    total = torch.zeros(group.size)
    norms = [(n, i) for n, r, i in group.members if r == OUT and isinstance(masks.modules[n], masking.NORM_TYPES)]
    producers = norms or [(n, i) for n, r, i in group.members if r == OUT]
    for name, idxs in producers:
        module = masks.modules[name]
        for param in (masking.raw(module, "weight"), masking.raw(module, "bias")):
            if param is None or param.grad is None:
                continue
            contribution = (param.detach() * param.grad)
            if contribution.dim() > 1:
                contribution = contribution.flatten(1).sum(1)
            total += contribution[idxs].reshape(group.size, -1).sum(1)
    return total.abs()
