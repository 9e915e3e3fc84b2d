"""IEE against the sparse-training baselines, unstructured ERK sparsity on Fashion-MNIST.

    python bench/unstructured.py                 # the README grid (see --help for its size)
    python bench/unstructured.py --quick         # smoke test: a few steps per run
    python bench/unstructured.py --jobs 2        # two runs at a time, one thread each

Grid, identical epochs for every method and seed: dense; static, GMP, SET, RigL and IEE at 90, 95 and 98 %
sparsity (ERK); at 95 % also IEE's four ablations (no exploration, no freeze of the active set, J = 0, zero
init of grown weights), exploration at the full learning rate, the Taylor criterion, and H = J = Q at 1/3× and
2× the default 50. Reports mean ± std of the last-epoch test accuracy, training FLOPs and wall time; plots
accuracy vs sparsity, mask IoU and survival of grown weights.
Resumable: finished runs are skipped, interrupted ones resume from their checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from runner import RESULTS, aggregate, figure, run_grid, style, write_results

from regrow.training import TrainConfig

SPARSITIES = (0.9, 0.95, 0.98)
METHODS = ("static", "gmp", "set", "rigl", "iee")
HJQ = 50  # IEE's H = J = Q default at batch 128 on Fashion-MNIST (469 steps an epoch)


def variants(hjq: int) -> dict[str, dict]:
    """IEE ablations and the H = J = Q sweep, run at 95 % only: label -> IEE options."""
    return {
        "iee-no-explore": {"explore": False},
        "iee-no-freeze": {"freeze_active": False},
        "iee-no-improve": {"improve_steps": 0},
        "iee-zero-init": {"grow_init": "zero"},
        "iee-explore-full-lr": {"explore_lr_scale": 1.0},  # the spec's starting point: the current learning rate
        "iee-taylor": {"criterion": "taylor"},  # |w·g| accumulated over the H and Q steps instead of |w|
        "iee-hjq-third": dict.fromkeys(("estimate_steps", "improve_steps", "explore_steps"), max(1, hjq // 3)),
        "iee-hjq-double": dict.fromkeys(("estimate_steps", "improve_steps", "explore_steps"), 2 * hjq),
    }


def grid(args) -> dict[str, TrainConfig]:
    hjq = 5 if args.quick else HJQ  # quick: short cycles so that several fit in a few steps

    def config(method, sparsity, seed, options):
        if args.quick and method in ("gmp", "set", "rigl"):
            options = {"interval": 5, **options}
        if method == "iee":
            options = {**dict.fromkeys(("estimate_steps", "improve_steps", "explore_steps"), hjq), **options}
        return TrainConfig(model=args.model, method=method, sparsity=sparsity, distribution="erk",
                           epochs=args.epochs, max_steps=40 if args.quick else None, seed=seed,
                           channels_last=args.channels_last,
                           progress=sys.stderr.isatty() and args.jobs == 1, method_options=options)

    runs = {}
    for seed in range(args.seeds):
        runs[f"dense-seed{seed}"] = config("dense", 0.0, seed, {})
        for sparsity in SPARSITIES:
            for method in METHODS:
                runs[f"{method}-{sparsity:g}-seed{seed}"] = config(method, sparsity, seed, {})
        for label, options in variants(hjq).items():
            runs[f"{label}-0.95-seed{seed}"] = config("iee", 0.95, seed, options)
    return runs


def group(run_id: str, summary: dict) -> str:
    return run_id.rsplit("-seed", 1)[0]


def mean_curve(curves: list[list[float | None]]) -> list[float]:
    length = min(len(c) for c in curves)
    out = []
    for i in range(length):
        values = [c[i] for c in curves if c[i] is not None]
        out.append(statistics.fmean(values) if values else float("nan"))
    return out


def plot(rows: dict, summaries: dict, prefix: str) -> None:
    with figure(RESULTS / f"{prefix}-accuracy.png") as ax:
        for method in METHODS:
            keys = [f"{method}-{s:g}" for s in SPARSITIES if f"{method}-{s:g}" in rows]
            ax.errorbar([100 * rows[k]["sparsity_target"] for k in keys],
                        [100 * rows[k]["test_accuracy_mean"] for k in keys],
                        yerr=[100 * rows[k]["test_accuracy_std"] for k in keys], marker="o", capsize=3, label=method)
        if "dense" in rows:
            ax.axhline(100 * rows["dense"]["test_accuracy_mean"], color="black", ls="--", lw=1, label="dense")
        style(ax, "sparsity (%)", "last-epoch test accuracy (%)")

    with figure(RESULTS / f"{prefix}-masks.png", ncols=2, figsize=(10, 3.8)) as axes:
        for method in ("set", "rigl", "iee"):
            runs = [s for k, s in summaries.items()
                    if group(k, s) == f"{method}-0.95" and s["mask_metrics"]["updates"]]
            if runs:
                axes[0].plot(mean_curve([r["mask_metrics"]["iou_consecutive"] for r in runs]), marker=".",
                             label=method)
                axes[1].plot(mean_curve([r["mask_metrics"]["survival_to_end"] for r in runs]), marker=".",
                             label=method)
        style(axes[0], "update (RigL/SET) or cycle (IEE)", title="mask IoU between consecutive updates (95 %)")
        style(axes[1], "update (RigL/SET) or cycle (IEE)", title="grown units still active at the end (95 %)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 steps per run, H = J = Q = 5, into a separate grid")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (threads are split between them)")
    p.add_argument("--channels-last", action="store_true", help="NHWC layout for every run (faster on CPU)")
    p.add_argument("--grid-name", default=None, help="results name (default unstructured, or with the epochs)")
    args = p.parse_args(argv)
    name = args.grid_name or ("unstructured-quick" if args.quick else f"unstructured-{args.model}-e{args.epochs}")
    summaries = run_grid(name, grid(args), jobs=args.jobs)
    rows = aggregate(summaries, group)
    setup = {"model": args.model, "dataset": "fashion-mnist", "distribution": "erk", "epochs": args.epochs,
             "batch size": 128, "seeds": args.seeds, "jobs": args.jobs, "channels last": args.channels_last,
             "optimizer": "SGD Nesterov 0.9, lr 0.1 cosine, wd 5e-4",
             "RigL/SET": "update every 100 steps, alpha 0.3 cosine, T_end 75 %",
             "IEE": f"H = J = Q = {5 if args.quick else HJQ}, magnitude, cosine Omega, T_end 75 %, "
                    "exploration lr × 0.1"}
    command = " ".join(["python bench/unstructured.py", *(argv if argv is not None else sys.argv[1:])])
    print(write_results(name, rows, summaries, setup, command))
    plot(rows, summaries, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
