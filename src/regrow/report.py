"""Reports of a finished run: the per-layer table, parameters, MACs, target vs achieved sparsity, and a plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .artifacts import SUMMARY
from .errors import DataError


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise DataError(f"no {SUMMARY} in {run_dir}: is it the --out folder of a finished 'regrow train'?")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in REQUIRED if not isinstance(summary, dict) or k not in summary]
    if missing or not isinstance(summary.get("layers"), list):
        raise DataError(f"{path} is not a regrow run summary (missing {', '.join(missing) or 'the layer table'})")
    return summary


REQUIRED = ("method", "model", "dataset", "seed", "steps", "layers", "sparsity_target", "sparsity_actual",
            "params_total", "params_nonzero", "macs_dense", "macs_sparse", "train_flops", "train_flops_ratio",
            "dense_train_flops", "test_accuracy", "wall_seconds", "distribution", "structure")


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def format_report(summary: dict[str, Any]) -> str:
    dead = all("dead_outputs" in layer for layer in summary["layers"])  # older summaries lack them
    rows = [("layer", "shape", "params", "nonzero", "density", "MACs") + (("dead out", "dead in") if dead else ())]
    for layer in summary["layers"]:
        nonzero = int(round(layer["numel"] * layer["density"]))
        rows.append((layer["name"], "×".join(map(str, layer["shape"])), str(layer["numel"]), str(nonzero),
                     f"{layer['density']:.4f}", _si(layer["macs"] * layer["density"]))
                    + ((str(layer["dead_outputs"]), str(layer["dead_inputs"])) if dead else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"run: {summary['method']} on {summary['model']} / {summary['dataset']} "
             f"(seed {summary['seed']}, {summary['steps']} steps)"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in
                               enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    macs_ratio = summary["macs_sparse"] / summary["macs_dense"] if summary["macs_dense"] else 1.0
    channels = summary.get("channels")
    if channels:
        budget_line = (f"channel budget  {channels['cost_model']}: dense {channels['dense_cost']:.4g} "
                       f"{channels['unit']}, budget {channels['budget']:.4g}, predicted "
                       f"{channels['predicted_cost']:.4g} ({channels['predicted_fraction']:.2%} of dense)")
        heads = set(channels.get("head_groups", ()))
        kept = ", ".join(f"{root} {n}/{channels['group_channels'][root]}{' heads' if root in heads else ''}"
                         for root, n in channels["kept_channels"].items())
        budget_lines = [budget_line, f"kept channels   {kept}"]
        config = summary.get("config", {})
        if config.get("latency_target_ms") is not None:  # asked for as a time: what it was converted with
            budget_lines.insert(1, f"                asked for {config['latency_target_ms']:g} ms at batch "
                                   f"{config.get('latency_batch')}: {config['latency_target']:.2%} of the dense "
                                   f"forward, {config['latency_dense_ms']:.3g} ms measured when the run started "
                                   "(regrow bench-latency times the export)")
    else:
        budget_lines = [f"sparsity        target {summary['sparsity_target']:.4f}   achieved "
                        f"{summary['sparsity_actual']:.4f}   ({summary['distribution']}, {summary['structure']})"]
        if summary.get("sparsity_masked") is not None and summary.get("left_dense"):
            budget_lines.append(f"                over the {summary['sparsity_masked']:.4f}-sparse masked layers; "
                                f"every weight matrix counted ({len(summary['left_dense'])} left dense, below)")
    lines += [
        "",
        *budget_lines,
        f"parameters      {summary['params_total']:,} total, {summary['params_nonzero']:,} nonzero "
        f"({summary['params_nonzero'] / summary['params_total']:.2%})",
        f"MACs / sample   dense {_si(summary['macs_dense'])}, sparse {_si(summary['macs_sparse'])} "
        f"({macs_ratio:.2%} of dense)",
        f"training FLOPs  {_si(summary['train_flops'])} ({summary['train_flops_ratio']:.3f}× dense training "
        f"of {_si(summary['dense_train_flops'])})",
        f"test accuracy   {summary['test_accuracy']:.4f} (last epoch)",
        f"wall time       {summary['wall_seconds']:.1f} s",
    ]
    if summary.get("total_train_flops_ratio") is not None:
        lines.append(f"with pretraining {summary['total_train_flops_ratio']:.3f}× dense training FLOPs in total "
                     f"(the dense model it started from: {summary['pretrain']['path']})")
    # (channel pruning removes whole units on purpose: its kept channels are listed above instead)
    if dead and not channels and any(layer["dead_outputs"] or layer["dead_inputs"] for layer in summary["layers"]):
        lines.append("dead units      " + dead_units_line(summary["layers"]))
    lines += mask_metric_lines(summary.get("mask_metrics") or {})
    if summary.get("calibration"):  # a post-training run (regrow pts)
        c = summary["calibration"]
        lines.append(f"post-training   {c['size']} calibration samples of the {c['source']} (seed {c['seed']}); "
                     f"dense model's test accuracy {summary['dense_test_accuracy']:.4f}")
    if summary.get("search"):
        s = summary["search"]
        where = f", reused from {s['reused_from']}" if s.get("reused_from") else ""
        lines.append(f"searched        {s['distribution']} distribution: calibration accuracy "
                     f"{s['calibration_accuracy']:.4f}, held-out {s['heldout_accuracy']:.4f} (magnitude masks + "
                     f"BatchNorm recalibration), {s['fitness_evaluations']} fitness evaluations{where}")
    left_dense = summary.get("left_dense", summary.get("skipped_layers"))
    if left_dense:
        lines.append("left dense      " + ", ".join(f"{k} ({v})" for k, v in left_dense.items()))
    return "\n".join(lines)


def dead_units_line(layers: list[dict[str, Any]]) -> str:
    """The summary of :func:`masking.dead_units` over a run's layers."""
    outputs = sum(layer["dead_outputs"] for layer in layers)
    total = sum(layer["shape"][0] for layer in layers)
    inputs = sum(layer["dead_inputs"] for layer in layers)
    return (f"{outputs} of {total} output units have no active weight (they compute only their bias), "
            f"{inputs} input units are read by none")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def mask_metric_lines(metrics: dict[str, Any]) -> list[str]:
    """The IEE paper's mask metrics of a run (see :mod:`regrow.mask_history`), a few lines for the report."""
    if not metrics.get("updates"):
        return []
    if "readmitted_share" not in metrics:  # a summary written before the pruned/grown tracker
        return [f"mask updates    {metrics['updates']}"]
    ious = metrics["iou_previous"]
    survival = metrics["survival_share"]
    return [
        f"mask updates    {metrics['updates']}: {metrics['pruned_total']:,} units pruned and "
        f"{metrics['grown_total']:,} grown in all",
        f"  re-admitted   {_pct(metrics['readmitted_share'])} of pruned units grown back by the same update",
        f"  first-time    {_pct(metrics['first_time_share'])} of grown units had never been active; "
        f"{metrics['ever_active_share']:.1%} of all units were active at some time",
        f"  IoU           with the previous mask: first update {ious[0]:.3f}, last {ious[-1]:.3f}",
        f"  survival      of grown units: {_pct(survival.get('1'))} one update later, {_pct(survival.get('5'))} five "
        f"later, {_pct(metrics['survival_to_end_share'])} at the end",
    ]


def plot_mask_metrics(summaries: dict[str, dict[str, Any]], path: str | os.PathLike) -> None:
    """IoU with the previous mask, re-admission share and survival to the end per update, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (("iou_previous", "mask IoU with the previous update"),
              ("readmitted", "pruned units grown back by the same update"),
              ("survival_to_end", "grown units still active at the end"))
    for label, summary in summaries.items():
        metrics = summary.get("mask_metrics") or {}
        if not metrics.get("updates") or "readmitted" not in metrics:
            continue
        for ax, (key, _) in zip(axes, panels):
            values = [float("nan") if v is None else v for v in metrics[key]]
            ax.plot(range(1, len(values) + 1), values, marker=".", ms=3, lw=1, label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("mask update (IEE cycle / RigL, SET update)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_densities(summary: dict[str, Any], path: str | os.PathLike) -> None:
    """Bar chart of per-layer density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer["name"] for layer in summary["layers"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 3.5))
    ax.bar(range(len(names)), [layer["density"] for layer in summary["layers"]], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("density")
    ax.set_ylim(0, 1.05)
    target = summary["sparsity_target"]
    ax.set_title(f"{summary['method']} {summary['model']}: "
                 + (f"target sparsity {target:g}, " if target is not None else "channels, weight sparsity ")
                 + f"achieved {summary['sparsity_actual']:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
