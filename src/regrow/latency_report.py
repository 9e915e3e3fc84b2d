"""Dense against exported, side by side in one run: parameters, MACs, latency predicted by the table, and latency
measured on the exported model (median of many interleaved runs after warm-up, batch size stated)."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from .artifacts import build_model, example_inputs, input_shape
from .channels.costs import LatencyTable, device_key, layer_shapes
from .env import environment, steady_allocator
from .export import count_parameters, export_masked_model
from .flops import layer_macs


def channel_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(in, out)`` channels of every Conv/Linear layer: what a latency-table cell is looked up by."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[name] = (m.in_channels, m.out_channels)
    return out


def time_models(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 50, warmup: int = 10
                ) -> dict[str, float]:
    """Median forward time (ms) of each model on ``x``, the models' runs interleaved so that both see the same
    machine state (frequency, other load); on a CPU with the steady allocator, as the latency table."""
    steady_allocator()
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def latency_report(masked_model: nn.Module, meta: dict[str, Any], batch_size: int = 64, repeats: int = 50,
                   threads: int | None = None) -> dict[str, Any]:
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        shape = input_shape(meta)
        example = example_inputs(meta, 1, seed=0 if meta.get("input_dtype") == "int64" else None)
        dense = build_model(meta).eval()
        exported, structure = export_masked_model(copy.deepcopy(masked_model).eval(), example)
        exported.eval()
        shapes = layer_shapes(dense, example)
        table = LatencyTable(shapes, batch_size=batch_size)
        predicted = {name: sum(table(n, *w) for n, w in channel_widths(model).items())
                     for name, model in (("dense", dense), ("exported", exported))}
        table.save()
        measured = time_models({"dense": dense, "exported": exported}, example_inputs(meta, batch_size, seed=0),
                               repeats)
        rows = {}
        for name, model in (("dense", dense), ("exported", exported)):
            macs = sum(layer_macs(model, shape, None if example.is_floating_point() else example.dtype).values())
            rows[name] = {"params": count_parameters(model), "macs": macs,
                          "predicted_ms": predicted[name], "measured_ms": measured[name]}
        macs_reduction = rows["dense"]["macs"] / rows["exported"]["macs"]
        speedup = rows["dense"]["measured_ms"] / rows["exported"]["measured_ms"]
        return {"model": meta["model"], "batch_size": batch_size, "repeats": repeats,
                "threads": torch.get_num_threads(), "device": device_key("cpu", batch_size), **rows,
                "macs_reduction": macs_reduction, "measured_speedup": speedup,
                "predicted_speedup": rows["dense"]["predicted_ms"] / rows["exported"]["predicted_ms"],
                "speedup_over_macs_reduction": speedup / macs_reduction, "kept": structure["kept"],
                "environment": environment()}
    finally:
        torch.set_num_threads(previous_threads)


def format_latency_report(r: dict[str, Any]) -> str:
    lines = [f"{r['model']}: batch {r['batch_size']}, {r['threads']} thread(s), median of {r['repeats']} runs",
             f"{'':10}{'params':>12}{'MACs':>14}{'predicted ms':>15}{'measured ms':>14}"]
    for name in ("dense", "exported"):
        row = r[name]
        lines.append(f"{name:10}{row['params']:>12,}{row['macs']:>14,}{row['predicted_ms']:>15.3f}"
                     f"{row['measured_ms']:>14.3f}")
    lines.append(f"MACs reduction {r['macs_reduction']:.2f}x, predicted speed-up {r['predicted_speedup']:.2f}x, "
                 f"measured speed-up {r['measured_speedup']:.2f}x "
                 f"({r['speedup_over_macs_reduction']:.2f} of the MACs reduction)")
    return "\n".join(lines)
