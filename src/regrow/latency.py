"""Cost models for channel pruning: a latency table measured on this device, or MACs.

HALP charges a layer for its channels by what the layer costs at that width: ``cost(layer, c_in, c_out)``.
:class:`MacsCost` counts multiply-accumulates; :class:`LatencyTable` times the layer itself (a conv of the same
kernel, stride, padding, groups and input size, at a fixed batch) on the current device, measuring each
``(c_in, c_out)`` the first time it is asked for and caching it on disk. A conv whose output goes straight into a
BatchNorm is timed with that BatchNorm and one elementwise pass after it (the activation, or the residual add that
precedes it): on a CPU these memory-bound passes over the conv's output cost about as much as the convs
themselves in a small net (ResNet-20 at batch 64: the convs alone summed to 34 ms of a 71 ms forward), and they
shrink with the same output channels, so a table without them misjudges which channels are expensive.
The cache file is keyed by the device (CPU model or CUDA name, thread count), the torch version and the batch size;
inside, entries are keyed by the layer's shape (its epilogue included), so another model, input size or device
measures anew and nothing stale is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import write_json
from .errors import ConfigError

COSTS = ("latency", "macs")


@dataclass(frozen=True)
class LayerShape:
    """What a layer's cost depends on besides its channel counts."""

    kind: str  # "conv" or "linear"
    in_size: tuple[int, ...]  # spatial input size (empty for linear)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    depthwise: bool = False
    bias: bool = False
    epilogue: tuple[str, ...] = ()  # ("bn", "act"): timed with the BatchNorm it feeds and one elementwise pass

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def out_size(self) -> tuple[int, ...]:
        return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1 for i, k, s, p, d in
                     zip(self.in_size, self.kernel, self.stride, self.padding, self.dilation))


def layer_shapes(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, LayerShape]:
    """The :class:`LayerShape` of every Conv/Linear of ``model`` (one forward pass on ``example_inputs``)."""
    shapes: dict[str, LayerShape] = {}
    hooks = []
    order: list[tuple] = []  # (name, module, input, output) of convs and BatchNorms as they ran

    def trace(name):
        def hook(module, inputs, output):
            order.append((name, module, inputs[0] if inputs else None, output))
        return hook

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Linear):
                shapes[name] = LayerShape("linear", (), bias=module.bias is not None)
            else:
                if isinstance(module.padding, str):
                    raise ConfigError(f"{name}: string padding ({module.padding!r}) is not supported by the cost model")
                shapes[name] = LayerShape(
                    "conv", tuple(x.shape[2:]), tuple(module.kernel_size), tuple(module.stride),
                    tuple(module.padding), tuple(module.dilation),
                    depthwise=module.groups > 1 and module.groups == module.in_channels == module.out_channels,
                    bias=module.bias is not None)
                if module.groups > 1 and not shapes[name].depthwise:
                    raise ConfigError(f"{name}: grouped (non-depthwise) convolutions are not supported by the "
                                      "cost model")
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(module.register_forward_hook(record(name)))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)):
            hooks.append(module.register_forward_hook(trace(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    # A conv whose very output tensor is the input of a BatchNorm is charged with it (see the module docstring).
    for (name, _, _, output), (_, after, after_input, _) in zip(order, order[1:]):
        if name in shapes and isinstance(after, nn.modules.batchnorm._BatchNorm) and after_input is output:
            shapes[name] = replace(shapes[name], epilogue=("bn", "act"))
    return shapes


class MacsCost:
    """Cost = multiply-accumulates of one sample through the layer (monotone in both channel counts)."""

    name = "macs"
    unit = "MMACs"

    def __init__(self, shapes: dict[str, LayerShape]):
        self.shapes = shapes

    def __call__(self, layer: str, c_in: int, c_out: int) -> float:
        shape = self.shapes[layer]
        per_output = (1 if shape.depthwise else c_in) * math.prod(shape.kernel)
        return c_out * per_output * math.prod(shape.out_size()) / 1e6


def device_key(device: torch.device | str, batch_size: int) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        from .training import _cpu_name  # the same CPU name the run summaries record
        name = f"{_cpu_name()}|threads={torch.get_num_threads()}"
    return f"{device.type}|{name}|torch={torch.__version__}|batch={batch_size}"


def default_cache_dir() -> Path:
    root = os.environ.get("REGROW_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                              or os.path.expanduser("~/.cache"), "regrow")
    return Path(root) / "latency"


def time_layer(shape: LayerShape, c_in: int, c_out: int, batch_size: int, device: torch.device | str,
               repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time (ms) of one forward of the layer at these channel counts, batch ``batch_size``."""
    device = torch.device(device)
    if shape.kind == "linear":
        layer, x = nn.Linear(c_in, c_out, bias=shape.bias), torch.randn(batch_size, c_in)
    else:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(shape.in_size)]
        groups = c_out if shape.depthwise else 1
        c_in = c_out if shape.depthwise else c_in
        layer = conv(c_in, c_out, shape.kernel, shape.stride, shape.padding, shape.dilation, groups=groups,
                     bias=shape.bias)
        if shape.epilogue:
            norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(shape.in_size)]
            layer = nn.Sequential(layer, norm(c_out), nn.ReLU(inplace=True))
        x = torch.randn(batch_size, c_in, *shape.in_size)
    layer, x = layer.to(device).eval(), x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            layer(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class LatencyTable:
    """Measured per-layer latency (ms) on ``device`` at ``batch_size``, filled lazily and cached on disk.

    ``measure`` replaces :func:`time_layer` (tests use a counting stub); ``measurements`` counts real
    measurements made by this instance (cache hits do not count).
    """

    name = "latency"
    unit = "ms"

    def __init__(self, shapes: dict[str, LayerShape], device: torch.device | str = "cpu", batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None, repeats: int = 15,
                 measure: Callable[..., float] | None = None, key: str | None = None):
        if batch_size < 1:
            raise ConfigError(f"latency batch size must be >= 1, got {batch_size}")
        self.shapes, self.device, self.batch_size, self.repeats = shapes, torch.device(device), batch_size, repeats
        self.key = key or device_key(self.device, batch_size)
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:16]
        self.path = Path(cache_dir or default_cache_dir()) / f"latency-{digest}.json"
        self.measure = measure or time_layer
        self.measurements = 0
        self.entries: dict[str, dict[str, float]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = None  # a broken cache is measured again, never trusted
            if isinstance(data, dict) and data.get("device") == self.key:
                self.entries = data.get("entries", {})
        self._dirty = False

    def __call__(self, layer: str, c_in: int, c_out: int) -> float:
        shape = self.shapes[layer]
        row = self.entries.setdefault(shape.key(), {})
        cell = f"{c_in},{c_out}"
        if cell not in row:
            row[cell] = float(self.measure(shape, c_in, c_out, self.batch_size, self.device, self.repeats))
            self.measurements += 1
            self._dirty = True
        return row[cell]

    def save(self) -> None:
        """Write new measurements to the cache (atomically; called by the methods after each use)."""
        if self._dirty:
            write_json(self.path, {"device": self.key, "entries": self.entries})
            self._dirty = False


def make_cost_model(kind: str, model: nn.Module, example_inputs: torch.Tensor, **options) -> MacsCost | LatencyTable:
    shapes = layer_shapes(model, example_inputs)
    if kind == "macs":
        return MacsCost(shapes)
    if kind == "latency":
        return LatencyTable(shapes, **options)
    raise ConfigError(f"unknown cost model {kind!r}; choose from {', '.join(COSTS)}")
