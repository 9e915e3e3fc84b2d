"""Is a channel grid's latency table sound? Times its cells again and reads the grid's fidelity off the result.

    python bench/table_recheck.py channels-mobilenetv2-small-e3-w0.25      # on the idle machine, one thread

A grid's runs price every width with one latency table, built once (``bench/channels.py``), and its report
compares each export's predicted speed-up (the table's dense sum over its sum for the export) with the measured
one. Where they disagree, this tells whether the table's cells are the cause: it times again, against the table's
own reference scale and without writing to it, every cell of the dense network (the denominator of every
predicted fraction) and a random sample of the other cells it holds, and reports each against the value the grid
used. A cell timed while the machine was busy reads high; a uniform drift of the machine shows in the sample too,
so the dense cells are compared after dividing by the sample's median (the scale both kinds of cell share). The
grid's fidelity is then given as committed and with the dense sum re-timed: a diagnosis, not a correction (every
other cell stays as the grid used it).

The table is the file every run of the grid names (``channels.cost_table`` in its summary); it must still hold
exactly the cells they used (its SHA-256), and its dense cells must add up to the dense cost the grid's timing
recorded, or the check refuses.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
from runner import RESULTS, commit, figure, script_main, style

from regrow import checkpoint
from regrow.channels.costs import LatencyTable, layer_shapes, time_layer
from regrow.env import steady_allocator
from regrow.errors import ConfigError
from regrow.models import create_model
from regrow.training import environment

INPUT = (1, 28, 28)
TOLERANCE = 0.10  # the fidelity target: predicted speed-ups within 10 % of the measured


def grid_table(grid: str) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """The table every timed run of ``grid`` used (its fingerprint), their summaries and their timings."""
    runs = RESULTS / "runs" / grid
    summaries, latencies = {}, {}
    for folder in sorted(runs.glob("*")) if runs.is_dir() else []:
        if (folder / "latency.json").exists() and (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
            if "cost_table" in summary.get("channels", {}):  # HALP and IEE; Torch-Pruning's runs have no table
                summaries[folder.name] = summary
                latencies[folder.name] = json.loads((folder / "latency.json").read_text())
    if not summaries:
        raise ConfigError(f"grid {grid}: no timed HALP/IEE run in bench/results/runs/{grid}")
    tables = {json.dumps(s["channels"]["cost_table"], sort_keys=True) for s in summaries.values()}
    if len(tables) != 1:
        raise ConfigError(f"grid {grid}: its runs used {len(tables)} different latency tables")
    return json.loads(tables.pop()), summaries, latencies


def dense_cells(model: torch.nn.Module, shapes) -> list[tuple[str, int, int]]:
    """Every priced layer at its full width: (name, c_in, c_out)."""
    modules = dict(model.named_modules())
    cells = []
    for name, shape in shapes.items():
        if shape.fixed is not None:
            raise ConfigError(f"{name}: a projection that is not a module; this check covers conv and Linear layers")
        module = modules[name]
        cells.append((name, *((module.in_channels, module.out_channels) if hasattr(module, "in_channels")
                              else (module.in_features, module.out_features))))
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="a channel grid of bench/channels.py with timed exports")
    parser.add_argument("--sample", type=int, default=80, help="random cells of the table timed again (default 80)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per cell, as the table's build")
    parser.add_argument("--passes", type=int, default=3, help="times every dense cell is timed again, one pass "
                        "over the network after the other; the median is kept and every pass's sum reported")
    args = parser.parse_args(argv)
    if min(args.sample, args.repeats, args.passes) < 1:
        raise ConfigError("--sample, --repeats and --passes must be at least 1")
    fingerprint, summaries, latencies = grid_table(args.grid)
    path = Path(fingerprint["path"]).expanduser()
    if not path.is_file():
        raise ConfigError(f"the grid's latency table {fingerprint['path']} is not on this machine")
    config = next(iter(summaries.values()))["config"]
    model = create_model(config["model"])
    epilogues = config.get("method_options", {}).get("latency_epilogues", True)
    shapes = layer_shapes(model, torch.zeros(1, *INPUT), epilogues=epilogues)
    # read only: the cells are looked up, never measured into it nor saved
    table = LatencyTable(shapes, cache_dir=path.parent, key=fingerprint["device"], batch_size=config["latency_batch"])
    if table.path != path:
        raise ConfigError(f"{fingerprint['path']} is not the table of device {fingerprint['device']!r}")
    # the runs recorded the table's fingerprint(); the file must give the same one
    if {k: table.fingerprint()[k] for k in ("reference_ms", "sha256")} != {
            k: fingerprint[k] for k in ("reference_ms", "sha256")}:
        raise ConfigError(f"{fingerprint['path']} no longer holds the cells the grid used (its SHA-256 differs)")
    cells = dense_cells(model, shapes)
    missing = [name for name, c_in, c_out in cells
               if f"{c_in},{c_out}" not in table.entries.get(shapes[name].key(), {})]
    if missing:
        raise ConfigError(f"the grid's table has no full-width cell for {', '.join(missing[:3])}: not this model's")
    cached = {name: table(name, c_in, c_out) for name, c_in, c_out in cells}
    recorded = {round(t["dense"]["predicted_ms"], 9) for t in latencies.values()}
    if len(recorded) != 1 or abs(sum(cached.values()) - recorded.pop()) > 1e-6 * sum(cached.values()):
        raise ConfigError("the table's dense cells do not add up to the dense cost the grid recorded")

    torch.set_num_threads(1)
    steady_allocator()
    batch, reference = config["latency_batch"], table.reference_ms
    passes = [{name: shapes[name].calls * time_layer(shapes[name], c_in, c_out, batch, "cpu", args.repeats,
                                                     reference_ms=reference)
               for name, c_in, c_out in cells} for _ in range(args.passes)]
    fresh = {name: statistics.median(p[name] for p in passes) for name in cached}
    keys = {shape.key(): shape for shape in shapes.values()}
    pool = sorted((key, cell) for key, row in table.entries.items() if key in keys for cell in row)
    sample = random.Random(args.seed).sample(pool, min(args.sample, len(pool)))
    sample_ratios = sorted(time_layer(keys[key], *map(int, cell.split(",")), batch, "cpu", args.repeats,
                                      reference_ms=reference) / table.entries[key][cell] for key, cell in sample)
    drift = statistics.median(sample_ratios)
    dense_cached, dense_fresh = sum(cached.values()), sum(fresh.values())
    factor = dense_fresh / drift / dense_cached  # the dense sum re-timed, on the table's scale, over the grid's

    def fidelity(scale: float) -> dict:
        errors = {run: abs(t["predicted_speedup"] * scale / t["measured_speedup"] - 1) for run, t in latencies.items()}
        worst = max(errors, key=errors.get)
        return {"within": sum(e <= TOLERANCE for e in errors.values()), "exports": len(errors),
                "mean": statistics.fmean(errors.values()), "worst": errors[worst], "worst_run": worst,
                "over_predicted": sum(t["predicted_speedup"] * scale > t["measured_speedup"]
                                      for t in latencies.values())}

    result = {"grid": args.grid, "commit": commit(), "environment": environment(), "table": fingerprint,
              "args": vars(args), "dense_ms": {"cached": dense_cached, "fresh": dense_fresh,
                                               "fresh_on_the_tables_scale": dense_fresh / drift,
                                               "passes": [sum(p.values()) for p in passes]},
              "sample_ratio": {"median": drift, "min": sample_ratios[0], "max": sample_ratios[-1],
                               "cells": len(sample_ratios)},
              "dense_cells": {name: {"cached": cached[name], "fresh": fresh[name]} for name in cached},
              "dense_factor": factor, "fidelity_as_committed": fidelity(1.0),
              "fidelity_dense_retimed": fidelity(factor)}
    checkpoint.write_json(RESULTS / f"table-recheck-{args.grid}.json", result)  # atomic, as the other reports
    md = report(result)
    (RESULTS / f"table-recheck-{args.grid}.md").write_text(md)
    with figure(RESULTS / f"table-recheck-{args.grid}.png", figsize=(9, 3.5)) as ax:
        ratios = [fresh[n] / drift / cached[n] for n in cached]
        ax.bar(range(len(ratios)), ratios, color=["tab:red" if r < 1 - TOLERANCE else "tab:gray" for r in ratios])
        ax.axhline(1.0, color="black", lw=0.8)
        style(ax, "priced layer at full width, in forward order", "re-timed / the grid's cell",
              f"{args.grid}: the dense cells timed again (÷ the sample's drift {drift:.2f})", legend=None)
    print(md)
    return 0


def report(r: dict) -> str:
    def fit(f: dict) -> str:
        return (f"{f['within']} of {f['exports']} within 10 %, mean {100 * f['mean']:.1f} %, worst "
                f"{100 * f['worst']:.1f} % ({f['worst_run']}), {f['over_predicted']} over-predicted")

    low = {n: c for n, c in r["dense_cells"].items()
           if c["fresh"] / r["sample_ratio"]["median"] < (1 - TOLERANCE) * c["cached"]}
    lines = [f"# table-recheck-{r['grid']}", "",
             f"Command: `python bench/table_recheck.py {r['grid']} --sample {r['args']['sample']} --seed "
             f"{r['args']['seed']} --passes {r['args']['passes']}`  ",
             f"Written at {r['commit']}; table `{r['table']['path']}` "
             f"({r['table']['cells']} cells, SHA-256 {r['table']['sha256'][:12]}, the grid's)  ",
             f"Hardware: {r['environment']['processor']}, torch {r['environment']['torch']}; one thread",
             "", f"A random sample of {r['sample_ratio']['cells']} of the table's cells, timed again: "
             f"{r['sample_ratio']['median']:.3f} of their value in the table at the median (the machine's drift; "
             f"range {r['sample_ratio']['min']:.3f}–{r['sample_ratio']['max']:.3f}).", "",
             f"The dense network's {len(r['dense_cells'])} cells: {r['dense_ms']['cached']:.2f} ms in the table; "
             f"timed again {len(r['dense_ms']['passes'])} times, "
             f"{', '.join(f'{t:.2f}' for t in r['dense_ms']['passes'])} ms; each cell's median "
             f"{r['dense_ms']['fresh_on_the_tables_scale']:.2f} ms on the table's scale (÷ the drift): "
             f"× {r['dense_factor']:.3f}. Cells more than 10 % under their value in the table: {len(low)}.", "",
             "| dense cell | in the table (ms) | timed again, ÷ drift (ms) | ratio |", "|---|---|---|---|"]
    for name, c in low.items():
        again = c["fresh"] / r["sample_ratio"]["median"]
        lines.append(f"| {name} | {c['cached']:.3f} | {again:.3f} | {again / c['cached']:.2f} |")
    lines += ["", "The grid's predicted speed-ups against its measured ones:", "",
              f"- as committed: {fit(r['fidelity_as_committed'])}",
              f"- with the dense sum re-timed (every other cell as the grid used it): "
              f"{fit(r['fidelity_dense_retimed'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(script_main(main))
