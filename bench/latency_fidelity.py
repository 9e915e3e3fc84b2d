"""Does the latency table predict what the exported model measures? Checked on physically pruned models.

    python bench/latency_fidelity.py                              # ResNet-20, batch 64, one thread
    python bench/latency_fidelity.py --device cuda                # the CUDA table against CUDA timings
    REGROW_STEADY_ALLOCATOR=0 python bench/latency_fidelity.py    # the same with glibc's default allocator

HALP and IEE choose channels by the latency table: each layer's cost at given channel counts, measured on its own
and summed. This benchmark builds pruned models of known widths (uniform keep fractions, one stage cut hard while
the others stay, and random per-group widths), removes their channels for real, and compares, for each, the table's
sum with the measured forward of the whole model (interleaved with the dense one, median after warm-up, ``--passes``
times; the measured speed-up is the median of the within-pass ratios). It
measures the table twice, fresh each time, to show how much a sum moves between two measurements.

What matters for the methods is the *ratio* of two configurations (the budget is a fraction of dense), so the
headline figure is the predicted speed-up against the measured one.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile

import torch
from runner import RESULTS, commit, figure, script_main, style

from regrow.channels.costs import LatencyTable, device_key, layer_shapes
from regrow.channels.groups import channel_groups
from regrow.env import resolve_device, steady_allocator
from regrow.export import remove_channels
from regrow.latency_report import predicted_cost, time_models
from regrow.models import create_model
from regrow.training import environment

INPUT = (1, 28, 28)


def configurations(groups, seed: int, n_random: int) -> dict[str, dict[str, int]]:
    """Kept channels per group (a prefix count), by configuration name."""
    def keep(fraction_of):
        return {g.root: max(1, round(g.size * fraction_of(g))) for g in groups}

    configs = {"dense": keep(lambda g: 1.0)}
    for f in (0.75, 0.5, 0.25):
        configs[f"uniform {f:g}"] = keep(lambda g, f=f: f)
    # Equal-ish MACs, different memory traffic: cut the widest-map (first) groups or the narrowest-map (last) ones.
    sizes = sorted({g.size for g in groups})
    configs["first-width groups at 0.25"] = keep(lambda g: 0.25 if g.size == sizes[0] else 1.0)
    configs["last-width groups at 0.25"] = keep(lambda g: 0.25 if g.size == sizes[-1] else 1.0)
    rng = random.Random(seed)
    for i in range(n_random):
        configs[f"random {i}"] = keep(lambda g: rng.uniform(0.1, 1.0))
    return configs


def pruned_model(name: str, kept: dict[str, int]) -> torch.nn.Module:
    model = create_model(name).eval()
    example = torch.zeros(1, *INPUT)
    return remove_channels(model, example, {root: list(range(k)) for root, k in kept.items()}).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--random", type=int, default=6, help="random-width configurations")
    p.add_argument("--repeats", type=int, default=30, help="whole-model timings per configuration")
    p.add_argument("--passes", type=int, default=3, help="interleaved dense/pruned timings per configuration")
    p.add_argument("--cell-repeats", type=int, default=15, help="timings per table cell (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default, one thread) or cuda: where the table is "
                   "measured and the models are timed")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    dense = create_model(args.model).eval()
    example = torch.zeros(1, *INPUT)
    groups = channel_groups(dense, example)
    configs = configurations(groups, args.seed, args.random)
    models = {name: pruned_model(args.model, kept).to(device) for name, kept in configs.items()}
    # Two tables side by side: cells that time each layer alone (what HALP and IEE use) and cells that time it
    # with the BatchNorm and activation that run on its output (layer_shapes(..., epilogues=True)).
    variants = {"layer": layer_shapes(dense, example), "epilogue": layer_shapes(dense, example, epilogues=True)}
    predicted: dict[str, dict[str, list[float]]] = {v: {c: [] for c in configs} for v in variants}
    for attempt in range(2):  # two fresh tables each: how stable is a sum?
        for variant, shapes in variants.items():
            with tempfile.TemporaryDirectory() as cache:
                table = LatencyTable(shapes, device=device, batch_size=args.batch, cache_dir=cache,
                                     repeats=args.cell_repeats)
                for c in configs:
                    predicted[variant][c].append(predicted_cost(table, models[c]))
            print(f"{variant} table #{attempt}: dense {predicted[variant]['dense'][-1]:.2f} ms", flush=True)
    x = torch.randn(args.batch, *INPUT, device=device)
    # Each pruned model is timed against dense, interleaved, ``--passes`` times; its speed-up is the median over
    # passes of the ratio within a pass (dense and pruned timed side by side), which cancels the machine's drift
    # between passes (whole-model times of one configuration moved by up to 30 % from one pass to the next here).
    pairs: dict[str, list[tuple[float, float]]] = {c: [] for c in configs if c != "dense"}
    for _ in range(args.passes):
        for c, m in models.items():
            if c != "dense":
                t = time_models({"dense": models["dense"], c: m}, x, repeats=args.repeats)
                pairs[c].append((t["dense"], t[c]))
    dense_ms = statistics.median(d for p in pairs.values() for d, _ in p)
    rows = {}
    for c in configs:
        times = [dense_ms] if c == "dense" else [t for _, t in pairs[c]]
        speedup = 1.0 if c == "dense" else statistics.median(d / t for d, t in pairs[c])
        m = dense_ms if c == "dense" else statistics.median(times)
        row = {"measured_ms": m, "measured_speedup": speedup, "measured_spread": [min(times), max(times)],
               "pass_speedups": [] if c == "dense" else [d / t for d, t in pairs[c]]}
        for variant in variants:
            pred, dense_pred = statistics.fmean(predicted[variant][c]), statistics.fmean(predicted[variant]["dense"])
            fields = {"predicted_ms": pred, "tables": predicted[variant][c], "predicted_speedup": dense_pred / pred,
                      "ms_ratio": pred / m, "speedup_error": (dense_pred / pred) / speedup - 1}
            if variant == "layer":
                row.update(fields)  # the table the methods use, under the keys earlier results have
            else:
                row[variant] = fields
        rows[c] = row

    def errors(of) -> dict[str, float]:
        return {"mean_abs_speedup_error": statistics.fmean(abs(of(r)["speedup_error"]) for c, r in rows.items()
                                                           if c != "dense"),
                "max_abs_speedup_error": max(abs(of(r)["speedup_error"]) for r in rows.values()),
                "table_repeat_difference": statistics.fmean(abs(of(r)["tables"][1] / of(r)["tables"][0] - 1)
                                                            for r in rows.values())}
    summary = {**errors(lambda r: r), "epilogue": errors(lambda r: r["epilogue"])}
    key = device_key(device, args.batch)
    allocator = "steady" if steady_allocator() else "default"
    on = f"1 thread, {allocator} allocator" if device.type == "cpu" else torch.cuda.get_device_name(device)
    name = f"latency-fidelity-{args.model}-b{args.batch}-" + (allocator if device.type == "cpu" else device.type)
    env = environment(device)
    result = {"model": args.model, "batch": args.batch, "threads": 1, "device": key, "allocator": allocator,
              "commit": commit(), "environment": env,
              "argv": sys.argv[1:] if argv is None else argv, "configurations": configs, "rows": rows,
              "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    env_prefix = "" if allocator == "steady" else "REGROW_STEADY_ALLOCATOR=0 "
    lines = [f"# Latency table against measured latency: {args.model}, batch {args.batch}, {on}", "",
             f"Hardware: {env['processor']}, torch {env['torch']}; commit "
             f"{result['commit']}. Command: `{env_prefix}python bench/latency_fidelity.py {' '.join(result['argv'])}`",
             "", "Predicted by two tables: cells of each layer alone (what HALP and IEE use), and cells of each layer "
             "with the BatchNorm and activation that run on its output (*+ epilogue*).", "",
             "| configuration | measured | measured speed-up (range over passes) | predicted speed-up | error | "
             "table sum / measured | predicted, + epilogue | error | table sum / measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c, r in rows.items():
        spread = (f" ({min(r['pass_speedups']):.2f}–{max(r['pass_speedups']):.2f})" if r["pass_speedups"] else "")
        e = r["epilogue"]
        lines.append(f"| {c} | {r['measured_ms']:.2f} ms | {r['measured_speedup']:.2f}×{spread} | "
                     f"{r['predicted_speedup']:.2f}× | {100 * r['speedup_error']:+.1f} % | {r['ms_ratio']:.2f} | "
                     f"{e['predicted_speedup']:.2f}× | {100 * e['speedup_error']:+.1f} % | {e['ms_ratio']:.2f} |")
    for label, errs in (("Layers alone", summary), ("With epilogues", summary["epilogue"])):
        lines += ["", f"{label}: predicted speed-up within {100 * errs['mean_abs_speedup_error']:.1f} % on average, "
                      f"{100 * errs['max_abs_speedup_error']:.1f} % at worst; two fresh tables differ by "
                      f"{100 * errs['table_repeat_difference']:.1f} % per sum on average."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    with figure(RESULTS / f"{name}.png") as ax:
        top = max(max(r["measured_speedup"], r["predicted_speedup"], r["epilogue"]["predicted_speedup"])
                  for r in rows.values())
        ax.scatter([r["measured_speedup"] for r in rows.values()], [r["predicted_speedup"] for r in rows.values()],
                   label="layers alone")
        ax.scatter([r["measured_speedup"] for r in rows.values()],
                   [r["epilogue"]["predicted_speedup"] for r in rows.values()], marker="x",
                   label="with BatchNorm and activation")
        ax.plot([1, top], [1, top], "k:", lw=1, label="exact")
        style(ax, "measured speed-up of the pruned model", "speed-up predicted by the table",
              f"{args.model}, batch {args.batch}, {on}")
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main))
