"""Which channel widths train better at one budget: the knapsack's single solve, or HALP's gradual path?

Under one fixed set of importance scores (HALP's Taylor-BN criterion, averaged over ``--importance-batches``
batches of the pretrained dense model), the same MACs budget is met two ways: one knapsack solve from the dense
widths (what channel IEE's first cut does), and HALP's exponential path of ``--path-steps`` solves, each from the
widths the previous one left. In a ResNet the two land in different places (the single solve narrows the residual
streams and keeps inner convs wide; the path does the opposite). Each architecture is then cut out of the model
(masked channels removed) and trained with the same recipe, paired seeds: from the pretrained weights
(fine-tuning) and from random weights (the same initialisation rule as every regrow model, then cut). The
methods' own dynamics (cycles, exploration, HALP's interleaved pruning) are left out: only the widths differ.

    python bench/channel_widths.py --epochs 1 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from runner import RESULTS, commit, figure, mean_std, script_main, style

from regrow import checkpoint
from regrow.data import batches_per_epoch, get_batch, load_dataset
from regrow.env import cpu_name
from regrow.export import count_parameters, export_channels
from regrow.flops import forward_flops, layer_macs
from regrow.methods.channel import HALP
from regrow.models import create_model
from regrow.schedules import cosine_lr, exponential_path
from regrow.training import MODEL, evaluate, load_model

ALLOCATIONS = ("one-solve", "path")
STARTS = ("pretrained", "scratch")


def allocate(args, model: torch.nn.Module) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """The importance of every channel under the pretrained model, and the kept channels of both allocations."""
    shape = (1, 28, 28)
    sparsifier = HALP(model, None, latency_target=args.target, cost="macs", group_size=args.group_size,
                      input_shape=shape, prune_first=True)
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
    described = {name: {"kept_channels": dict(zip([g.root for g in sparsifier.groups], [int(k.sum()) for k in kept])),
                        "macs_fraction": allocator.cost_of([int(k.sum()) for k in kept]) / sparsifier.dense_cost,
                        "summed_importance": sum(float(s[k].sum()) for s, k in zip(scores, kept))}
                 for name, kept in keeps.items()}
    return keeps, described


def cut(model: torch.nn.Module, keeps: list[torch.Tensor], args) -> torch.nn.Module:
    """``model`` with only the ``keeps`` channels, as a plain (smaller) network."""
    sparsifier = HALP(model, None, latency_target=args.target, cost="macs", group_size=args.group_size,
                      input_shape=(1, 28, 28), prune_first=True)
    sparsifier.install(keeps)
    small, _ = export_channels(model, sparsifier.channels, torch.zeros(2, 1, 28, 28))
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
    step_flops = 3 * forward_flops(layer_macs(model, (1, 28, 28))) * 128
    return {"test_accuracy": accuracy, "steps": total, "train_flops": step_flops * total,
            "wall_seconds": time.perf_counter() - start, "parameters": count_parameters(model)}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", default=str(RESULTS / "runs" / "channels-resnet20-e2" / "dense-seed0" / MODEL),
                   help="the pretrained ResNet-20 (a dense run's model.safetensors)")
    p.add_argument("--target", type=float, default=0.30, help="MACs budget, a fraction of dense")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--importance-batches", type=int, default=20)
    p.add_argument("--path-steps", type=int, default=30, help="HALP's prunings (its default)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps (smoke test)")
    p.add_argument("--name", default=None, help="results name (default channel-widths-resnet20-eE)")
    args = p.parse_args(argv)
    for option in ("importance_batches", "path_steps", "epochs", "seeds"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    name = args.name or f"channel-widths-resnet20-e{args.epochs}"
    out = RESULTS / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    dense, _ = load_model(args.dense, expect_model="resnet20")
    keeps, described = allocate(args, dense)
    runs = {}
    for seed in range(args.seeds):
        for start in STARTS:
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
                    source = create_model("resnet20")
                result = {"allocation": allocation, "start": start, "seed": seed, "commit": commit(),
                          **train_one(cut(source, keeps[allocation], args), seed, args.epochs, args.max_steps)}
                checkpoint.write_json(path, result)
                runs[run_id] = result
                print(f"{run_id}: {100 * result['test_accuracy']:.2f} %", flush=True)
    rows = {}
    for start in STARTS:
        for allocation in ALLOCATIONS:
            accuracies = [runs[f"{allocation}-{start}-seed{s}"]["test_accuracy"] for s in range(args.seeds)]
            rows[f"{allocation}-{start}"] = dict(zip(("mean", "std"), mean_std(accuracies)))
        diffs = [runs[f"one-solve-{start}-seed{s}"]["test_accuracy"] - runs[f"path-{start}-seed{s}"]["test_accuracy"]
                 for s in range(args.seeds)]
        stderr = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        rows[f"difference-{start}"] = {"mean": statistics.mean(diffs), "per_seed": diffs, "stderr": stderr}
    command = " ".join(["python bench/channel_widths.py", *(sys.argv[1:] if argv is None else argv)])
    trained_at = sorted({r.get("commit", "unknown") for r in runs.values()})
    setup = {"command": command, "commit": commit(), "runs_trained_at": trained_at,
             "hardware": f"{cpu_name()}, 1 thread", "torch": torch.__version__,
             "args": vars(args), "allocations": described}
    checkpoint.write_json(RESULTS / f"{name}.json", {"setup": setup, "rows": rows, "runs": runs})
    write_markdown(name, args, setup, rows, runs, described)
    with figure(RESULTS / f"{name}.png") as ax:
        for i, allocation in enumerate(ALLOCATIONS):
            ax.bar([j + 0.4 * i for j in range(len(STARTS))],
                   [100 * rows[f"{allocation}-{s}"]["mean"] for s in STARTS], 0.4,
                   yerr=[100 * rows[f"{allocation}-{s}"]["std"] for s in STARTS], label=allocation)
        ax.set_xticks([j + 0.2 for j in range(len(STARTS))], STARTS)
        ax.set_ylim(min(100 * r["mean"] for k, r in rows.items() if not k.startswith("difference")) - 3, None)
        style(ax, "start", "test accuracy (%)", f"ResNet-20 at {args.target:g} of dense MACs, {args.epochs} epoch(s)")
    return 0


def write_markdown(name, args, setup, rows, runs, described) -> None:
    roots = list(described["path"]["kept_channels"])
    lines = [f"# {name}", "", __doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`"), "",
             f"Command: `{setup['command']}`; runs trained at {', '.join(setup['runs_trained_at'])}, tables written "
             f"at {setup['commit']}; {setup['hardware']}; torch "
             f"{setup['torch']}. ResNet-20 on Fashion-MNIST, MACs budget {args.target:g} of dense, G = "
             f"{args.group_size}, first conv prunable, importance from {args.importance_batches} batches of "
             f"`{args.dense.split('bench/results/')[-1]}`; {args.epochs} epoch(s) per run, seeds 0–{args.seeds - 1} "
             "(last epoch's test accuracy).", "",
             "| allocation | MACs fraction | summed importance | kept channels (" + ", ".join(roots) + ") |",
             "|---|---|---|---|"]
    for allocation in ALLOCATIONS:
        d = described[allocation]
        lines.append(f"| {allocation} | {d['macs_fraction']:.3f} | {d['summed_importance']:.4f} | "
                     + ", ".join(str(v) for v in d["kept_channels"].values()) + " |")
    lines += ["", "| start | one solve | path | one solve − path (mean ± s.e.) | per seed | wall s per run |",
              "|---|---|---|---|---|---|"]
    for start in STARTS:
        a, b, d = rows[f"one-solve-{start}"], rows[f"path-{start}"], rows[f"difference-{start}"]
        wall = statistics.mean(r["wall_seconds"] for r in runs.values() if r["start"] == start)
        se = f" ± {100 * d['stderr']:.2f}" if d["stderr"] is not None else ""
        lines.append(f"| {start} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} % | {100 * b['mean']:.2f} ± "
                     f"{100 * b['std']:.2f} % | {100 * d['mean']:+.2f}{se} | "
                     + ", ".join(f"{100 * x:+.2f}" for x in d["per_seed"]) + f" | {wall:.0f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(script_main(main))
