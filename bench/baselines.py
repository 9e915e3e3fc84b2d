"""First comparison of the sparse-training baselines: dense, static, GMP, SET and RigL on ResNet-20 /
Fashion-MNIST at 90 % sparsity (ERK), the same epochs for every method, several seeds; and IEE (default
options) at the same budget, the longer-training check of bench/unstructured.py's one-epoch grid.

    python bench/baselines.py            # the README grid: 3 epochs, seeds 0 and 1
    python bench/baselines.py --quick    # smoke test: a few steps per run

Resumable: finished runs are skipped, interrupted ones resume from their checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from runner import RESULTS, aggregate, figure, run_grid, script_main, style, write_results

from regrow.training import TrainConfig

METHODS = ("dense", "static", "gmp", "set", "rigl", "iee")


def quick_options(method: str) -> dict:
    if method in ("gmp", "set", "rigl"):
        return {"interval": 10}
    if method == "iee":
        return dict.fromkeys(("estimate_steps", "improve_steps", "explore_steps"), 5)
    return {}


def plot(rows: dict, path) -> None:
    with figure(path, figsize=(6, 3.5)) as ax:
        for key, r in rows.items():
            ax.errorbar(r["train_flops_ratio"], 100 * r["test_accuracy_mean"], yerr=100 * r["test_accuracy_std"],
                        fmt="o", capsize=3, label=key)
        style(ax, "training FLOPs (× dense)", "last-epoch test accuracy (%)", "ResNet-20, Fashion-MNIST, 90 % ERK",
              legend="lower right")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps per run, into a separate grid")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (threads are split between them)")
    args = p.parse_args(argv)
    grid = "baselines-quick" if args.quick else "baselines"
    runs = {}
    for method in METHODS:
        for seed in range(args.seeds):
            runs[f"{method}-s{seed}"] = TrainConfig(
                model=args.model, method=method, sparsity=args.sparsity, distribution="erk",
                epochs=1 if args.quick else args.epochs, max_steps=30 if args.quick else None, seed=seed,
                progress=sys.stderr.isatty() and args.jobs == 1,
                method_options=quick_options(method) if args.quick else {})
    summaries = run_grid(grid, runs, jobs=args.jobs)
    rows = aggregate(summaries, lambda run_id, s: s["method"])
    setup = {"model": args.model, "dataset": "fashion-mnist", "sparsity": args.sparsity, "distribution": "erk",
             "epochs": 1 if args.quick else args.epochs, "batch size": 128, "seeds": args.seeds,
             "optimizer": "SGD Nesterov 0.9, lr 0.1 cosine, wd 5e-4",
             "mask updates": ("every 10 steps" if args.quick else "every 100 steps") + " until 75 %",
             "IEE": "H = J = Q = " + ("5" if args.quick else "50") + ", magnitude, exploration lr × 0.1"}
    command = "python bench/baselines.py" + (" --quick" if args.quick else "") + \
        ("" if args.epochs == 3 or args.quick else f" --epochs {args.epochs}") + \
        ("" if args.seeds == 2 else f" --seeds {args.seeds}")
    print(write_results(grid, rows, summaries, setup, command))
    plot(rows, RESULTS / f"{grid}.png")
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main))
