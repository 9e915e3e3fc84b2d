"""Dense against exported, side by side in one run: parameters, MACs, latency predicted by the table, and latency
measured on the exported model (median of many interleaved runs after warm-up, batch size stated; the speed-up is
the median of three passes' within-pass ratios)."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from .artifacts import build_model, example_inputs, input_shape, trace_inputs
from .channels.costs import LatencyTable, device_key, fixed_widths, layer_shapes
from .env import environment, steady_allocator, synchronize
from .errors import ConfigError
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


def predicted_cost(table, model: nn.Module) -> float:
    """The cost model's sum for ``model``: every layer it prices, at the widths the model has (projections that
    are not modules, such as nn.MultiheadAttention's packed q/k/v, at their fixed widths)."""
    widths = {**channel_widths(model), **fixed_widths(table.shapes)}
    return sum(table(n, *w) for n, w in widths.items() if n in table.shapes)


def time_models(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 50, warmup: int = 10
                ) -> dict[str, float]:
    """Median forward time (ms) of each model on ``x``, the models' runs interleaved so that both see the same
    machine state (frequency, other load); on a CPU with the steady allocator, as the latency table. On a GPU
    every run is bracketed by synchronisations (kernels are asynchronous: without them the clock would time the
    launch, not the work); the models must be on ``x``'s device."""
    for name, model in models.items():
        param = next(model.parameters(), None)
        if param is not None and param.device != x.device:
            raise ConfigError(f"model {name!r} is on {param.device} and its input on {x.device}: time them on one "
                              "device")
    if x.device.type == "cpu":
        steady_allocator()
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in models.items():
                synchronize(x.device)
                start = time.perf_counter()
                model(x)
                synchronize(x.device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def paired_timing(models: dict[str, nn.Module], x: torch.Tensor, reference: str = "dense", passes: int = 3,
                  repeats: int = 50) -> dict[str, dict[str, Any]]:
    """Every model timed against ``reference`` with :func:`time_models`, in ``passes`` passes. Per model: ``ms``,
    the median of its per-pass medians, and ``speedup`` over the reference, the median of the *within-pass*
    ratios (``pass_speedups``): a pass's machine state hits both models alike and cancels in its ratio, while one
    model's time moved by up to 30 % from one pass to the next on a shared CPU (``bench/latency_fidelity.py``)."""
    if reference not in models:
        raise ConfigError(f"reference {reference!r} is not among the models timed")
    runs = [time_models(models, x, repeats) for _ in range(passes)]
    out = {}
    for name in models:
        ratios = [run[reference] / run[name] for run in runs]
        out[name] = {"ms": statistics.median(run[name] for run in runs), "speedup": statistics.median(ratios),
                     "pass_speedups": ratios}
    return out


def latency_report(masked_model: nn.Module, meta: dict[str, Any], batch_size: int = 64, repeats: int = 50,
                   threads: int | None = None, passes: int = 3, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Dense against exported on ``device``: the latency table (measured there, cached) and the paired timing
    of the two models there. ``threads`` applies to the CPU's share of the work."""
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        shape = input_shape(meta)
        example = trace_inputs(meta)
        dense = build_model(meta).eval()
        exported, structure = export_masked_model(copy.deepcopy(masked_model).cpu().eval(), example)
        exported.eval()
        shapes = layer_shapes(dense, example, epilogues=True)  # the cells the channel methods budget with
        table = LatencyTable(shapes, device=device, batch_size=batch_size)
        predicted = {name: predicted_cost(table, model) for name, model in (("dense", dense), ("exported", exported))}
        table.save()
        x = example_inputs(meta, batch_size, seed=0).to(device)
        measured = paired_timing({"dense": dense.to(device), "exported": exported.to(device)}, x, passes=passes,
                                 repeats=repeats)
        rows = {}
        for name, model in (("dense", dense), ("exported", exported)):
            macs = sum(layer_macs(model, shape, None if example.is_floating_point() else example.dtype).values())
            rows[name] = {"params": count_parameters(model), "macs": macs,
                          "predicted_ms": predicted[name], "measured_ms": measured[name]["ms"]}
        macs_reduction = rows["dense"]["macs"] / rows["exported"]["macs"]
        speedup = measured["exported"]["speedup"]
        return {"model": meta["model"], "batch_size": batch_size, "repeats": repeats, "passes": passes,
                "pass_speedups": measured["exported"]["pass_speedups"],
                "threads": torch.get_num_threads(), "device": device_key(device, batch_size), **rows,
                "macs_reduction": macs_reduction, "measured_speedup": speedup,
                "predicted_speedup": rows["dense"]["predicted_ms"] / rows["exported"]["predicted_ms"],
                "speedup_over_macs_reduction": speedup / macs_reduction, "kept": structure["kept"],
                "environment": environment(device)}
    finally:
        torch.set_num_threads(previous_threads)


def time_onnx(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 50, warmup: int = 10,
              threads: int | None = None) -> dict[str, float]:
    """Median time (ms) of each model exported to ONNX and run by ONNX Runtime's CPU provider on ``x``, runs
    interleaved as in :func:`time_models`; ``threads`` intra-op threads (default torch's)."""
    import tempfile

    import onnxruntime

    from .export import export_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    feed = {"input": x.numpy()}
    with tempfile.TemporaryDirectory() as folder:
        sessions = {}
        for name, model in models.items():
            path = f"{folder}/{name}.onnx"
            export_onnx(model, x[:1], path)  # checked against PyTorch on the way
            sessions[name] = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        times: dict[str, list[float]] = {name: [] for name in models}
        for i in range(warmup + repeats):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def deployment_latency(masked_model: nn.Module, meta: dict[str, Any], batch_sizes=(1, 64, 256), repeats: int = 50,
                       threads: int | None = None, onnx: bool = True, device: torch.device | str = "cpu"
                       ) -> dict[str, Any]:
    """Dense against exported where users deploy: at every batch size, under PyTorch on ``device`` and (with
    ``onnx``) under ONNX Runtime's CPU provider, each pair timed interleaved on the same seeded inputs. Returns per
    backend and batch size the two medians and the speed-up."""
    device = torch.device(device)
    if onnx and device.type != "cpu":
        raise ConfigError(f"ONNX Runtime is timed on its CPU provider only; on {device} time PyTorch alone "
                          "(onnx=False, --no-onnx)")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dense = build_model(meta).eval()
        exported, _ = export_masked_model(copy.deepcopy(masked_model).cpu().eval(), trace_inputs(meta))
        # ONNX Runtime is timed only when the device is the CPU, so the models can live on the device
        models = {"dense": dense.to(device), "exported": exported.eval().to(device)}
        results: dict[str, Any] = {}
        backends = {"pytorch": lambda x: time_models(models, x.to(device), repeats)}
        if onnx:
            backends["onnxruntime"] = lambda x: time_onnx(models, x, repeats, threads=threads)
        for backend, timer in backends.items():
            for batch in batch_sizes:
                measured = timer(example_inputs(meta, batch, seed=0))
                results.setdefault(backend, {})[str(batch)] = {
                    "dense_ms": measured["dense"], "exported_ms": measured["exported"],
                    "speedup": measured["dense"] / measured["exported"]}
        return {"model": meta["model"], "batch_sizes": list(batch_sizes), "repeats": repeats, "device": str(device),
                "threads": threads or previous_threads, **results, "environment": environment(device)}
    finally:
        torch.set_num_threads(previous_threads)


def format_deployment_latency(r: dict[str, Any]) -> str:
    lines = [f"{r['model']}: {r['threads']} thread(s), median of {r['repeats']} runs, dense against exported",
             f"{'backend':14}{'batch':>7}{'dense ms':>12}{'exported ms':>13}{'speed-up':>10}"]
    for backend in ("pytorch", "onnxruntime"):
        for batch, row in r.get(backend, {}).items():
            lines.append(f"{backend:14}{batch:>7}{row['dense_ms']:>12.3f}{row['exported_ms']:>13.3f}"
                         f"{row['speedup']:>9.2f}x")
    return "\n".join(lines)


def format_latency_report(r: dict[str, Any]) -> str:
    lines = [f"{r['model']}: batch {r['batch_size']}, {r['threads']} thread(s), median of {r['repeats']} runs"
             f" in each of {r['passes']} passes",
             f"{'':10}{'params':>12}{'MACs':>14}{'predicted ms':>15}{'measured ms':>14}"]
    for name in ("dense", "exported"):
        row = r[name]
        lines.append(f"{name:10}{row['params']:>12,}{row['macs']:>14,}{row['predicted_ms']:>15.3f}"
                     f"{row['measured_ms']:>14.3f}")
    lines.append(f"MACs reduction {r['macs_reduction']:.2f}x, predicted speed-up {r['predicted_speedup']:.2f}x, "
                 f"measured speed-up {r['measured_speedup']:.2f}x "
                 f"({r['speedup_over_macs_reduction']:.2f} of the MACs reduction)")
    return "\n".join(lines)
