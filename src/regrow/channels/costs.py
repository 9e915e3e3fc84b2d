"""Cost models for channel pruning: a latency table measured on this device, or MACs.

HALP charges a layer for its channels by what the layer costs at that width: ``cost(layer, c_in, c_out)``.
:class:`MacsCost` counts multiply-accumulates; :class:`LatencyTable` times the layer itself (a conv of the same
kernel, stride, padding, groups and input size, at a fixed batch) on the current device, measuring each
``(c_in, c_out)`` the first time it is asked for and caching it on disk. The table's sum leaves out BatchNorms,
activations and adds, so it is below the measured forward (0.7-0.9 of it for ResNet-20 on a CPU, 0.5-0.7 for
MobileNetV2, whose BatchNorms and ReLU6s on the expanded maps are a fifth of its time), but those
passes shrink with the same channels and the sum *scales* with the measured latency: the methods only use ratios
(the budget is a fraction of dense), and ``bench/latency_fidelity.py`` measures how well they are predicted.
``layer_shapes(..., epilogues=True)`` records the BatchNorm and activation modules that run on each layer's output,
and a cell then times the layer with them: the channel methods' default (``latency_epilogues``), since in the
fidelity benchmark, which predicts with both tables side by side, they lowered the largest errors (the mean about
the same).
The cache file is keyed by the device (CPU model or CUDA name, thread count, allocator mode), the torch version and
the batch size; inside, entries are keyed by the layer's shape, so another model, input size
or device measures anew and nothing stale is reused.

On a CPU with glibc, every timing here (table cells and whole models alike) runs with a *steady allocator*
(:func:`steady_allocator`): by default glibc hands activations of a few MB back to the kernel on every free and
takes them again with fresh page faults on the next forward, which made one conv's time swing 2-3x between calls
and charged wide feature maps for page faults rather than arithmetic. Serving stacks avoid that (jemalloc,
tcmalloc, or these same settings), so it is the latency a deployment sees. ``REGROW_STEADY_ALLOCATOR=0`` measures
with the allocator as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import write_json
from ..env import cpu_name, steady_allocator, synchronize
from ..errors import ConfigError
from ..flops import attention_projections

COSTS = ("latency", "macs")


@dataclass(frozen=True)
class LayerShape:
    """What a layer's cost depends on besides its channel counts."""

    kind: str  # "conv" or "linear"
    # conv: the spatial input size; linear: (rows of one sample,), a transformer's tokens (a Linear on (batch,
    # tokens, features) costs tokens × what it costs on one), empty for a plain (batch, features) input
    in_size: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    depthwise: bool = False
    bias: bool = False
    groups: int = 1  # a grouped (not depthwise) conv: its channels are never pruned, its cost is still counted
    # (c_in, c_out) of a projection that is not a module (nn.MultiheadAttention's packed q/k/v weight, which its
    # functional forward uses): priced at these widths, never pruned
    fixed: tuple[int, int] | None = None
    calls: int = 1  # times one forward runs the layer (a block shared across depth, a siamese branch): cost × calls
    # the elementwise modules that run on the layer's output right after it, timed with it when recorded
    # (layer_shapes(..., epilogues=True)): "BatchNorm", then an activation such as "ReLU" or "ReLU6"
    epilogue: tuple[str, ...] = ()

    def key(self) -> str:
        fields = asdict(self)
        del fields["fixed"], fields["calls"]  # a cell is one run at these widths
        for optional, default in (("groups", 1), ("epilogue", ())):
            if fields[optional] == default:  # caches written before these existed keep their keys
                del fields[optional]
        return json.dumps(fields, sort_keys=True)

    def out_size(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return self.in_size
        return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1 for i, k, s, p, d in
                     zip(self.in_size, self.kernel, self.stride, self.padding, self.dilation))


# Elementwise modules a layer's epilogue may hold (with whether they take ``inplace``): what a cell rebuilds.
EPILOGUE_ACTIVATIONS = {"ReLU": True, "ReLU6": True, "Hardswish": True, "SiLU": True, "GELU": False}


def layer_shapes(model: nn.Module, example_inputs: torch.Tensor, epilogues: bool = False) -> dict[str, LayerShape]:
    """The :class:`LayerShape` of every Conv/Linear of ``model`` that runs (one forward pass on
    ``example_inputs``), and of ``nn.MultiheadAttention``'s projections, which it uses functionally
    (:func:`regrow.flops.attention_projections`: its ``out_proj`` under the Linear's name, its q/k/v input
    projection with ``fixed`` widths). With ``epilogues``, a conv (or a Linear on one row a sample) whose output
    goes straight into a BatchNorm and/or an activation module records them, so that a latency cell times the
    layer with them: those passes over the output are part of what the layer's width costs."""
    shapes: dict[str, LayerShape] = {}
    hooks = []
    produced: dict[int, str] = {}  # id of a tensor -> the layer whose output it is, through its epilogue so far
    alive: list[torch.Tensor] = []  # keeps those tensors alive during the pass, so that no id is reused
    tails: dict[str, list[str]] = {}

    def follow(name: str, output: torch.Tensor) -> None:
        produced[id(output)] = name
        alive.append(output)

    def record_epilogue(module, inputs, output):
        owner = produced.get(id(inputs[0]))
        if owner is None:
            return
        tail = tails[owner]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not tail and module.num_features == inputs[0].shape[1]:
                tail.append("BatchNorm")
                follow(owner, output)
        elif not tail or tail == ["BatchNorm"]:
            tail.append(type(module).__name__)

    def add(name: str, shape: LayerShape) -> None:
        seen = shapes.get(name)
        if seen is None:
            shapes[name] = shape
        elif replace(seen, calls=1) == shape:
            shapes[name] = replace(seen, calls=seen.calls + 1)
        else:
            raise ConfigError(f"{name} runs on inputs of different sizes in one forward ({seen.in_size} and "
                              f"{shape.in_size}); the channel cost models price one input size per layer")

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0]
            if epilogues and name not in tails and (isinstance(module, nn.Conv2d) or (
                    isinstance(module, nn.Linear) and x.dim() == 2)):  # the first run's epilogue; a cell is 2-D
                tails[name] = []
                follow(name, output)
            if isinstance(module, nn.Linear):
                rows = x.numel() // x.shape[-1]  # of one sample: its tokens, whatever the layout (batch-first or not)
                add(name, LayerShape("linear", () if rows == 1 else (rows,), bias=module.bias is not None))
            else:
                if isinstance(module.padding, str):
                    raise ConfigError(f"{name}: string padding ({module.padding!r}) is not supported by the cost model")
                depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
                add(name, LayerShape(
                    "conv", tuple(x.shape[2:]), tuple(module.kernel_size), tuple(module.stride),
                    tuple(module.padding), tuple(module.dilation), depthwise=depthwise, bias=module.bias is not None,
                    groups=1 if depthwise else module.groups))
        return hook

    def record_attention(name):
        def hook(module, args, kwargs, output):
            bias = {"out_proj": module.out_proj.bias is not None}
            for suffix, (c_in, c_out, rows) in attention_projections(module, args, kwargs).items():
                add(f"{name}.{suffix}", LayerShape(
                    "linear", () if rows == 1 else (rows,), bias=bias.get(suffix, module.in_proj_bias is not None),
                    fixed=None if suffix == "out_proj" else (c_in, c_out)))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(module.register_forward_hook(record(name)))
        elif isinstance(module, nn.MultiheadAttention):
            hooks.append(module.register_forward_hook(record_attention(name), with_kwargs=True))
        elif epilogues and (isinstance(module, nn.modules.batchnorm._BatchNorm)
                            or type(module).__name__ in EPILOGUE_ACTIVATIONS):
            hooks.append(module.register_forward_hook(record_epilogue))
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # fused encoder layers would run no projection as a module
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()
    for name, tail in tails.items():
        if tail:
            shapes[name] = replace(shapes[name], epilogue=tuple(tail))
    return shapes


def fixed_widths(shapes: dict[str, LayerShape]) -> dict[str, tuple[int, int]]:
    """The projections priced at fixed widths (not modules): name -> (c_in, c_out)."""
    return {name: shape.fixed for name, shape in shapes.items() if shape.fixed is not None}


class MacsCost:
    """Cost = multiply-accumulates of one sample through the layer (monotone in both channel counts)."""

    name = "macs"
    unit = "MMACs"

    def __init__(self, shapes: dict[str, LayerShape]):
        self.shapes = shapes

    def __call__(self, layer: str, c_in: int, c_out: int) -> float:
        shape = self.shapes[layer]
        per_output = (1 if shape.depthwise else c_in // shape.groups) * math.prod(shape.kernel)
        return shape.calls * c_out * per_output * math.prod(shape.out_size()) / 1e6


def device_key(device: torch.device | str, batch_size: int) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        allocator = "steady" if steady_allocator() else "default"
        name = f"{cpu_name()}|threads={torch.get_num_threads()}|allocator={allocator}"
    return f"{device.type}|{name}|torch={torch.__version__}|batch={batch_size}"


def default_cache_dir() -> Path:
    root = os.environ.get("REGROW_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                              or os.path.expanduser("~/.cache"), "regrow")
    return Path(root) / "latency"


# A fixed layer every cell is timed against (see time_layer): 32 -> 32 channels, 3x3, on a 16x16 map.
REFERENCE_SHAPE = LayerShape("conv", (16, 16), (3, 3), (1, 1), (1, 1), (1, 1))
REFERENCE_CHANNELS = 32


def _epilogue(shape: LayerShape, c_out: int) -> list[nn.Module]:
    modules = []
    for kind in shape.epilogue:
        if kind == "BatchNorm":
            modules.append(nn.BatchNorm2d(c_out) if shape.kind == "conv" else nn.BatchNorm1d(c_out))
        else:
            inplace = EPILOGUE_ACTIVATIONS[kind]
            modules.append(getattr(nn, kind)(inplace=True) if inplace else getattr(nn, kind)())
    return modules


def _layer_and_input(shape: LayerShape, c_in: int, c_out: int, batch_size: int) -> tuple[nn.Module, torch.Tensor]:
    if shape.kind == "linear":
        layer, x = nn.Linear(c_in, c_out, bias=shape.bias), torch.randn(batch_size, *shape.in_size, c_in)
    else:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(shape.in_size)]
        groups = c_out if shape.depthwise else shape.groups
        c_in = c_out if shape.depthwise else c_in
        layer = conv(c_in, c_out, shape.kernel, shape.stride, shape.padding, shape.dilation, groups=groups,
                     bias=shape.bias)
        x = torch.randn(batch_size, c_in, *shape.in_size)
    return (nn.Sequential(layer, *_epilogue(shape, c_out)) if shape.epilogue else layer), x


def time_layer(shape: LayerShape, c_in: int, c_out: int, batch_size: int, device: torch.device | str,
               repeats: int = 15, warmup: int = 3, reference_ms: float | None = None) -> float:
    """Median wall time (ms) of one forward of the layer at these channel counts, batch ``batch_size``.

    With ``reference_ms`` (the reference layer's own median, measured once per table), every run of the layer is
    followed by a run of the reference layer and the result is ``median(layer) / median(reference) *
    reference_ms``: a shared machine's speed drifts by 10-15 % between one second and the next, which a ratio of
    interleaved runs cancels (cell-to-cell spread 3 % instead of 12 % on the benchmark machine).
    """
    device = torch.device(device)
    if device.type == "cpu":
        steady_allocator()
    runs = [_layer_and_input(shape, c_in, c_out, batch_size)]
    if reference_ms is not None:
        runs.append(_layer_and_input(REFERENCE_SHAPE, REFERENCE_CHANNELS, REFERENCE_CHANNELS, batch_size))
    runs = [(layer.to(device).eval(), x.to(device)) for layer, x in runs]
    times: list[list[float]] = [[] for _ in runs]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for (layer, x), t in zip(runs, times):
                layer(x)  # untimed: the timed run finds its weights and input in cache, as inside a network
                synchronize(device)
                start = time.perf_counter()
                layer(x)
                synchronize(device)
                if i >= warmup:
                    t.append((time.perf_counter() - start) * 1e3)
    if reference_ms is None:
        return statistics.median(times[0])
    return statistics.median(times[0]) / statistics.median(times[1]) * reference_ms


def home_relative(path: Path) -> str:
    """``path`` with the home directory written as ``~`` where it lies under it; unchanged otherwise."""
    try:
        return str(Path("~") / Path(path).resolve().relative_to(Path.home().resolve()))
    except (ValueError, RuntimeError):  # outside home, or no home directory to resolve
        return str(path)


class LatencyTable:
    """Measured per-layer latency (ms) on ``device`` at ``batch_size``, filled lazily and cached on disk.

    Cells are timed against a fixed reference layer (:func:`time_layer`) whose own latency is measured once, when
    the cache is created, and kept in it: all cells of a cache share that scale. ``measure`` replaces that
    timing (tests use a counting stub); ``measurements`` counts real measurements made by this
    instance (cache hits do not count).
    """

    FORMAT = 2  # 2: cells relative to a stored reference latency

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
        self.measure = measure or self._time_against_reference
        self.measurements = 0
        self.entries: dict[str, dict[str, float]] = {}
        self.reference_ms: float | None = None
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = None  # a broken cache is measured again, never trusted
            if isinstance(data, dict) and data.get("device") == self.key and data.get("format") == self.FORMAT:
                self.reference_ms, self.entries = self._validated(data)
        self._dirty = False

    # A cell further than this factor from the reference layer's latency is not a measurement of this device.
    SANE_RATIO = 1e4

    def _validated(self, data: dict) -> tuple[float | None, dict[str, dict[str, float]]]:
        """The cache's reference and the cells that can be true measurements: finite, positive, within
        ``SANE_RATIO`` of the reference. The rest is dropped (measured again when needed), with a warning."""
        reference = data.get("reference_ms")
        entries = data.get("entries")
        if not isinstance(entries, dict) or not (reference is None or (isinstance(reference, (int, float))
                                                                      and math.isfinite(reference) and reference > 0)):
            warnings.warn(f"latency cache {self.path} is damaged; measuring anew", stacklevel=3)
            return None, {}
        kept, dropped = {}, 0
        for shape, row in entries.items():
            if not isinstance(row, dict):
                dropped += 1
                continue
            for cell, value in row.items():
                ok = isinstance(value, (int, float)) and math.isfinite(value) and value > 0
                if ok and reference is not None:
                    ok = reference / self.SANE_RATIO <= value <= reference * self.SANE_RATIO
                if ok:
                    kept.setdefault(shape, {})[cell] = float(value)
                else:
                    dropped += 1
        if dropped:
            warnings.warn(f"latency cache {self.path}: {dropped} cell(s) not finite, not positive or not within "
                          f"{self.SANE_RATIO:g}x of the reference layer; they are measured again", stacklevel=3)
        return reference, kept

    def fingerprint(self) -> dict[str, Any]:
        """Which table a run used: its file (under the home directory written from ``~``, so that a summary shared
        or committed does not name the machine's user), device key, reference latency and a digest of its cells."""
        cells = json.dumps(self.entries, sort_keys=True).encode()
        return {"path": home_relative(self.path), "device": self.key, "reference_ms": self.reference_ms,
                "cells": sum(len(row) for row in self.entries.values()),
                "sha256": hashlib.sha256(cells).hexdigest()}

    def _time_against_reference(self, shape, c_in, c_out, batch_size, device, repeats) -> float:
        if self.reference_ms is None:  # once per cache: the scale every cell is expressed in
            self.reference_ms = time_layer(REFERENCE_SHAPE, REFERENCE_CHANNELS, REFERENCE_CHANNELS, batch_size,
                                           device, repeats=max(100, repeats), warmup=10)
        return time_layer(shape, c_in, c_out, batch_size, device, repeats, reference_ms=self.reference_ms)

    def __call__(self, layer: str, c_in: int, c_out: int) -> float:
        shape = self.shapes[layer]
        row = self.entries.setdefault(shape.key(), {})
        cell = f"{c_in},{c_out}"
        if cell not in row:
            row[cell] = float(self.measure(shape, c_in, c_out, self.batch_size, self.device, self.repeats))
            self.measurements += 1
            self._dirty = True
        return shape.calls * row[cell]

    def retime(self, layer: str, c_in: int, c_out: int, passes: int = 2) -> float:
        """Time a cell ``passes`` more times and keep the median of all its timings (the first included); returns
        the layer's cost as :meth:`__call__` does. A cell is timed once, so a stretch in which the machine was busy
        stays in it; the dense network's cells, the denominator of every budget, are timed again so (a grid's
        table read its dense sum 15 % high, ``bench/table_recheck.py``)."""
        shape = self.shapes[layer]
        row = self.entries.setdefault(shape.key(), {})
        cell = f"{c_in},{c_out}"
        timings = [row[cell]] if cell in row else []
        timings += [float(self.measure(shape, c_in, c_out, self.batch_size, self.device, self.repeats))
                    for _ in range(passes)]
        self.measurements += passes
        row[cell] = statistics.median(timings)
        self._dirty = True
        return shape.calls * row[cell]

    def save(self) -> None:
        """Write new measurements to the cache (atomically; called by the methods after each use)."""
        if self._dirty:
            write_json(self.path, {"device": self.key, "format": self.FORMAT, "reference_ms": self.reference_ms,
                                   "entries": self.entries})
            self._dirty = False


def make_cost_model(kind: str, model: nn.Module, example_inputs: torch.Tensor, epilogues: bool = False,
                    **options) -> MacsCost | LatencyTable:
    shapes = layer_shapes(model, example_inputs, epilogues=epilogues and kind == "latency")
    if kind == "macs":
        return MacsCost(shapes)
    if kind == "latency":
        return LatencyTable(shapes, **options)
    raise ConfigError(f"unknown cost model {kind!r}; choose from {', '.join(COSTS)}")
