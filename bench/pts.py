"""Post-training sparsity on Fashion-MNIST: magnitude + BatchNorm recalibration, POT, Wanda, UniPTS and its
ablations, from a dense model trained by regrow itself.

    python bench/pts.py                  # the README grid (see --help for its size); resumable
    python bench/pts.py --quick          # smoke test: tiny search and training, separate results
    python bench/pts.py --report-only    # tables and plots from the runs finished so far

Steps (each resumable: finished runs are skipped, so the grid can span sessions):
1. the dense teacher (``--teacher-epochs``, seed 0), trained with ``regrow train --method dense``'s recipe;
2. every (method, sparsity, calibration size, seed) run of ``regrow pts``, in priority order: the main table at
   the largest calibration size first, then UniPTS's ablations and the overfitting check at 90 %, POT and Wanda
   with BatchNorm recalibration added, then the smaller calibration size. The seed draws the calibration set,
   the search and the training order.
Reports the last-epoch test accuracy (mean ± std over seeds), wall time and training cost per method, the search's
calibration and held-out accuracy, and plots accuracy against sparsity per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from runner import RESULTS, commit, figure, mark_commit, mean_std, run_grid, run_in_pool, script_main, style

from regrow.checkpoint import write_json
from regrow.posttraining import PTSConfig, run_pts
from regrow.training import MODEL, SUMMARY, TrainConfig, environment

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
CALIBRATION_SIZES = (1024, 256)
METHODS = ("magnitude", "pot", "wanda", "unipts")
# UniPTS's ablations and the overfitting check, at 90 % with the largest calibration set
ABLATIONS = {"unipts-uniform": {"distribution": "uniform"}, "unipts-static": {"mask": "static"},
             "unipts-constant-tau": {"tau": "constant"}, "unipts-mse": {"loss": "mse"},
             "unipts-unconstrained": {"distribution": "unconstrained"}}
ABLATION_SPARSITY = 0.9
# The baselines that update nothing but masks (and POT's refit) with BatchNorm recalibration added, as magnitude has
BN_VARIANTS = {"pot-bn": ("pot", {"recalibrate_bn": True}), "wanda-bn": ("wanda", {"recalibrate_bn": True})}
TABLE_ROWS = (*METHODS, *BN_VARIANTS)
REUSE_SEARCH = ("unipts-static", "unipts-constant-tau", "unipts-mse")  # their switch acts after the search


def run_id(label: str, sparsity: float, size: int, seed: int) -> str:
    return f"{label}-{sparsity:g}-n{size}-seed{seed}"


def plan(args) -> list[dict[str, tuple[str, float, int, int, dict]]]:
    """Phases of runs, each {run id: (method, sparsity, calibration size, seed, options)}, run in this order: the
    main table at the largest calibration size, UniPTS's ablations at 90 % (three of them reuse the main run's
    searched distribution, which their switch does not touch), the other calibration sizes."""
    unipts = {"generations": args.generations, "population": args.population, "epochs": args.epochs}
    if args.quick:
        unipts.update(parents=3, children=3, mutants=2)
    root = RESULTS / "runs" / args.name

    def table(size):
        return {run_id(method, sparsity, size, seed): (method, sparsity, size, seed,
                                                       dict(unipts) if method == "unipts" else {})
                for seed in range(args.seeds) for sparsity in args.sparsities for method in METHODS
                if method != "unipts" or sparsity in args.unipts_sparsities}

    sizes = args.calibration_sizes
    ablations = {}
    if args.ablations and ABLATION_SPARSITY in args.unipts_sparsities:
        for seed in range(args.seeds):
            searched = str(root / run_id("unipts", ABLATION_SPARSITY, sizes[0], seed))
            for label, options in ABLATIONS.items():
                reuse = {"search_from": searched} if label in REUSE_SEARCH else {}
                ablations[run_id(label, ABLATION_SPARSITY, sizes[0], seed)] = (
                    "unipts", ABLATION_SPARSITY, sizes[0], seed, {**unipts, **options, **reuse})
    variants = {run_id(label, sparsity, sizes[0], seed): (method, sparsity, sizes[0], seed, options)
                for seed in range(args.seeds) for sparsity in args.sparsities
                for label, (method, options) in BN_VARIANTS.items()}
    return [table(sizes[0]), ablations, variants, *(table(size) for size in sizes[1:])]


def _one(teacher: str, out: str, method: str, sparsity: float, size: int, seed: int, options: dict,
         threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    config = PTSConfig(method=method, sparsity=sparsity, calibration_size=size, seed=seed, options=options,
                       progress=False)
    return run_pts(config, teacher, out)


def run_all(args, teacher, phases) -> dict[str, dict]:
    root = RESULTS / "runs" / args.name
    runs = {k: v for phase in phases for k, v in phase.items()}
    done = {k: json.loads((root / k / SUMMARY).read_text()) for k in runs if (root / k / SUMMARY).exists()}
    budget = len(runs) if args.limit is None else args.limit
    print(f"{args.name}: {len(done)} of {len(runs)} runs done, {len(runs) - len(done)} to run with {args.jobs} "
          f"job(s)", flush=True)
    if args.report_only:
        return done
    code = commit()
    start = time.perf_counter()

    def finished(k: str, s: dict) -> None:
        done[k] = s
        print(f"[{len(done)}/{len(runs)}] {k}: accuracy {s['test_accuracy']:.4f}, {s['wall_seconds']:.0f} s "
              f"({(time.perf_counter() - start) / 60:.1f} min so far)", flush=True)

    for phase in phases:  # a phase may use the results of the one before
        todo = [k for k in phase if k not in done][:budget]
        budget -= len(todo)
        for k in todo:
            mark_commit(root / k, code)
        run_in_pool({k: (_one, (str(teacher), str(root / k), *phase[k])) for k in todo}, args.jobs, finished)
    return done


def label_of(run: str) -> str:
    return run.rsplit("-seed", 1)[0]


def rows_of(runs: dict, summaries: dict) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for k in runs:
        if k in summaries:
            groups.setdefault(label_of(k), []).append(summaries[k])
    rows = {}
    for label, items in groups.items():
        acc = mean_std([s["test_accuracy"] for s in items])
        row = {"method": items[0]["method"], "label": label.rsplit("-", 2)[0],
               "sparsity_target": items[0]["sparsity_target"],
               "sparsity_actual": statistics.fmean(s["sparsity_actual"] for s in items),
               "calibration_size": items[0]["calibration"]["size"], "seeds": sorted(s["seed"] for s in items),
               "n": len(items), "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
               "test_accuracies": [s["test_accuracy"] for s in items],
               "dense_test_accuracy": items[0]["dense_test_accuracy"],
               "wall_seconds_mean": statistics.fmean(s["wall_seconds"] for s in items),
               "cost_dense_epochs": statistics.fmean(s["cost_dense_epochs"] for s in items)}
        if all("search" in s for s in items):
            row["search_calibration_accuracy"] = statistics.fmean(s["search"]["calibration_accuracy"] for s in items)
            row["search_heldout_accuracy"] = statistics.fmean(s["search"]["heldout_accuracy"] for s in items)
        rows[label] = row
    return rows


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    partial = f" ({row['n']} seed{'s' if row['n'] > 1 else ''})" if row["n"] < 3 else ""
    return f"{100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_std']:.2f}{partial}"


def markdown(args, rows: dict, summaries: dict, teacher_summary: dict) -> str:
    env = environment()
    trained_at = sorted({(RESULTS / "runs" / args.name / k / "commit.txt").read_text().strip()
                         for k in summaries if (RESULTS / "runs" / args.name / k / "commit.txt").exists()})
    lines = [f"# {args.name}", "", f"Command: `{args.command}`  ",
             f"Runs made at commit {', '.join(trained_at) or 'unknown'}; tables written at {commit()}  ",
             f"Hardware: {env['processor']}, torch {env['torch']}, {args.jobs} run(s) at a time  ",
             f"Teacher: {args.model}, {args.teacher_epochs} epochs of dense training, test accuracy "
             f"{100 * teacher_summary['test_accuracy']:.2f} %  ",
             f"UniPTS: search population {args.population}, {args.generations} generations; sparse training "
             f"{args.epochs} passes over the calibration set, batch 64, lr 0.01"
             + ("" if set(args.unipts_sparsities) >= set(args.sparsities) else
                f"; run at {', '.join(f'{100 * s:g} %' for s in args.unipts_sparsities)} sparsity only") + "  ",
             f"Total wall time of the finished runs: {sum(s['wall_seconds'] for s in summaries.values()) / 60:.1f} min",
             ""]
    for size in args.calibration_sizes:
        if not any(r["calibration_size"] == size and r["label"] in TABLE_ROWS for r in rows.values()):
            continue  # not started yet
        lines += [f"## {size} calibration samples: last-epoch test accuracy (%), mean ± std over seeds", "",
                  "| method | " + " | ".join(f"{100 * s:g} %" for s in args.sparsities) + " |",
                  "|---|" + "---|" * len(args.sparsities)]
        for label in TABLE_ROWS:
            cells = [_cell(rows.get(f"{label}-{s:g}-n{size}")) for s in args.sparsities]
            if any(cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    ablation = [(label, rows.get(f"{label}-{ABLATION_SPARSITY:g}-n{args.calibration_sizes[0]}"))
                for label in ("unipts", *ABLATIONS)]
    if any(r for label, r in ablation if label != "unipts"):
        lines += [f"## UniPTS ablations at {100 * ABLATION_SPARSITY:g} %, {args.calibration_sizes[0]} samples", "",
                  "| variant | test accuracy (%) | searched distribution: calibration / held-out accuracy "
                  "(magnitude + BN) | wall time per run | cost (dense epochs) |", "|---|---|---|---|---|"]
        for label, r in ablation:
            if r is None:
                continue
            search = (f"{100 * r['search_calibration_accuracy']:.2f} / {100 * r['search_heldout_accuracy']:.2f}"
                      if "search_calibration_accuracy" in r else "-")
            lines.append(f"| {label} | {_cell(r)} | {search} | {r['wall_seconds_mean']:.0f} s | "
                         f"{r['cost_dense_epochs']:.3f} |")
        lines += ["", "unipts-static, -constant-tau and -mse reuse the searched distribution of the unipts run of "
                  "the same seed (their switch acts after the search), so their cost excludes the search.", ""]
    lines += ["Accuracy is the test accuracy of the final model (after the last epoch of UniPTS's sparse training, "
              "never the best). Cost counts 2 × MACs per sample of every forward as it ran (the search's "
              "recalibrations and scorings, the teacher, the student's forward and backward), in units of one "
              "epoch of dense training on the full training set.", ""]
    return "\n".join(lines)


def plot(args, rows: dict) -> None:
    sizes = [s for s in args.calibration_sizes if any(r["calibration_size"] == s for r in rows.values())] or \
        args.calibration_sizes[:1]
    with figure(RESULTS / f"{args.name}.png", ncols=len(sizes), figsize=(5.5 * len(sizes), 4)) as axes:
        axes = axes if len(sizes) > 1 else [axes]
        for ax, size in zip(axes, sizes):
            for method in TABLE_ROWS:
                keys = [f"{method}-{s:g}-n{size}" for s in args.sparsities if f"{method}-{s:g}-n{size}" in rows]
                if keys:
                    ax.errorbar([100 * rows[k]["sparsity_target"] for k in keys],
                                [100 * rows[k]["test_accuracy_mean"] for k in keys],
                                yerr=[100 * rows[k]["test_accuracy_std"] for k in keys], marker="o", capsize=3,
                                label=method)
            if rows:
                ax.axhline(100 * next(iter(rows.values()))["dense_test_accuracy"], color="black", ls="--", lw=1,
                           label="dense")
            style(ax, "sparsity (%)", "test accuracy (%)", title=f"{args.model}, {size} calibration samples")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny search and training, 2 sparsities, separate results")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--calibration-sizes", type=int, nargs="+", default=list(CALIBRATION_SIZES))
    # The paper's search is 25 × 25 and its training 100 passes; on two CPU cores that is ~25 min a run at 1024
    # samples, so the grid defaults to 25 × 8 (200 fitness calls) and 50 passes, and says so in its tables.
    p.add_argument("--population", type=int, default=25, help="UniPTS search population (the paper's 25)")
    p.add_argument("--generations", type=int, default=8, help="UniPTS search generations (the paper: 25)")
    p.add_argument("--epochs", type=int, default=50, help="UniPTS passes over the calibration set (the paper: 100)")
    # a bigger model may afford UniPTS at a few sparsities only (the baselines run at all of them)
    p.add_argument("--unipts-sparsities", type=float, nargs="+", default=None,
                   help="run UniPTS at these of --sparsities only (default: all)")
    p.add_argument("--no-ablations", dest="ablations", action="store_false",
                   help="leave out UniPTS's ablations and the overfitting check")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (threads are split between them)")
    p.add_argument("--limit", type=int, default=None, help="run at most this many unfinished runs, then report")
    p.add_argument("--report-only", action="store_true", help="write tables and plots from finished runs only")
    args = p.parse_args(argv)
    # the command that makes the grid (without the flags that only report, or pause it)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--limit" in given:
        del given[given.index("--limit"):given.index("--limit") + 2]
    args.command = " ".join(["python bench/pts.py", *(a for a in given if a != "--report-only")])
    if args.quick:
        args.sparsities, args.calibration_sizes, args.seeds = [0.5, 0.9], [128], 2
        args.population, args.generations, args.epochs, args.teacher_epochs = 4, 2, 3, 1
    if args.unipts_sparsities is None:
        args.unipts_sparsities = list(args.sparsities)
    elif not set(args.unipts_sparsities) <= set(args.sparsities):
        p.error(f"--unipts-sparsities {args.unipts_sparsities} must be among --sparsities {args.sparsities}")
    args.name = f"pts-{args.model}" + ("-quick" if args.quick else "")

    teacher_config = TrainConfig(model=args.model, method="dense", sparsity=0.0, epochs=args.teacher_epochs,
                                 max_steps=60 if args.quick else None, seed=0, channels_last=True,
                                 progress=sys.stderr.isatty())
    teacher_summary = run_grid(args.name, {"dense-seed0": teacher_config})["dense-seed0"]
    teacher = RESULTS / "runs" / args.name / "dense-seed0" / MODEL
    phases = plan(args)
    summaries = run_all(args, teacher, phases)
    rows = rows_of({k: v for phase in phases for k, v in phase.items()}, summaries)
    write_json(RESULTS / f"{args.name}.json", {
        "grid": args.name, "command": args.command, "commit": commit(), "environment": environment(),
        "args": {k: v for k, v in vars(args).items() if k != "command"}, "teacher": {
            k: teacher_summary[k] for k in ("test_accuracy", "epochs", "train_flops", "wall_seconds")},
        "rows": rows, "runs": {k: {f: v for f, v in s.items() if f not in ("layers", "config", "environment")}
                               for k, s in summaries.items()}})
    md = markdown(args, rows, summaries, teacher_summary)
    (RESULTS / f"{args.name}.md").write_text(md)
    plot(args, rows)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main))
