"""Reports of a finished run: the per-layer table, parameters, MACs, target vs achieved sparsity, and a plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import DataError

SUMMARY = "summary.json"


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise DataError(f"no {SUMMARY} in {run_dir}: is it the --out folder of a finished 'regrow train'?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def format_report(summary: dict[str, Any]) -> str:
    rows = [("layer", "shape", "params", "nonzero", "density", "MACs")]
    for layer in summary["layers"]:
        nonzero = int(round(layer["numel"] * layer["density"]))
        rows.append((layer["name"], "×".join(map(str, layer["shape"])), str(layer["numel"]), str(nonzero),
                     f"{layer['density']:.4f}", _si(layer["macs"] * layer["density"])))
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
        kept = ", ".join(f"{root} {n}/{channels['group_channels'][root]}"
                         for root, n in channels["kept_channels"].items())
        budget_lines = [budget_line, f"kept channels   {kept}"]
    else:
        budget_lines = [f"sparsity        target {summary['sparsity_target']:.4f}   achieved "
                        f"{summary['sparsity_actual']:.4f}   ({summary['distribution']}, {summary['structure']})"]
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
    metrics = summary.get("mask_metrics") or {}
    if metrics.get("updates"):
        survival = [v for v in metrics["survival_to_end"][:-1] if v is not None]
        line = f"mask updates    {metrics['updates']}"
        if metrics["iou_consecutive"]:
            line += f", IoU with the previous update at the last one {metrics['iou_consecutive'][-1]:.3f}"
        if survival:
            line += f", grown units active at the end {sum(survival) / len(survival):.1%} (mean over updates)"
        lines.append(line)
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
    if summary.get("skipped_layers"):
        lines.append("left dense      " + ", ".join(f"{k} ({v})" for k, v in summary["skipped_layers"].items()))
    return "\n".join(lines)


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
