"""The masking core: binary masks that live in the model, and an optimizer guard that keeps them honest.

A masked layer keeps its dense ``weight`` parameter (so pruned values are remembered, as IEE needs) and gets a
buffer ``weight_mask`` in its own ``state_dict``. Its class is swapped for a subclass in which ``weight`` is a
property: reading ``module.weight`` gives ``weight ⊙ weight_mask``, wherever it is read — the layer's own forward,
a functional use by another module (``nn.MultiheadAttention`` reads ``out_proj.weight``), PyTorch's fused inference
paths, ``eval()`` and ``torch.no_grad()`` alike. The parameter itself (``masking.raw(module)``, or
``module._parameters["weight"]``) keeps its identity, so an optimizer built before masking still works, and the
state dict keeps its keys. This is what ``torch.nn.utils.parametrize`` does, without renaming the parameter.
Channel sparsity masks more than weights: ``add_mask(module, bias=True)`` also masks the bias (``bias_mask``), and
BatchNorm layers can be masked too (gamma and beta; the running statistics of masked channels are held at their
last value, so a channel that comes back finds the statistics it left with).

Which entries the optimizer may change is a second, separate set per layer, the *trainable* set. By default it
equals the mask; IEE's exploration sets it to the complement of the mask (active weights frozen). The
:class:`OptimizerGuard` makes every non-trainable entry bit-identical across ``optimizer.step()`` (value and
per-entry optimizer state such as momentum or Adam moments), whatever the optimizer does with weight decay or
momentum. It can also scale the step of chosen entries (:func:`set_step_scale`): a per-entry learning rate, so
IEE's explored weights can move at a fraction of the rate while the rest of the network trains at the full one.
Masked-out entries additionally have their optimizer state zeroed when they are pruned
(:func:`reset_optimizer_state`), so no momentum builds up behind a pruned weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import CheckpointError, ConfigError

MASK = "weight_mask"
MASKABLE_PARAMS = ("weight", "bias")
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def mask_name(param: str) -> str:
    return f"{param}_mask"


class _MaskedMixin:
    """Masked parameters read as ``raw ⊙ mask`` (see :func:`_masked_property`).

    The dense gradient dL/d(raw ⊙ mask), pruned entries included (RigL's growth score), is captured by a *probe*:
    while capture is on, the weight reads ``raw ⊙ mask + probe`` with ``probe`` a zero tensor that requires grad,
    so autograd leaves dL/d(weight) in ``probe.grad`` (summed over every read of the weight in the step, its
    total gradient). Adding zeros changes no value, and unlike a tensor hook it does not break a
    ``torch.compile`` graph: the compiled forward has one graph with capture on and one without."""


class _StraightThrough(torch.autograd.Function):
    """Forward ``raw ⊙ mask``; backward the dense gradient to every entry, pruned ones included, plus SR-STE's
    λ·(1 − M) ⊙ W that pulls pruned weights towards 0 (Zhou et al. 2021; λ = 0 gives the plain estimator)."""

    @staticmethod
    def forward(ctx, value, mask, srste):
        ctx.save_for_backward(value, mask)
        ctx.srste = srste
        return value * mask

    @staticmethod
    def backward(ctx, grad):
        value, mask = ctx.saved_tensors
        return grad + ctx.srste * (mask == 0) * value, None, None


def _masked_property(param: str) -> property:
    """``module.<param>`` of a masked module: the parameter times its mask, computed at every read, so that no
    forward path can see a pruned value. Without a mask (a bias that channel sparsity does not mask) it is the
    parameter itself."""

    def read(self):
        value = self._parameters[param]
        mask = self._buffers.get(mask_name(param))
        if value is None or mask is None:
            return value
        srste = self._regrow_straight_through.get(param)
        if srste is not None and value.requires_grad:
            return _StraightThrough.apply(value, mask, srste)
        value = value * mask
        if param == "weight" and self._regrow_capture and value.requires_grad:
            value = value + self._regrow_probe
        return value

    return property(read, doc=f"{param} ⊙ {mask_name(param)} (the raw parameter: masking.raw(module, {param!r}))")


def _batch_norm_forward(self, input):  # noqa: A002 - nn.BatchNorm's signature
    # nn.BatchNorm's own forward, with the masked affine parameters; masked channels' running statistics are put
    # back afterwards (a pruned channel sees zeros and would otherwise decay its statistics towards them).
    weight, bias = self.weight, self.bias
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
    use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    tracks = not self.training or self.track_running_stats
    mean, var = (self.running_mean, self.running_var) if tracks else (None, None)
    hold = None
    held = ~self.weight_mask.bool()
    if getattr(self, "_regrow_stats_frozen", None) is not None:
        held = held | self._regrow_stats_frozen  # e.g. IEE's active channels while the pruned ones explore
    if self.training and self.track_running_stats and mean is not None and held.any():
        # Update copies (autograd keeps the tensors batch_norm saw), then take them only where channels are active.
        hold = held
        mean, var = mean.clone(), var.clone()
    out = F.batch_norm(input, mean, var, weight, bias, use_batch_stats, factor, self.eps)
    if hold is not None:
        with torch.no_grad():
            self.running_mean.copy_(torch.where(hold, self.running_mean, mean))
            self.running_var.copy_(torch.where(hold, self.running_var, var))
    return out


_MASKED_CLASSES: dict[type, type] = {}


def _masked_class(cls: type) -> type:
    if cls not in _MASKED_CLASSES:
        body: dict = {p: _masked_property(p) for p in MASKABLE_PARAMS}
        if issubclass(cls, NORM_TYPES):
            body["forward"] = _batch_norm_forward  # Linear and Conv keep their own forward: it reads the properties
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (_MaskedMixin, cls), body)
    return _MASKED_CLASSES[cls]


def raw(module: nn.Module, param: str = "weight") -> torch.Tensor | None:
    """The parameter itself: its dense values (pruned entries keep theirs), what the optimizer updates. On a masked
    module ``module.weight`` is ``raw(module) ⊙ mask``."""
    return module._parameters.get(param)


def is_masked(module: nn.Module) -> bool:
    return isinstance(module, _MaskedMixin)


def _holders(model: nn.Module) -> dict[int, dict[tuple[int, str], str]]:
    """id(parameter) -> {(id(module), attribute): a name} of every module attribute holding it."""
    holders: dict[int, dict[tuple[int, str], str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), {}).setdefault((id(module), attr), f"{name}.{attr}" if name else attr)
    return holders


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Linear/Conv layers whose weight parameter another module (or another attribute) holds too, such as an output
    projection tied to a token embedding: layer name -> the other holders. A mask lives on one module, and the
    other reads the raw values, pruned ones included, so a tied weight cannot be masked exactly. (One module
    registered under two names is not a tie: both names are the same masked module.)"""
    holders = _holders(model)
    tied = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and raw(module) is not None:
            others = [n for key, n in holders.get(id(raw(module)), {}).items() if key != (id(module), "weight")]
            if others:
                tied[name] = sorted(others)
    return tied


COMPUTED_WEIGHT = ("its weight is computed from other parameters (weight_norm, spectral_norm or another "
                   "parametrization): regrow masks plain weight parameters only")


def computed_weight(module: nn.Module) -> bool:
    """A Linear/Conv whose ``weight`` is not a parameter of its own but computed (torch.nn.utils.parametrize,
    the older hook-based weight_norm)."""
    return raw(module) is None


def tie_reason(others: list[str]) -> str:
    return (f"shared with {', '.join(others)} (tied weights): a mask on one holder would leave the other reading "
            "the pruned values, so a tied weight is left dense")


def prunable_layers(model: nn.Module, include: Iterable[str] | None = None,
                    exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Linear and Conv layers of ``model`` in registration order (embeddings and norms are never included, nor
    layers whose weight is tied to another module's (:func:`tied_weights`) or computed (:func:`computed_weight`)).

    ``include`` restricts to the given module names; ``exclude`` removes names. Unknown names are an error, and so
    is a tied layer named in ``include``.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    lazy = [n for n, m in layers.items() if any(nn.parameter.is_lazy(p) for p in m.parameters(recurse=False))]
    if lazy:
        raise ConfigError(f"{', '.join(lazy[:3])}{' ...' if len(lazy) > 3 else ''}: lazy layer(s) not initialised "
                          "yet; run one forward pass on a batch first, then sparsify")
    for name in list(include or []) + list(exclude):
        if name not in layers:
            raise ConfigError(f"no prunable Linear/Conv layer named {name!r}; prunable: {', '.join(layers)}")
    tied = tied_weights(model)
    for name in include or []:
        if name in tied:
            raise ConfigError(f"{name}: {tie_reason(tied[name])}; it cannot be included")
        if computed_weight(layers[name]):
            raise ConfigError(f"{name}: {COMPUTED_WEIGHT}; it cannot be included")
    layers = {n: m for n, m in layers.items() if n not in tied and not computed_weight(m)}
    if include is not None:
        wanted = set(include)
        layers = {n: m for n, m in layers.items() if n in wanted}
    for name in exclude:
        layers.pop(name, None)
    return layers


def add_mask(module: nn.Module, bias: bool = False) -> nn.Module:
    """Give ``module`` an all-ones ``weight_mask`` buffer and the masked forward (idempotent).

    ``bias`` masks the bias too (``bias_mask``; channel sparsity). BatchNorm layers (affine) are always masked
    in both gamma and beta: a channel is only gone when its shift is gone as well.
    """
    if isinstance(module, NORM_TYPES):
        if not module.affine:
            raise ConfigError(f"cannot mask {type(module).__name__} without affine parameters")
        bias = True
    elif not isinstance(module, PRUNABLE_TYPES):
        raise ConfigError(f"cannot mask {type(module).__name__}: only Linear, Conv1d/2d/3d and BatchNorm layers "
                          "are supported")
    if not is_masked(module):
        module.register_buffer(MASK, torch.ones_like(raw(module), requires_grad=False))
        module.__class__ = _masked_class(type(module))
        module._regrow_capture = False
        module._regrow_probe = None  # zeros whose .grad is the dense gradient (capture_dense_grad)
        module._regrow_trainable = {}  # param -> bool tensor; absent: trainable set == mask
        module._regrow_step_scale = {}  # param -> (bool tensor, factor): entries whose step is scaled
        module._regrow_straight_through = {}  # param -> SR-STE λ: pruned entries get the dense gradient
    if bias and raw(module, "bias") is not None and "bias_mask" not in module._buffers:
        module.register_buffer("bias_mask", torch.ones_like(raw(module, "bias"), requires_grad=False))
    return module


def masked_params(module: nn.Module) -> list[str]:
    """Names of the masked parameters of a masked module (``weight``, and ``bias`` when its bias is masked)."""
    return [p for p in MASKABLE_PARAMS if mask_name(p) in module._buffers] if is_masked(module) else []


def remove_mask(module: nn.Module, bake: bool = True) -> nn.Module:
    """Undo :func:`add_mask`; with ``bake`` the pruned weights (and biases) are set to zero first."""
    if not is_masked(module):
        return module
    with torch.no_grad():
        for param in masked_params(module):
            if bake:
                raw(module, param).mul_(module._buffers[mask_name(param)])
            del module._buffers[mask_name(param)]
    for attr in ("_regrow_capture", "_regrow_probe", "_regrow_trainable", "_regrow_step_scale",
                 "_regrow_stats_frozen", "_regrow_straight_through"):
        module.__dict__.pop(attr, None)
    module.__class__ = type(module).__mro__[2]  # Masked<cls> -> (_MaskedMixin, cls)
    return module


def computed_owner(modules: dict[str, nn.Module], owner: str) -> str | None:
    """The Linear/Conv whose computed weight the parameter of module ``owner`` feeds (the module itself, with the
    hook-based weight_norm; or the layer holding ``parametrizations.weight``), or None."""
    parts = owner.split(".") if owner else []
    candidates = [owner]
    if "parametrizations" in parts:  # <layer>.parametrizations.weight holds the parametrization's parameters
        last = len(parts) - 1 - parts[::-1].index("parametrizations")
        candidates.append(".".join(parts[:last]))
    for name in candidates:
        if isinstance(modules.get(name), PRUNABLE_TYPES) and computed_weight(modules[name]):
            return name
    return None


def weight_sparsity(model: nn.Module, reasons: dict[str, str] | None = None) -> dict:
    """The zero fraction over every weight matrix of ``model`` (every parameter with two or more dimensions:
    Linear and Conv weights, and also attention projections, embeddings, anything else), masked or not.

    A masked weight counts its masked-out entries, an unmasked one its exact zeros. Returns ``sparsity``, the
    ``masked`` share of all weight entries, and ``left_dense``: the unmasked matrices, each with the reason
    ``reasons`` gives for its module (by module name), or one from its type.
    """
    modules = dict(model.named_modules())
    holders = _holders(model)
    total = zeros = masked = 0
    left_dense: dict[str, str] = {}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        mask = module._buffers.get(mask_name(attr)) if is_masked(module) else None
        total += param.numel()
        if mask is not None:
            zeros += int((mask == 0).sum())
            masked += param.numel()
            continue
        zeros += int((param == 0).sum())
        if reasons and owner in reasons:
            left_dense[name] = reasons[owner]
        elif len(holders[id(param)]) > 1:  # named_parameters() names a shared parameter by its first holder
            left_dense[name] = tie_reason(sorted(n for n in holders[id(param)].values() if n != name))
        elif (layer := computed_owner(modules, owner)) is not None:
            left_dense[name] = f"{layer or 'the model itself'}: {COMPUTED_WEIGHT}"
        elif isinstance(module, nn.MultiheadAttention):
            left_dense[name] = ("nn.MultiheadAttention's own projection weight: its out_proj is a Linear and is "
                                "masked like one, the packed input projection is not masked")
        elif isinstance(module, PRUNABLE_TYPES):
            left_dense[name] = "a Linear/Conv layer outside the sparsified set"
        else:
            left_dense[name] = f"{type(module).__name__} weight: not a layer type regrow masks"
    return {"sparsity": zeros / total if total else 0.0, "masked_share": masked / total if total else 0.0,
            "left_dense": left_dense}


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_masked(m)}


def mask_of(module: nn.Module, param: str = "weight") -> torch.Tensor:
    """The layer's mask of ``param`` as a bool tensor."""
    return module._buffers[mask_name(param)].bool()


def set_mask(module: nn.Module, mask: torch.Tensor, param: str = "weight") -> None:
    target = module._buffers.get(mask_name(param))
    if target is None:
        raise ConfigError(f"{type(module).__name__} has no mask for its {param}")
    if mask.shape != target.shape:
        raise ConfigError(f"mask shape {tuple(mask.shape)} != {param} shape {tuple(target.shape)}")
    target.copy_(mask.to(target.dtype))


def hold_statistics(module: nn.Module, channels: torch.Tensor | None) -> None:
    """Keep a masked BatchNorm's running statistics of ``channels`` (bool per channel) unchanged; ``None`` ends it.
    Masked channels are always held."""
    module._regrow_stats_frozen = None if channels is None else channels.bool().clone()


def set_trainable(module: nn.Module, trainable: torch.Tensor | None, param: str = "weight") -> None:
    """Restrict which entries of ``param`` the optimizer may change (``None``: the active ones, i.e. the mask)."""
    if trainable is None:
        module._regrow_trainable.pop(param, None)
        return
    if trainable.shape != raw(module, param).shape:
        raise ConfigError(f"trainable set must have the {param}'s shape")
    module._regrow_trainable[param] = trainable.bool().clone()


def trainable_of(module: nn.Module, param: str = "weight") -> torch.Tensor:
    trainable = module._regrow_trainable.get(param)
    return mask_of(module, param) if trainable is None else trainable


def set_step_scale(module: nn.Module, where: torch.Tensor | None, factor: float = 1.0, param: str = "weight") -> None:
    """Scale the optimizer's step of the entries ``where`` of ``param`` by ``factor`` (``None``: no scaling).

    The guard applies it after each step as ``before + factor · (after − before)``. For optimizers whose update is
    proportional to the learning rate and whose state does not depend on it (SGD with momentum, Nesterov and
    weight decay; Adam, AdamW, RMSprop, Adagrad), this is exactly a learning rate of ``factor · lr`` for those
    entries.
    """
    if where is None or factor == 1.0:
        module._regrow_step_scale.pop(param, None)
        return
    if where.shape != raw(module, param).shape:
        raise ConfigError(f"step-scale set must have the {param}'s shape")
    if not factor > 0:
        raise ConfigError(f"step scale must be > 0, got {factor}")
    module._regrow_step_scale[param] = (where.bool().clone(), float(factor))


def step_scale_of(module: nn.Module, param: str = "weight") -> tuple[torch.Tensor, float] | None:
    return module._regrow_step_scale.get(param) if is_masked(module) else None


def set_straight_through(module: nn.Module, srste: float | None, param: str = "weight") -> None:
    """Give ``param``'s pruned entries the gradient they would have if they were active (the straight-through
    estimator), plus ``srste``·(1 − M) ⊙ W (SR-STE); ``None`` ends it. The forward is unchanged (``raw ⊙ mask``).
    For methods whose masks follow the weights at every step (UniPTS's dynamic sparse training): pruned weights
    keep learning and can come back. Use it without an optimizer guard, which would hold pruned entries still."""
    if srste is None:
        module._regrow_straight_through.pop(param, None)
        return
    if not srste >= 0:
        raise ConfigError(f"SR-STE's λ must be >= 0, got {srste}")
    module._regrow_straight_through[param] = float(srste)


def capture_dense_grad(module: nn.Module, on: bool = True) -> None:
    """Record dL/d(weight ⊙ mask) at the next backward passes (summed) into ``dense_grad(module)``.

    The probe (a zero tensor the weight's size) exists only while capture is on: RigL holds it for one step in
    every ΔT, so it costs no memory in between. A compiled forward takes a new probe as a new input of the same
    graph, without recompiling (tests/test_masking.py)."""
    module._regrow_capture = on
    weight = raw(module)
    probe = module._regrow_probe
    if on and (probe is None or probe.device != weight.device or probe.dtype != weight.dtype):
        module._regrow_probe = torch.zeros_like(weight, requires_grad=True)
    if not on:
        module._regrow_probe = None


def dense_grad(module: nn.Module) -> torch.Tensor | None:
    """The recorded dL/d(weight ⊙ mask); under data parallelism averaged over the ranks (DDP reduces only the
    parameters' gradients), so that every rank scores with the global batch's gradient."""
    probe = module._regrow_probe
    grad = None if probe is None else probe.grad
    return None if grad is None else distributed.average(grad)


def clear_dense_grad(module: nn.Module) -> None:
    if module._regrow_probe is not None:
        module._regrow_probe.grad = None


def density(module: nn.Module) -> float:
    return float(module.weight_mask.sum().item()) / module.weight_mask.numel() if is_masked(module) else 1.0


def dead_units(module: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a masked layer with no active weight: an output unit (a row of a Linear, an output
    channel of a conv) that computes only its bias, and an input unit no weight reads. A very sparse layer that
    has many is narrower than its shape says; a dead output feeding only dead inputs gets zero gradient on both
    sides, so growth by gradient (RigL) can never revive it. Input channels of a grouped conv count per group."""
    if not is_masked(module):
        return 0, 0
    mask = module.weight_mask.bool()
    outputs = int((~mask.flatten(1).any(1)).sum())
    groups = getattr(module, "groups", 1)
    per_group = mask.reshape(groups, mask.shape[0] // groups, mask.shape[1], -1)  # (groups, out/g, in/g, kernel)
    inputs = int((~per_group.any(3).any(1)).sum())
    return outputs, inputs


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor,
                          where: torch.Tensor) -> None:
    """Zero every per-entry optimizer state tensor of ``param`` (momentum, Adam moments) at ``where``."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)


class OptimizerGuard:
    """Keep non-trainable entries of masked layers bit-identical through ``optimizer.step()``.

    Weight decay and momentum would otherwise move a weight whose gradient is zero. Before each step the guard
    snapshots the value and per-entry state of every layer that has frozen or step-scaled entries; after the step
    it writes them back where the entry is not trainable (state that the step creates, on the first step, is
    zeroed there) and scales the step of step-scaled entries (:func:`set_step_scale`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layers: Iterable[nn.Module]):
        self.optimizer = optimizer
        self.layers = list(layers)
        self._snapshot: list = []
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._snapshot = []
        for module in self.layers:
            for name in masked_params(module):
                param = raw(module, name)
                frozen = ~trainable_of(module, name)
                scaled = step_scale_of(module, name)
                if not frozen.any() and scaled is None:
                    continue
                state = {k: v.clone() for k, v in optimizer.state.get(param, {}).items()
                         if torch.is_tensor(v) and v.shape == param.shape}
                self._snapshot.append((param, frozen, param.detach().clone(), state, scaled))

    def freeze(self, tensors: Iterable[torch.Tensor]) -> None:
        """Hold whole tensors (parameters or buffers such as BatchNorm running statistics) at their current value
        and optimizer state: after every ``optimizer.step()`` they are written back bit for bit."""
        for t in tensors:
            state = {k: v.clone() for k, v in self.optimizer.state.get(t, {}).items()
                     if torch.is_tensor(v) and v.shape == t.shape}
            self._frozen.append((t, t.detach().clone(), state))

    def unfreeze(self) -> None:
        self._frozen = []

    @property
    def frozen(self) -> list[torch.Tensor]:
        return [t for t, _, _ in self._frozen]

    def _after_step(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for tensor, value, state in self._frozen:
                tensor.copy_(value)
                for key, current in optimizer.state.get(tensor, {}).items():
                    if torch.is_tensor(current) and current.shape == tensor.shape:
                        if key in state:
                            current.copy_(state[key])
                        else:
                            current.zero_()
            for param, frozen, value, state, scaled in self._snapshot:
                if scaled is not None:
                    where, factor = scaled
                    param.copy_(torch.where(where, value + factor * (param - value), param))
                param.copy_(torch.where(frozen, value, param))
                for key, current in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(current) and current.shape == param.shape:
                        before = state.get(key)
                        current.copy_(torch.where(frozen, before, current) if before is not None
                                      else current.masked_fill(frozen, 0))
        self._snapshot = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def mask_owner(key: str) -> tuple[str, str] | None:
    """``"layer1.conv.weight_mask"`` -> ``("layer1.conv", "weight")``; None for keys that are not masks."""
    for param in MASKABLE_PARAMS:
        suffix = mask_name(param)
        if key == suffix:
            return "", param
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], param
    return None


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict that may hold masks into ``model`` (of its original class), adding masks as needed.

    Mismatched keys or shapes raise :class:`CheckpointError` naming them, instead of a half-loaded model.
    """
    modules = dict(model.named_modules())
    owners = {key: owner for key in state_dict if (owner := mask_owner(key)) is not None}
    for key, (owner, param) in owners.items():
        if owner not in modules or not isinstance(modules[owner], PRUNABLE_TYPES + NORM_TYPES) \
                or raw(modules[owner], param) is None:
            raise CheckpointError(f"checkpoint has a {param} mask for {owner!r}, which this model has no layer "
                                  "for (checkpoint of another architecture?)")
        if state_dict[key].shape != raw(modules[owner], param).shape:
            raise CheckpointError(f"mask {key} has shape {tuple(state_dict[key].shape)}, its layer's {param} "
                                  f"{tuple(raw(modules[owner], param).shape)}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in owners]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if items:
                parts.append(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise CheckpointError("checkpoint does not match this model (another architecture?): " + "; ".join(parts))
    for owner, param in owners.values():
        add_mask(modules[owner], bias=param == "bias")
    model.load_state_dict(state_dict, strict=True)
