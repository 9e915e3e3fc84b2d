"""Channel structure: which channels must be pruned together, from Torch-Pruning's dependency graph.

A *channel group* is a set of coupled channel dimensions: removing channel i of the group removes the i-th output
channel of every producer in it (convs, linears, BatchNorms, a residual stage's adds) and the matching input
channel of every consumer. Residual stages, depthwise convolutions (input channel = output channel) and
concatenations are followed by the dependency graph, not by a second tracer of our own. Attention heads, which
the graph couples unevenly, become groups of whole heads where regrow knows the attention module (:mod:`.heads`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import masking
from ..errors import ConfigError

OUT, IN = "out", "in"


@dataclass
class ChannelGroup:
    """Coupled channels, named after the layer whose output channels start the group.

    ``members`` are ``(module name, "out" | "in", channel indices)``: which dimension of which module follows
    the group. For most members the indices are 0..size-1; a consumer of a concatenation sees the group's
    channels at an offset.
    """

    root: str
    size: int
    members: list[tuple[str, str, list[int]]] = field(default_factory=list)
    excluded: str | None = None  # why regrow leaves this group whole (None: it can be pruned)
    unit: str = "channel"  # what one of its ``size`` units is: a channel, or a whole attention head (heads.py)
    chunk: int | None = None  # units per knapsack item; None: the method's group_size (a head is its own item)

    def modules(self, role: str | None = None) -> list[str]:
        return [name for name, r, _ in self.members if role is None or r == role]


def _tracer():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ConfigError("channel structure needs the torch-pruning package (pip install torch-pruning)") from e
    return tp


def channel_groups(model: nn.Module, example_inputs: torch.Tensor, ignored: list[str] = (),
                   include_last: bool = False) -> list[ChannelGroup]:
    """Coupled channel groups of ``model`` (traced on ``example_inputs``), one per prunable set of channels.

    The output channels of the last Linear layer (the classes) are never a group unless ``include_last``;
    ``ignored`` names further layers whose output channels must stay. A model the graph cannot trace is a
    :class:`ConfigError`. Groups that regrow cannot prune exactly carry the reason in ``excluded`` (see
    :func:`exclusion`); callers leave them whole.
    """
    tp = _tracer()
    names = {module: name for name, module in model.named_modules()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    modules = dict(model.named_modules())
    unknown_names = [n for n in ignored if n not in modules]
    if unknown_names:
        raise ConfigError(f"no layer named {', '.join(map(repr, unknown_names))} in the model")
    ignored_modules = [modules[n] for n in ignored]
    if linears and not include_last:
        ignored_modules.append(linears[-1])
    was_training = model.training
    try:
        with torch.enable_grad():  # the tracer follows autograd: under torch.no_grad() there would be no graph
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        raw_groups = list(graph.get_all_groups(ignored_layers=ignored_modules,
                                               root_module_types=[nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]))
    except Exception as e:  # the tracer raises many kinds of errors on models it cannot follow
        raise ConfigError(f"the dependency graph cannot trace this model ({type(e).__name__}: {e})") from None
    finally:
        model.train(was_training)
    tied = masking.tied_weights(model)
    groups = []
    for raw in raw_groups:
        members = []
        for item in raw.items:
            module = item.dep.target.module
            if module not in names:
                continue  # graph nodes for operations (adds, concats, activations) carry no parameters
            handler = getattr(item.dep.handler, "__name__", str(item.dep.handler))
            role = IN if "in_channels" in handler else OUT
            members.append((names[module], role, [int(i) for i in item.idxs]))
        if not members:
            continue
        root_name, _, root_idxs = members[0]
        group = ChannelGroup(root=root_name, size=len(root_idxs), members=members)
        group.excluded = exclusion(group, modules, tied)
        groups.append(group)
    for refine in REFINERS:
        groups = refine(model, groups)
    for group in groups:
        if group.unit != "channel":
            group.excluded = exclusion(group, modules, tied)
    return groups


# Functions ``(model, groups) -> groups`` that replace graph groups by what the graph cannot see (attention heads:
# :mod:`.heads`, which registers itself when ``regrow.channels`` is imported).
REFINERS: list = []


def exclusion(group: ChannelGroup, modules: dict[str, nn.Module], tied: dict[str, list[str]] | None = None
              ) -> str | None:
    """Why ``group`` cannot be pruned channel by channel, or None. A member whose coupled channels do not map evenly
    onto the group's (attention heads: a packed q/k/v projection reshaped into heads) would be cut inconsistently.
    A grouped (not depthwise) conv splits its
    channels into blocks that must keep equal sizes, which removing single channels breaks (its export would
    compute another function); a member that is not a Conv, Linear or BatchNorm (a LayerNorm, a layer of the
    user's own) cannot carry regrow's channel masks; nor can a layer whose weight another module holds too
    (``tied``: :func:`regrow.masking.tied_weights`)."""
    for name, _, _ in group.members:
        if tied and name in tied:
            return f"contains {name}, whose weight is {masking.tie_reason(tied[name])}"
        if isinstance(modules[name], masking.PRUNABLE_TYPES) and masking.computed_weight(modules[name]):
            return f"contains {name}: {masking.COMPUTED_WEIGHT}"
    for name, _, idxs in group.members:
        if not idxs or len(idxs) % group.size:
            # e.g. an attention block's packed q/k/v projection, whose output is reshaped into heads: its channels
            # map onto the output projection's unevenly, and removing them one by one would mix the heads.
            return (f"contains {name}, whose {len(idxs)} coupled channels do not map evenly onto the group's "
                    f"{group.size} (a reshape, such as attention heads, couples them): not pruned channel by channel")
    for name, _, _ in group.members:
        module = modules[name]
        groups = getattr(module, "groups", 1)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and groups > 1 and \
                not groups == module.in_channels == module.out_channels:
            return f"contains {name}, a grouped conv ({groups} groups): its channels cannot be removed one by one"
        if not isinstance(module, _CHANNEL_TYPES):
            return f"contains {name}, a {type(module).__name__}: channel masks cover Conv, Linear and BatchNorm"
    return None


_CHANNEL_TYPES = masking.PRUNABLE_TYPES + masking.NORM_TYPES


class ChannelMasks:
    """Soft channel masks for coupled groups, on the weight-masking core.

    A channel of a group is off when, in every member, its output row (conv/linear weight and bias, BatchNorm
    gamma and beta) and its input column (consumers' weights) are masked. Values stay in memory, so a channel
    that comes back (IEE) returns with what it had. Grouped convolutions follow their input channels through the
    producer's zeros (their ``in`` member is not masked; a depthwise conv is an ``out`` member of its group).
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]):
        modules = dict(model.named_modules())
        self.groups = groups
        self.modules: dict[str, nn.Module] = {}
        for group in groups:
            for name, _, _ in group.members:
                module = modules[name]
                if not isinstance(module, _CHANNEL_TYPES):
                    raise ConfigError(f"channel masks support Conv, Linear and BatchNorm layers; {name!r} in the "
                                      f"group of {group.root!r} is a {type(module).__name__}")
                self.modules[name] = module
        for module in self.modules.values():
            masking.add_mask(module, bias=True)
        self._out = {n: torch.ones(masking.raw(m).shape[0], dtype=torch.bool) for n, m in self.modules.items()}
        self._in = {n: torch.ones(masking.raw(m).shape[1], dtype=torch.bool) for n, m in self.modules.items()
                    if masking.raw(m).dim() > 1}
        self.keep = [torch.ones(g.size, dtype=torch.bool) for g in groups]

    def set_keep(self, index: int, keep: torch.Tensor) -> None:
        """Install the kept channels of group ``index`` (a bool vector of the group's size)."""
        group = self.groups[index]
        keep = keep.bool()
        if keep.shape != (group.size,):
            raise ConfigError(f"group {group.root!r} has {group.size} channels, "
                              f"got a keep vector of {tuple(keep.shape)}")
        self.keep[index] = keep.clone()
        touched = set()
        for name, role, idxs in group.members:
            module = self.modules[name]
            expanded = keep.repeat_interleave(len(idxs) // group.size)  # a flatten repeats each channel
            if role == OUT:
                self._out[name][idxs] = expanded
            elif masking.raw(module).dim() > 1 and getattr(module, "groups", 1) == 1:
                self._in[name][idxs] = expanded
            touched.add(name)
        for name in touched:
            self._refresh(name)

    def _refresh(self, name: str) -> None:
        module, out = self.modules[name], self._out[name]
        if masking.raw(module).dim() == 1:  # BatchNorm
            masking.set_mask(module, out)
        else:
            shape = (-1, 1) + (1,) * (masking.raw(module).dim() - 2)
            mask = out.view(shape) & self._in[name].view((1, -1) + (1,) * (masking.raw(module).dim() - 2))
            masking.set_mask(module, mask.expand_as(masking.raw(module)))
        if masking.raw(module, "bias") is not None:
            masking.set_mask(module, out, "bias")

    def zero_masked_inputs(self) -> None:
        """Zero the stored weights of every input column masked now: the consumers' side of the channels that are
        off, so that those channels, switched back on, reach nothing until their consumers learn to use them (a
        grouped conv's input follows its producer and has no column mask)."""
        with torch.no_grad():
            for name, columns in self._in.items():
                if not columns.all():
                    masking.raw(self.modules[name])[:, ~columns] = 0

    def active_out(self, name: str) -> int:
        return int(self._out[name].sum())

    def active_in(self, name: str) -> int:
        """Active input channels of ``name`` (a grouped conv's follow its output channels when depthwise)."""
        module = self.modules[name]
        if getattr(module, "groups", 1) > 1:
            return self.active_out(name) if module.groups == module.out_channels else module.in_channels
        return int(self._in[name].sum())

    def kept_indices(self) -> dict[str, list[int]]:
        """The kept channels of every group, by root name (the recorded structure of an export)."""
        return {g.root: torch.nonzero(k).flatten().tolist() for g, k in zip(self.groups, self.keep)}

    def state_dict(self) -> dict[str, list[bool]]:
        return {g.root: k.tolist() for g, k in zip(self.groups, self.keep)}

    def load_state_dict(self, state: dict[str, list[bool]]) -> None:
        roots = [g.root for g in self.groups]
        if sorted(state) != sorted(roots):
            raise ConfigError("channel mask state is for other channel groups (another model?)")
        for i, root in enumerate(roots):
            self.set_keep(i, torch.tensor(state[root], dtype=torch.bool))
