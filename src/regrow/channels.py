"""Channel structure: which channels must be pruned together, from Torch-Pruning's dependency graph.

A *channel group* is a set of coupled channel dimensions: removing channel i of the group removes the i-th output
channel of every producer in it (convs, linears, BatchNorms, a residual stage's adds) and the matching input
channel of every consumer. Residual stages, depthwise convolutions (input channel = output channel) and
concatenations are followed by the dependency graph, not by a second tracer of our own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError

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
    :class:`ConfigError`.
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
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        raw_groups = list(graph.get_all_groups(ignored_layers=ignored_modules,
                                               root_module_types=[nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]))
    except Exception as e:  # the tracer raises many kinds of errors on models it cannot follow
        raise ConfigError(f"the dependency graph cannot trace this model ({type(e).__name__}: {e})") from None
    finally:
        model.train(was_training)
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
        groups.append(ChannelGroup(root=root_name, size=len(root_idxs), members=members))
    return groups
