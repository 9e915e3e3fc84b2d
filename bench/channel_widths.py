"""Which channel widths train better at one budget: the knapsack's single solve, HALP's gradual path, or one
keep fraction for every group?

Under one fixed set of importance scores (HALP's Taylor-BN criterion, averaged over ``--importance-batches`` batches
of the pretrained dense model, or of the model at its random initialisation with ``--dense none``), the same MACs
budget is met four ways: one knapsack solve from the dense widths (what channel IEE's first cut does); HALP's
exponential path of ``--path-steps`` solves, each from the widths the previous one left; the same keep fraction in
every group (the most important channels of each; the largest fraction that fits, as Torch-Pruning's uniform ratio
does); and the single solve with a floor on every group's width (``--min-width`` of its channels, channel methods'
``min_width`` option). In a ResNet the first two land in different places (the single solve narrows the residual
streams and keeps inner convs wide; the path does the opposite). Each architecture is then cut out of the model
(masked channels removed) and trained with the same recipe, paired seeds: from the pretrained weights (fine-tuning,
when there are any) and from random weights (the same initialisation rule as every regrow model, then cut). The
methods' own dynamics (cycles, exploration, HALP's interleaved pruning) are left out: only the widths differ.

    python bench/channel_widths.py --epochs 1 --seeds 3
    python bench/channel_widths.py --model mobilenetv2-small --dense none --epochs 1 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from runner import RESULTS, commit, figure, hardware_of, mean_std, script_main, style, width_fraction

from regrow import checkpoint
from regrow.channels.budget import ChannelBudget
from regrow.data import batches_per_epoch, get_batch, load_dataset
from regrow.env import environment
from regrow.export import count_parameters, export_channels
from regrow.flops import forward_flops, layer_macs
from regrow.methods.channel import HALP
from regrow.models import create_model
from regrow.schedules import cosine_lr, exponential_path
from regrow.training import MODEL, evaluate, load_model

ALLOCATIONS = ("one-solve", "path", "uniform", "floor")
DENSE = {"resnet20": RESULTS / "runs" / "channels-resnet20-e2" / "dense-seed0" / MODEL}
SHAPE = (1, 28, 28)  # Fashion-MNIST


def starts(args) -> tuple[str, ...]:
    return ("pretrained", "scratch") if args.dense != "none" else ("scratch",)


def sparsifier_on(model: torch.nn.Module, args) -> HALP:
    """Channel masks, groups and the MACs allocator of ``model`` (HALP's: nothing here trains with it)."""
    return HALP(model, None, latency_target=args.target, cost="macs", group_size=args.group_size,
                input_shape=SHAPE, prune_first=True)


def uniform(sparsifier: HALP, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The most important channels of every group, one keep fraction for all (in whole chunks of G, at least one),
    the largest that fits the budget: bisection on the fraction."""
    allocator = sparsifier.allocator

    def counts(fraction: float) -> list[int]:
        return [min(g.size, max(allocator.chunk(i), round(fraction * g.size / allocator.chunk(i)) * allocator.chunk(i)))
                for i, g in enumerate(sparsifier.groups)]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if allocator.cost_of(counts(mid)) <= sparsifier.budget else (lo, mid)
    keeps = []
    for score, k in zip(scores, counts(lo)):
        keep = torch.zeros(len(score), dtype=torch.bool)
        keep[torch.argsort(score, descending=True, stable=True)[:k]] = True
        keeps.append(keep)
    return keeps


def allocate(args, model: torch.nn.Module) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """The importance of every channel under ``model``, and the kept channels of every allocation."""
    sparsifier = sparsifier_on(model, args)
    train = load_dataset("fashion-mnist", "train")
    model.train()  # the batch statistics the criterion sees in training; the weights do not change (no step)
    for index in range(args.importance_batches):
        x, y = get_batch(train, 128, 0, 0, index)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sparsifier.accumulate_importance()
    scores = sparsifier.take_importance()
    allocator, everything = sparsifier.allocator, [torch.ones(g.size, dtype=torch.bool) for g in sparsifier.groups]
    keeps = {"one-solve": allocator.select(scores, sparsifier.budget, allowed=everything)}
    path = everything
    for k in range(1, args.path_steps + 1):
        path = allocator.select(scores, exponential_path(k, args.path_steps, sparsifier.dense_cost, sparsifier.budget),
                                allowed=path)
    keeps["path"] = path
    keeps["uniform"] = uniform(sparsifier, scores)
    floored = ChannelBudget(model, sparsifier.groups, sparsifier.cost_model, args.group_size, allocator.resolution,
                            min_width=args.min_width)  # the same allocator, with the floor
    keeps["floor"] = floored.select(scores, sparsifier.budget, allowed=everything)
    described = {name: {"kept_channels": dict(zip([g.root for g in sparsifier.groups], [int(k.sum()) for k in kept])),
                        "macs_fraction": allocator.cost_of([int(k.sum()) for k in kept]) / sparsifier.dense_cost,
                        "summed_importance": sum(float(s[k].sum()) for s, k in zip(scores, kept))}
                 for name, kept in keeps.items()}
    return keeps, described


def cut(model: torch.nn.Module, keeps: list[torch.Tensor], args) -> torch.nn.Module:
    """``model`` with only the ``keeps`` channels, as a plain (smaller) network."""
    sparsifier = sparsifier_on(model, args)
    sparsifier.install(keeps)
    small, _ = export_channels(model, sparsifier.channels, torch.zeros(2, *SHAPE))
    return small


def train_one(model: torch.nn.Module, seed: int, epochs: int, max_steps: int | None = None) -> dict:
    """The trainer's recipe (SGD Nesterov, lr 0.1 cosine, batch 128, weight decay 5e-4, augmentation)."""
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    steps_per_epoch = batches_per_epoch(len(train), 128)
    total = min(epochs * steps_per_epoch, max_steps or epochs * steps_per_epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step in range(total):
        epoch, index = divmod(step, steps_per_epoch)
        x, y = get_batch(train, 128, seed, epoch, index)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, 0.1)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    accuracy, _ = evaluate(model, test)
    step_flops = 3 * forward_flops(layer_macs(model, SHAPE)) * 128
    return {"test_accuracy": accuracy, "steps": total, "train_flops": step_flops * total,
            "wall_seconds": time.perf_counter() - start, "parameters": count_parameters(model)}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", choices=["resnet20", "mobilenetv2-small"])
    p.add_argument("--dense", default=None,
                   help="the pretrained model (a dense run's model.safetensors; default for resnet20: the channel "
                        "grid's e2 seed 0), or none: scores from the model at its random initialisation (seed 0), "
                        "runs from random weights only")
    p.add_argument("--target", type=float, default=0.30, help="MACs budget, a fraction of dense")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--min-width", type=width_fraction, default=0.25,
                   help="the floor allocation's fewest channels per group, a fraction of each")
    p.add_argument("--importance-batches", type=int, default=20)
    p.add_argument("--path-steps", type=int, default=30, help="HALP's prunings (its default)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps (smoke test)")
    p.add_argument("--name", default=None, help="results name (default channel-widths-MODEL-eE)")
    args = p.parse_args(argv)
    if args.dense is None:
        if args.model not in DENSE:
            p.error(f"--dense: no pretrained {args.model} is kept in the repository; give one, or --dense none")
        args.dense = str(DENSE[args.model])
    for option in ("importance_batches", "path_steps", "epochs", "seeds"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    name = args.name or f"channel-widths-{args.model}-e{args.epochs}"
    if args.dense == "none":
        torch.manual_seed(0)
        scored = create_model(args.model)
    else:
        scored, _ = load_model(args.dense, expect_model=args.model)
    keeps, described = allocate(args, scored)
    out = RESULTS / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in range(args.seeds):
        for start in starts(args):
            for allocation in ALLOCATIONS:
                run_id = f"{allocation}-{start}-seed{seed}"
                path = out / f"{run_id}.json"
                if path.exists():  # resumable: one JSON per finished run
                    runs[run_id] = json.loads(path.read_text())
                    continue
                if start == "pretrained":
                    source, _ = load_model(args.dense)
                else:
                    torch.manual_seed(seed)
                    source = create_model(args.model)
                result = {"allocation": allocation, "start": start, "seed": seed, "commit": commit(),
                          "environment": environment(),  # threads: 1, set above
                          **train_one(cut(source, keeps[allocation], args), seed, args.epochs, args.max_steps)}
                checkpoint.write_json(path, result)
                runs[run_id] = result
                print(f"{run_id}: {100 * result['test_accuracy']:.2f} %", flush=True)
    rows = {}
    for start in starts(args):
        for allocation in ALLOCATIONS:
            accuracies = [runs[f"{allocation}-{start}-seed{s}"]["test_accuracy"] for s in range(args.seeds)]
            rows[f"{allocation}-{start}"] = dict(zip(("mean", "std"), mean_std(accuracies)))
        for other in ALLOCATIONS[1:]:  # paired against IEE's first cut
            accuracy = {a: [runs[f"{a}-{start}-seed{s}"]["test_accuracy"] for s in range(args.seeds)]
                        for a in ("one-solve", other)}
            diffs = [a - b for a, b in zip(accuracy["one-solve"], accuracy[other])]
            stderr = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
            rows[f"one-solve-minus-{other}-{start}"] = {"mean": statistics.mean(diffs), "per_seed": diffs,
                                                        "stderr": stderr}
    command = " ".join(["python bench/channel_widths.py", *(sys.argv[1:] if argv is None else argv)])
    trained_at = sorted({r.get("commit", "unknown") for r in runs.values()})
    setup = {"command": command, "commit": commit(), "runs_trained_at": trained_at,
             "hardware": hardware_of(runs, environment()), "torch": torch.__version__,
             "args": vars(args), "allocations": described}
    checkpoint.write_json(RESULTS / f"{name}.json", {"setup": setup, "rows": rows, "runs": runs})
    write_markdown(name, args, setup, rows, runs, described)
    with figure(RESULTS / f"{name}.png") as ax:
        width = 0.8 / len(ALLOCATIONS)
        for i, allocation in enumerate(ALLOCATIONS):
            ax.bar([j + width * i for j in range(len(starts(args)))],
                   [100 * rows[f"{allocation}-{s}"]["mean"] for s in starts(args)], width,
                   yerr=[100 * rows[f"{allocation}-{s}"]["std"] for s in starts(args)], label=allocation)
        ax.set_xticks([j + width * (len(ALLOCATIONS) - 1) / 2 for j in range(len(starts(args)))], starts(args))
        ax.set_ylim(min(100 * r["mean"] for k, r in rows.items() if "-minus-" not in k) - 3, None)
        style(ax, "start", "test accuracy (%)",
              f"{args.model} at {args.target:g} of dense MACs, {args.epochs} epoch(s)")
    return 0


def write_markdown(name, args, setup, rows, runs, described) -> None:
    roots = list(described["path"]["kept_channels"])
    scores = ("the model at its random initialisation (seed 0)" if args.dense == "none"
              else f"`{args.dense.split('bench/results/')[-1]}`")
    lines = [f"# {name}", "", " ".join(__doc__.split("\n\n")[1].split()).replace("``", "`"), "",
             f"Command: `{setup['command']}`; runs trained at {', '.join(setup['runs_trained_at'])}, tables written "
             f"at {setup['commit']}; trained on {setup['hardware']}. {args.model} on Fashion-MNIST, "
             f"MACs budget {args.target:g} of dense, G = {args.group_size}, first conv prunable, importance from "
             f"{args.importance_batches} batches of {scores}; {args.epochs} epoch(s) per run, seeds "
             f"0–{args.seeds - 1} (last epoch's test accuracy).", "",
             "| allocation | MACs fraction | summed importance | kept channels per group (" + ", ".join(roots) + ") |",
             "|---|---|---|---|"]
    for allocation in ALLOCATIONS:
        d = described[allocation]
        lines.append(f"| {allocation} | {d['macs_fraction']:.3f} | {d['summed_importance']:.4f} | "
                     + ", ".join(str(v) for v in d["kept_channels"].values()) + " |")
    lines += ["", "| start | " + " | ".join(ALLOCATIONS) + " | "
              + " | ".join(f"one-solve − {o} (mean ± s.e.; per seed)" for o in ALLOCATIONS[1:]) + " | wall s per run |",
              "|---|" + "---|" * (2 * len(ALLOCATIONS))]
    for start in starts(args):
        cells = [f"{100 * rows[f'{a}-{start}']['mean']:.2f} ± {100 * rows[f'{a}-{start}']['std']:.2f} %"
                 for a in ALLOCATIONS]
        for other in ALLOCATIONS[1:]:
            d = rows[f"one-solve-minus-{other}-{start}"]
            se = f" ± {100 * d['stderr']:.2f}" if d["stderr"] is not None else ""
            cells.append(f"{100 * d['mean']:+.2f}{se}; " + ", ".join(f"{100 * x:+.2f}" for x in d["per_seed"]))
        wall = statistics.mean(r["wall_seconds"] for r in runs.values() if r["start"] == start)
        lines.append(f"| {start} | " + " | ".join(cells) + f" | {wall:.0f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(script_main(main))
