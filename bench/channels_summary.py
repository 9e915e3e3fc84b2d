"""The channel grids side by side: per network and target, the three targets of the converged protocol (IEE from
scratch against HALP at equal measured latency for at most half the cost; every export at least as fast as
Torch-Pruning's at equal MACs; the latency table within 10 % of the measured speed-ups), and IEE's open choices
measured on more than one network. Read from the grids' reports (``bench/results/NAME.json``, written by
``bench/channels.py``); trains and times nothing.

    python bench/channels_summary.py              # the grids of the README (those not reported yet are named)
    python bench/channels_summary.py NAME ...     # these grids
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from channels import INVESTIGATE, _mean_of, claim_verdict, fidelity, total_cost
from runner import RESULTS, commit, difference_text, figure, paired_difference, script_main, style

from regrow import checkpoint
from regrow.errors import ConfigError

GRIDS = ("channels-resnet20-e3", "channels-mobilenetv2-small-e3-w0.25", "channels-mlp-e30")
OUT = "channels-summary"
# IEE's open choices, each as (its runs, the runs it is paired against): the ramped first cut, which every grid
# measures from both starts (against the grid's IEE from the same start), then --investigate's, from scratch
CHOICES = {"ramp": ("iee-ramp", "iee-scratch"), "ramp-pretrained": ("iee-pretrained-ramp", "iee-pretrained"),
           **{label: (f"iee-scratch-{label}", "iee-scratch") for label in INVESTIGATE}}


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise ConfigError(f"no report {path.name} in bench/results: run bench/channels.py (or its --report-only) first")
    report = json.loads(path.read_text())
    if "equal_latency" not in report:
        raise ConfigError(f"{path.name} is not a report of the converged protocol (no equal-latency pairs)")
    return report


def network(report: dict) -> str:
    args = report["args"]
    return f"{args['model']}, E = {args['pretrain_epochs']}"


def claim_rows(report: dict) -> list[dict]:
    """Per target: HALP and IEE from scratch at equal measured latency, the paired difference, the cost ratio, the
    verdict (the grid's own rule, :func:`channels.claim_verdict`), and the dense plateau check it stands on."""
    plateau = paired_difference(report["runs"], "dense-2x", "dense")
    rows = []
    for target, pair in report["equal_latency"].items():
        note, verdict = claim_verdict(pair)
        rows.append({"target": float(target), "halp_fraction": pair["fraction"]["halp"],
                     "iee_fraction": pair["fraction"]["iee-scratch"],
                     "difference": pair["accuracy_difference"][0], "se": pair["accuracy_difference"][1],
                     "seeds": pair["seeds"], "cost_ratio": pair["cost_ratio"], "verdict": verdict,
                     "matching": note.strip(" ()"),
                     "plateau": plateau and plateau["mean"]})
    return rows


def half_cost(report: dict) -> dict[str, dict]:
    """Per target, IEE from scratch given the target's whole budget, half of HALP's training FLOPs, estimated
    between the two lengths the grid trains (E and 2E, each paired against HALP over seeds, untightened) by a
    straight line in cost: an interpolation, not a run."""
    runs = report["runs"]

    def cost(group: str) -> float | None:
        return _mean_of(total_cost(s) for k, s in runs.items() if k.rsplit("-seed", 1)[0] == group)

    out = {}
    for target in report["args"]["targets"]:
        t = f"{target:g}"
        halp = cost(f"halp-{t}")
        sides = [(cost(f"{m}-{t}"), paired_difference(runs, f"{m}-{t}", f"halp-{t}"))
                 for m in ("iee-scratch", "iee-scratch-2x")]
        if halp is None or any(c is None or d is None for c, d in sides):
            continue
        (c1, d1), (c2, d2) = ((c / halp, d["mean"]) for c, d in sides)
        out[t] = {"cost_e": c1, "difference_e": d1, "cost_2e": c2, "difference_2e": d2,
                  "at_half": d1 + (0.5 - c1) / (c2 - c1) * (d2 - d1)}
    return out


def speed_row(report: dict) -> dict | None:
    """Every row of the grid's table with a speed-up and Torch-Pruning's at the same MACs: how many are at least
    as fast, the range, the slower ones."""
    ratios = {key: r["speedup"] / r["tp_speedup_same_macs"] for key, r in report["rows"].items()
              if r.get("speedup") and r.get("tp_speedup_same_macs")}
    if not ratios:
        return None
    return {"rows": len(ratios), "at_least": sum(v >= 1 for v in ratios.values()), "min": min(ratios.values()),
            "max": max(ratios.values()), "slower": {k: v for k, v in ratios.items() if v < 1}}


def choice_differences(report: dict) -> dict[str, dict]:
    """Each open choice against the grid's IEE (the straight first cut) from the same start, at its tightest target,
    paired."""
    target = f"{min(report['args']['targets']):g}"
    out = {}
    for label, (group, baseline) in CHOICES.items():
        d = paired_difference(report["runs"], f"{group}-{target}", f"{baseline}-{target}")
        if d is not None:
            out[label] = {**d, "target": float(target)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="*", help=f"grid names (default: {' '.join(GRIDS)}, those reported)")
    args = parser.parse_args(argv)
    reports = {}
    for name in args.grids or GRIDS:
        try:
            reports[name] = load(name)
        except ConfigError:
            if args.grids:  # asked for by name: refused
                raise
            print(f"{name}: not reported yet, left out", flush=True)
    if not reports:
        raise ConfigError("no channel grid reported yet")

    claims = {name: claim_rows(r) for name, r in reports.items()}
    speeds = {name: speed_row(r) for name, r in reports.items()}
    fits = {name: fidelity(r["runs"], r["latency"]) for name, r in reports.items()}
    choices = {name: choice_differences(r) for name, r in reports.items()}
    halves = {name: half_cost(r) for name, r in reports.items()}

    lines = [f"# {OUT}", "", f"Command: `python bench/channels_summary.py{''.join(' ' + g for g in args.grids)}`  ",
             f"Written at {commit()} from: " + ", ".join(f"`{n}` ({r['commit']})" for n, r in reports.items()), "",
             "IEE from scratch against HALP at equal measured latency (each grid's latency-matched pairs; ± the "
             "standard error over paired seeds); the target: at least as accurate for at most half of HALP's total "
             "training FLOPs.", "",
             "| network | dense 2E − E (points) | target | measured fraction HALP / IEE | IEE − HALP (points) | "
             "training FLOPs IEE / HALP | claim holds |", "|---|---|---|---|---|---|---|"]
    for name, rows in claims.items():
        for r in rows:
            plateau = "-" if r["plateau"] is None else f"{r['plateau']:+.2f}"
            matching = f" ({r['matching']})" if r["matching"] else ""
            lines.append(f"| {network(reports[name])} | {plateau} | {r['target']:g} | {r['halp_fraction']:.3f} / "
                         f"{r['iee_fraction']:.3f}{matching} | {r['difference']:+.2f} ± {r['se']:.2f} "
                         f"(n={r['seeds']}) | {r['cost_ratio']:.2f} | {r['verdict']} |")
    lines += ["", "IEE from scratch given the target's whole budget (half of HALP's training FLOPs): between the "
              "grid's IEE for E and for 2E epochs (each − HALP, paired, untightened), a straight line in cost; an "
              "interpolation, not a run:", "",
              "| network | target | IEE for E: cost / HALP's, − HALP | IEE for 2E: cost / HALP's, − HALP | "
              "at half the cost (interpolated) |", "|---|---|---|---|---|"]
    for name, rows in halves.items():
        for t, h in rows.items():
            lines.append(f"| {network(reports[name])} | {t} | {h['cost_e']:.2f}, {h['difference_e']:+.2f} | "
                         f"{h['cost_2e']:.2f}, {h['difference_2e']:+.2f} | {h['at_half']:+.2f} |")
    lines += ["", "Every export at least as fast as Torch-Pruning's magnitude pruner at the same MACs, and the latency "
              "table's predicted speed-ups within 10 % of the measured (every HALP/IEE export):", "",
              "| network | rows at least as fast / rows | speed-up over Torch-Pruning's | slower rows | "
              "predicted within 10 % / exports | mean error | worst error |", "|---|---|---|---|---|---|---|"]
    for name in reports:
        s, f = speeds[name], fits[name]
        speed = ("- | - | -" if s is None else
                 f"{s['at_least']} / {s['rows']} | {s['min']:.2f}–{s['max']:.2f}× | "
                 + (", ".join(f"{k} {v:.2f}" for k, v in s["slower"].items()) or "none"))
        fit = "- | - | -" if f is None else (f"{f['within_10']} / {f['runs']} | {100 * f['mean']:.1f} % | "
                                              f"{100 * f['max']:.1f} % ({f['worst']})")
        lines.append(f"| {network(reports[name])} | {speed} | {fit} |")
    labels = [label for label in CHOICES if any(label in c for c in choices.values())]
    lines += ["", "IEE's open choices, each paired against the grid's IEE (regrow's defaults with the straight first "
              "cut) at the grid's tightest target, in points: from scratch, but `ramp-pretrained`, the first cut "
              "ramped from the pretrained model against IEE from it (`ramp` and `ramp-pretrained` at every grid):",
              "",
              "| choice | " + " | ".join(f"{network(reports[n])} @ {min(reports[n]['args']['targets']):g}"
                                        for n in reports) + " |",
              "|---|" + "---|" * len(reports)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(difference_text(choices[n].get(label), missing="-")
                                                  for n in reports) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{OUT}.md").write_text(md)
    checkpoint.write_json(RESULTS / f"{OUT}.json", {
        "grids": {n: r["commit"] for n, r in reports.items()}, "commit": commit(), "claims": claims,
        "at_half_the_cost": halves, "speed_over_torch_pruning": speeds, "fidelity": fits,
        "choices": choices})
    print(md)
    with figure(RESULTS / f"{OUT}.png", figsize=(7, 4)) as ax:
        ticks = []
        for name, rows in claims.items():
            for r in rows:
                x = len(ticks)
                ax.errorbar(x, r["difference"], yerr=0 if math.isnan(r["se"]) else r["se"], fmt="o", capsize=4,
                            color="tab:red" if r["difference"] < 0 else "tab:green")
                ax.annotate(f"{r['cost_ratio']:.2f}×", (x, r["difference"]), fontsize=7,
                            textcoords="offset points", xytext=(6, -3))
                ticks.append(f"{reports[name]['args']['model']}\n@ {r['target']:g}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlim(-0.5, len(ticks) - 0.5)
        style(ax, "network @ target fraction of dense latency", "IEE from scratch − HALP (points)",
              "at equal measured latency (labels: IEE's training FLOPs / HALP's)", legend=None)
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main))
