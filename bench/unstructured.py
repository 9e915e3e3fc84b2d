"""IEE against the sparse-training baselines in the long regime: unstructured ERK sparsity on Fashion-MNIST.

    python bench/unstructured.py --model mlp --epochs 30 --jobs 2          # the README grid on two CPU cores
    python bench/unstructured.py --model resnet8 --epochs 20 --jobs 2      # the conv grid (many hours)
    python bench/unstructured.py --model mlp --epochs 30 --only 'iee-*-0.95-*' 'rigl-0.95-*'   # a part of it
    python bench/unstructured.py --quick                                   # smoke test: a few steps per run

The regime is IEE's: at least 50 IEE cycles (H = J = Q = 50 steps, cycles until 75 % of training) and a dense
baseline that has plateaued (dense at E and at 2E epochs are both in the grid; the table says how far apart).
RigL and SET update every ``--interval`` steps, by default 33: the paper runs IEE with H = J = Q = 150 against
RigL's ΔT = 100, i.e. 4.5 RigL updates per IEE cycle, and the same ratio at H = J = Q = 50 is an interval of 33.
RigL at its own default interval (100) is in the grid too, at 95 % and 98 %.

Grid, the same seeds for every method (paired): dense (E and 2E epochs); static, SET, RigL and IEE at 90, 95 and
98 % ERK (E epochs); at 95 % IEE's open choices (never-active units at their initial values or at 0, exploration
at 0.1×, 0.3× or 1× the learning rate) and its ablations (no exploration, no freeze of Θ_K, J = 0, zero init of
grown weights); and RigL given IEE's training FLOPs as more epochs (equal FLOPs; planned once IEE's and RigL's
E-epoch runs of seed 0 have finished, so run the script again to add them).
Reports the last-epoch test accuracy (mean ± std), the paired IEE − RigL difference (mean ± standard error over
seeds), training FLOPs, wall time, and the paper's mask metrics (re-admission share, first-time growth, IoU,
survival of grown units) as JSON + markdown + plots. Resumable: finished runs are skipped, interrupted ones resume.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys

from runner import (
    CONV_MODELS,
    RESULTS,
    aggregate,
    augment_suffix,
    augments,
    difference_text,
    figure,
    paired_difference,
    run_grid,
    script_main,
    style,
    write_results,
)

from regrow.methods.iee import PAPER_CYCLE
from regrow.training import METRICS, SUMMARY, TrainConfig

SPARSITIES = (0.9, 0.95, 0.98)
METHODS = ("static", "set", "rigl", "iee")
HJQ = 50  # IEE's H = J = Q at batch 128 on Fashion-MNIST (469 steps an epoch)
PAPER_HJQ, PAPER_RIGL_INTERVAL = 150, 100

# The open choices of IEE that the grid measures (run ids name them), and its ablations at the chosen ones.
CHOICE_GRID = (("init", 0.1), ("zero", 0.1), ("init", 0.3), ("init", 1.0), ("zero", 1.0))
ABLATIONS = {
    "iee-no-explore": {"explore": False},
    "iee-no-freeze": {"freeze_active": False},
    "iee-no-improve": {"improve_steps": 0},
    "iee-zero-init": {"grow_init": "zero"},
}
# Tried after the main grid, at 95 and 98 %, where IEE met RigL at its own interval (ΔT = 100) rather than at the
# paper's ratio: longer cycles (fewer mask changes, as ΔT = 100 is for RigL), a smaller update fraction, the
# 0.3× exploration rate and no J stage (the two best variants at 95 %), and RigL's interval at 90 %. The MLP's own:
# its answers (none beat the grid's IEE by more than its s.e.) did not call for a rerun on the conv net.
INVESTIGATION_MLP = {
    "iee-hjq100": {"estimate_steps": 100, "improve_steps": 100, "explore_steps": 100},
    "iee-hjq150": {"estimate_steps": 150, "improve_steps": 150, "explore_steps": 150},
    "iee-alpha0.1": {"alpha": 0.1},
    "iee-init-lr0.3": {"explore_lr_scale": 0.3},
    "iee-no-improve": {"improve_steps": 0},
}
# Where a conv net's 95 % choices said otherwise (ResNet-8: never-active units at 0 beat their initial values by
# 1.3 points on seeds 0 and 1), that choice at every sparsity, so that a default can be judged on all three.
INVESTIGATION_EVERYWHERE = {"iee-zero-lr0.1": {"never_active": "zero"}}
# A conv net's own open choice, at 95 %: BatchNorm trains during exploration (its affine parameters and running
# statistics follow the dense network that explores) instead of being held with Θ_K; with zeros, the better
# start on ResNet-8. The MLP has no BatchNorm, so this choice was never measured there.
INVESTIGATION_CONV = {"iee-zero-bn": {"never_active": "zero", "freeze_bn": False}}
# With zeros, on every net (first run on ResNet-8, then the MLP once zeros became the default): Θ_K training on
# during exploration (BatchNorm too): not freezing was the better ablation on both the MLP (+0.14) and ResNet-8
# with initial values (+0.28), and every step then trains the active weights, as RigL's do; the best variant at
# 95 % on both nets, so at every sparsity. A third of the update fraction, at 95 %: zeros re-admit 73 % of the
# pruned units on ResNet-8, and on the MLP alpha = 0.1 cut re-admission from 30 to 5 % at the same accuracy.
# And both together, at every sparsity: Θ_K training on was the more accurate, α = 0.1 the one that re-admits less
# (41 against 73 % on ResNet-8 at the same accuracy).
INVESTIGATION_ZERO = {"iee-zero-no-freeze": {"never_active": "zero", "freeze_active": False},
                      "iee-zero-alpha0.1": {"never_active": "zero", "alpha": 0.1},
                      "iee-zero-no-freeze-alpha0.1": {"never_active": "zero", "freeze_active": False, "alpha": 0.1}}
# Between the two starts, on every net at 95 %: never-active units at their initial values shrunk by a factor.
# Zeros keep the exploring network close to the sparse one (explored_share: Θ_P adds 0.2-0.6x of Θ_K's output on
# ResNet-8, against 0.5-2.2x with initial values) but re-admit most of what a cycle pruned; a 1350-step ResNet-8
# pilot (one seed, 95 %) put 0.1x level with zeros (84.0 vs 84.1 %, re-admission 50 vs 65 %) and 0.3x in between
# (83.2 %, 19 %; initial values 80.1 %, 13 %).
INVESTIGATION_START = {"iee-init-scale0.1": {"never_active_scale": 0.1},
                       "iee-init-scale0.3": {"never_active_scale": 0.3}}
# The optimizer state a grown unit starts from, at 95 % on the MLP: zero, as RigL's grown weights (the default), or
# the momentum its Q exploration steps built; with Θ_K frozen (the defaults) and with the candidate defaults (Θ_K
# training on, α = 0.1). It did not help either (-0.01 ± 0.06, -0.26 ± 0.07), so the conv net does not run it.
INVESTIGATION_STATE = {"iee-momentum-zero": {"never_active": "zero", "grown_state": "explored"},
                       "iee-momentum-zero-no-freeze-alpha0.1": {"never_active": "zero", "freeze_active": False,
                                                                      "alpha": 0.1, "grown_state": "explored"}}
INVESTIGATED_AT = {**dict.fromkeys(INVESTIGATION_MLP, (0.95, 0.98)),
                   **dict.fromkeys(INVESTIGATION_EVERYWHERE, (0.9, 0.95, 0.98)),
                   **dict.fromkeys(INVESTIGATION_CONV, (0.95,)),
                   **dict.fromkeys(INVESTIGATION_ZERO, (0.9, 0.95, 0.98)),
                   "iee-zero-alpha0.1": (0.95,),
                   **dict.fromkeys(INVESTIGATION_START, (0.95,)),
                   **dict.fromkeys(INVESTIGATION_STATE, (0.95,))}


def iee_id(never_active: str, explore_lr_scale: float) -> str:
    return f"iee-{never_active}-lr{explore_lr_scale:g}"


# The paper's cycle (Θ_K frozen while Θ_P explores, RigL's α) was regrow's default when the grids were built: the
# grid's IEE, its open choices, ablations and investigation all run on it unless they name a change.
# The IEE the grid was built around: its main rows at every sparsity and the base of its ablations (regrow's defaults
# when the grids ran). Pinned here, so that a change of regrow's defaults cannot relabel finished runs; where the
# defaults differ, the grid also runs them at every sparsity and the report's IEE is regrow's default.
GRID_IEE = {"never_active": "init", "explore_lr_scale": 0.1, **PAPER_CYCLE}
# regrow's IEE defaults and the id of their runs, pinned too: a test checks that they are the library's defaults, so
# that a change of the defaults fails it instead of relabelling runs (the investigation first ran these, so the id
# is the investigation's).
DEFAULT_IEE_ID = "iee-zero-no-freeze-alpha0.1"
DEFAULT_IEE = {"never_active": "zero", "explore_lr_scale": 0.1, "freeze_active": False, "alpha": 0.1}


def options_text(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def default_iee() -> str:
    """Run id of IEE at regrow's defaults."""
    return DEFAULT_IEE_ID


def grid_iee() -> str:
    """Run id of the grid's own IEE (:data:`GRID_IEE`)."""
    return iee_id(GRID_IEE["never_active"], GRID_IEE["explore_lr_scale"])


def main_iees() -> list[tuple[str, dict]]:
    """The IEE runs at every sparsity: the grid's own, and regrow's defaults where they differ."""
    return list({grid_iee(): dict(GRID_IEE), default_iee(): dict(DEFAULT_IEE)}.items())


def grid(args) -> dict[str, TrainConfig]:
    hjq = 5 if args.quick else args.hjq
    interval = 3 if args.quick else args.interval

    def config(method, sparsity, seed, options, epochs=args.epochs):
        if method in ("set", "rigl"):
            options = {"interval": interval, **options}
        if method == "iee":
            options = {**dict.fromkeys(("estimate_steps", "improve_steps", "explore_steps"), hjq), **options}
        return TrainConfig(model=args.model, method=method, sparsity=sparsity, distribution="erk", epochs=epochs,
                           max_steps=40 if args.quick else None, seed=seed, device=args.device, augment=augment(args),
                           channels_last=args.model in CONV_MODELS,
                           progress=sys.stderr.isatty() and args.jobs == 1, method_options=options)

    chosen = dict(GRID_IEE)  # the ablations and the investigation vary the grid's IEE
    runs, investigation = {}, set()
    for seed in range(args.seeds):
        runs[f"dense-seed{seed}"] = config("dense", 0.0, seed, {})
        runs[f"dense-2x-seed{seed}"] = config("dense", 0.0, seed, {}, epochs=2 * args.epochs)
        for sparsity in SPARSITIES:
            for method in METHODS:
                if method == "iee":
                    for run, options in main_iees():
                        runs[f"{run}-{sparsity:g}-seed{seed}"] = config("iee", sparsity, seed, options)
                else:
                    runs[f"{method}-{sparsity:g}-seed{seed}"] = config(method, sparsity, seed, {})
        for never_active, scale in CHOICE_GRID:
            runs[f"{iee_id(never_active, scale)}-0.95-seed{seed}"] = config(
                "iee", 0.95, seed, {"never_active": never_active, "explore_lr_scale": scale, **PAPER_CYCLE})
        for label, options in ABLATIONS.items():
            runs[f"{label}-0.95-seed{seed}"] = config("iee", 0.95, seed, {**chosen, **options})
        for sparsity in SPARSITIES:
            runs[f"rigl-interval{PAPER_RIGL_INTERVAL}-{sparsity:g}-seed{seed}"] = config(
                "rigl", sparsity, seed, {"interval": PAPER_RIGL_INTERVAL})
        if args.investigate:
            own = INVESTIGATION_CONV if args.model in CONV_MODELS else {**INVESTIGATION_MLP, **INVESTIGATION_STATE}
            for label, options in {**own, **INVESTIGATION_EVERYWHERE, **INVESTIGATION_ZERO,
                                   **INVESTIGATION_START}.items():
                for sparsity in INVESTIGATED_AT[label]:
                    run_id = f"{label}-{sparsity:g}-seed{seed}"
                    if run_id not in runs:  # iee-init-lr0.3, -no-improve, -zero-lr0.1 at 95 % are in the grid
                        runs[run_id] = config("iee", sparsity, seed, {**chosen, **options})
                        investigation.add(run_id)
    runs.update(equal_flops_runs(args, runs, config))
    runs = dict(sorted(runs.items(), key=lambda item: (3, 0) if item[0] in investigation else priority(item[0])))
    if args.only:
        runs = {k: v for k, v in runs.items() if any(fnmatch.fnmatch(k, p) for p in args.only)}
    return runs


def priority(run_id: str) -> tuple[int, int]:
    """Train order for a grid that spans sessions: the main comparison for every seed first (dense at E and 2E,
    static, SET, RigL and IEE at every sparsity), then the open choices, the ablations and RigL at ΔT = 100, then
    RigL at equal FLOPs."""
    key, seed = run_id.rsplit("-seed", 1)
    methods = ("static", "set", "rigl", *(run for run, _ in main_iees()))
    main = key in ("dense", "dense-2x") or any(key == f"{m}-{s:g}" for m in methods for s in SPARSITIES)
    return (0 if main else 2 if key.startswith("rigl-eqflops") else 1), int(seed)


def equal_flops_runs(args, runs: dict[str, TrainConfig], config) -> dict[str, TrainConfig]:
    """RigL trained for as many epochs as give it IEE's training FLOPs, from the finished seed-0 runs' FLOPs."""
    out = {}
    for sparsity in SPARSITIES:
        iee, rigl = (read_summary(args, f"{name}-{sparsity:g}-seed0") for name in (grid_iee(), "rigl"))
        if iee is None or rigl is None:
            print(f"equal-FLOPs RigL at {sparsity:g}: waiting for {grid_iee()} and rigl at seed 0", flush=True)
            continue
        epochs = max(args.epochs, round(args.epochs * iee["train_flops"] / rigl["train_flops"]))
        for seed in range(args.seeds):
            out[f"rigl-eqflops-{sparsity:g}-seed{seed}"] = config("rigl", sparsity, seed, {}, epochs=epochs)
    return out


def augment(args) -> bool:
    return augments(args.model, args.augment)


def grid_name(args) -> str:
    if args.grid_name:
        return args.grid_name
    if args.quick:
        return "unstructured-quick"
    return f"unstructured-{args.model}-e{args.epochs}{augment_suffix(args.model, args.augment)}"


def read_summary(args, run_id: str) -> dict | None:
    path = RESULTS / "runs" / grid_name(args) / run_id / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def group(run_id: str, summary: dict) -> str:
    return run_id.rsplit("-seed", 1)[0]


# ----- reporting --------------------------------------------------------------------------------------------------
def by_seed(summaries: dict, key: str) -> dict[int, dict]:
    return {s["seed"]: s for run_id, s in summaries.items() if group(run_id, s) == key}


def mask_stats(summaries: dict, key: str) -> dict:
    """Pooled mask metrics of a group, averaged over its seeds."""
    runs = [s["mask_metrics"] for s in by_seed(summaries, key).values() if s["mask_metrics"].get("updates")]
    if not runs:
        return {}

    def mean(field, sub=None):
        values = [r[field] if sub is None else r[field][sub] for r in runs]
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None
    return {"updates": mean("updates"), "readmitted": mean("readmitted_share"), "first_time": mean("first_time_share"),
            "survival_next": mean("survival_share", "1"), "survival_to_end": mean("survival_to_end_share"),
            # the last update barely moves the mask (the update fraction has decayed to ~0): the mean says more
            "iou_mean": statistics.fmean(statistics.fmean(r["iou_previous"]) for r in runs),
            "ever_active": mean("ever_active_share")}


def cell(rows: dict, key: str) -> str:
    r = rows.get(key)
    if r is None:
        return ""
    if r["n"] == 1:  # one seed has no spread: say so instead of "± 0.00"
        return f"{100 * r['test_accuracy_mean']:.2f} (n=1)"
    return f"{100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f}"


def diff_cell(d: dict | None) -> str:
    return difference_text(d, missing="")


def pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def report(rows: dict, summaries: dict, args) -> str:
    iee = default_iee()
    lines = ["## Equal epochs", "",
             f"Last-epoch test accuracy (%), mean ± std over seeds; IEE − RigL is the paired difference (mean ± "
             f"standard error over seeds). IEE = {iee} (regrow's defaults).", "",
             "| sparsity | dense | static | SET | RigL | IEE | IEE − RigL | RigL ΔT=100 | IEE − RigL ΔT=100 | "
             "FLOPs IEE / RigL (× dense) | IEE re-admitted | RigL re-admitted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in SPARSITIES:
        k = f"{s:g}"
        rigl100 = f"rigl-interval{PAPER_RIGL_INTERVAL}-{k}"
        flops = (f"{rows[f'{iee}-{k}']['train_flops_ratio']:.3f} / {rows[f'rigl-{k}']['train_flops_ratio']:.3f}"
                 if f"{iee}-{k}" in rows and f"rigl-{k}" in rows else "")
        lines.append(f"| {100 * s:g} % | {cell(rows, 'dense') if s == SPARSITIES[0] else ''} | "
                     f"{cell(rows, f'static-{k}')} | {cell(rows, f'set-{k}')} | {cell(rows, f'rigl-{k}')} | "
                     f"{cell(rows, f'{iee}-{k}')} | "
                     f"{diff_cell(paired_difference(summaries, f'{iee}-{k}', f'rigl-{k}'))} | "
                     f"{cell(rows, rigl100)} | {diff_cell(paired_difference(summaries, f'{iee}-{k}', rigl100))} | "
                     f"{flops} | "
                     f"{pct(mask_stats(summaries, f'{iee}-{k}').get('readmitted'))} | "
                     f"{pct(mask_stats(summaries, f'rigl-{k}').get('readmitted'))} |")
    plateau = paired_difference(summaries, "dense-2x", "dense")
    if plateau:
        lines += ["", f"Dense plateau: dense at {2 * args.epochs} epochs − dense at {args.epochs} epochs = "
                      f"{diff_cell(plateau)} points ({cell(rows, 'dense-2x')} vs {cell(rows, 'dense')})."]
    lines += ["", "## Equal training FLOPs", "",
              "RigL trained for as many epochs as give it IEE's training FLOPs (IEE's exploration runs dense).", "",
              "| sparsity | RigL epochs | RigL FLOPs (× dense E epochs) | RigL at equal FLOPs | IEE | IEE − RigL |",
              "|---|---|---|---|---|---|"]
    not_run, trails = [], False
    for s in SPARSITIES:
        k = f"{s:g}"
        r = rows.get(f"rigl-eqflops-{k}")
        if r is None:
            at_equal_epochs = paired_difference(summaries, f"{iee}-{k}", f"rigl-{k}")
            if at_equal_epochs is not None:
                not_run.append(f"{100 * s:g} % (IEE − RigL at equal epochs {diff_cell(at_equal_epochs)})")
                trails |= at_equal_epochs["mean"] < 0
            continue
        ratio = r["train_flops"] / rows["dense"]["train_flops"] if "dense" in rows else float("nan")
        difference = diff_cell(paired_difference(summaries, f"{iee}-{k}", f"rigl-eqflops-{k}"))
        lines.append(f"| {100 * s:g} % | {r['epochs']} | {ratio:.3f} | {cell(rows, f'rigl-eqflops-{k}')} | "
                     f"{cell(rows, f'{iee}-{k}')} | {difference} |")
    if not_run:
        lines += ["", "No equal-FLOPs RigL run has finished (or none is in this grid) at " + "; ".join(not_run) + "."
                  + (" Where IEE already trails RigL at equal epochs, RigL's longer run is only expected to widen the "
                     "gap (more epochs helped RigL at every sparsity of the MLP grid); that expectation is not a "
                     "measurement." if trails else "")]
    lines += ["", "## IEE at 95 %: open choices and ablations", "",
              f"The ablations change one switch of {grid_iee()} ({options_text(GRID_IEE)}); (default) marks "
              f"regrow's defaults ({options_text(DEFAULT_IEE)}).", "",
              "| variant | accuracy | − RigL (paired) | FLOPs (× dense) | cycles | re-admitted | first-time | "
              "survival next cycle | survival to end | IoU with the previous update (mean) | ever active |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    variants = list(dict.fromkeys([*(iee_id(n, lr) for n, lr in CHOICE_GRID), *ABLATIONS, iee, "rigl", "set"]))
    for v in variants:
        key = f"{v}-0.95"
        if key not in rows:
            continue
        m = mask_stats(summaries, key)
        lines.append(f"| {v}{' (default)' if v == iee else ''} | {cell(rows, key)} | "
                     f"{diff_cell(paired_difference(summaries, key, 'rigl-0.95')) if v != 'rigl' else ''} | "
                     f"{rows[key]['train_flops_ratio']:.3f} | {m.get('updates', 0):.0f} | "
                     f"{pct(m.get('readmitted'))} | {pct(m.get('first_time'))} | {pct(m.get('survival_next'))} | "
                     f"{pct(m.get('survival_to_end'))} | {m.get('iou_mean', float('nan')):.3f} | "
                     f"{pct(m.get('ever_active'))} |")
    if any(f"{label}-{s:g}" in rows for label, at in INVESTIGATED_AT.items() for s in at):
        rigl100 = f"rigl-interval{PAPER_RIGL_INTERVAL}"
        lines += ["", "## Investigation: IEE variants against RigL at both intervals", "",
                  "| sparsity | variant | cycles | accuracy | − RigL ΔT=33 (paired) | − RigL ΔT=100 (paired) | "
                  f"− {iee} (paired) | FLOPs (× dense) | re-admitted |", "|---|---|---|---|---|---|---|---|---|"]
        for s in SPARSITIES:
            k = f"{s:g}"
            labels = [iee, *(run for run, _ in main_iees() if run != iee), *INVESTIGATED_AT]
            for label in dict.fromkeys(labels):  # each once (regrow's default may be an investigated variant)
                key = f"{label}-{k}"
                if key not in rows or (label == iee and not any(
                        f"{v}-{k}" in rows for v in INVESTIGATED_AT if s in INVESTIGATED_AT[v])):
                    continue
                m = mask_stats(summaries, key)
                lines.append(f"| {100 * s:g} % | {label} | {m.get('updates', 0):.0f} | {cell(rows, key)} | "
                             f"{diff_cell(paired_difference(summaries, key, f'rigl-{k}'))} | "
                             f"{diff_cell(paired_difference(summaries, key, f'{rigl100}-{k}'))} | "
                             f"{diff_cell(paired_difference(summaries, key, f'{iee}-{k}')) if label != iee else ''} | "
                             f"{rows[key]['train_flops_ratio']:.3f} | {pct(m.get('readmitted'))} |")
    lines += fit_lines(rows, summaries, args)
    lines += dead_unit_lines(summaries)
    return "\n".join(lines)


def last_epoch_train_loss(args, run_id: str) -> float | None:
    """Mean of the training losses the run logged in its last epoch (the sparse network's; exploration's loss is
    logged apart), or None where its metrics are missing."""
    path = RESULTS / "runs" / grid_name(args) / run_id / METRICS
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [(r["epoch"], r["loss"]) for r in records if r.get("loss") is not None and "epoch" in r]
    if not losses:
        return None
    last = max(epoch for epoch, _ in losses)
    return statistics.fmean(loss for epoch, loss in losses if epoch == last)


def fit_lines(rows: dict, summaries: dict, args) -> list[str]:
    """Training against test loss at the end, per group: a network that fits its training data no better than
    its test data is limited by capacity (its mask), not by over-fitting, so accuracy differences there are
    differences in how well each sparse network can fit."""
    table = []
    for key in rows:
        pairs = [(last_epoch_train_loss(args, run_id), s["test_loss"]) for run_id, s in summaries.items()
                 if group(run_id, s) == key]
        pairs = [(train, test) for train, test in pairs if train is not None]
        if not pairs:
            continue
        train, test = statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)
        table.append(f"| {key} | {train:.4f} | {test:.4f} | {test - train:+.4f} | {len(pairs)} |")
    if not table:
        return []
    return ["", "## Fit at the end", "",
            "Training loss of the last epoch (mean of the logged values, the sparse network's, on the augmented "
            "batches where the grid augments) against the test loss after it, mean over seeds.", "",
            "| run | training loss | test loss | test − training | seeds |", "|---|---|---|---|---|", *table]


def dead_unit_lines(summaries: dict) -> list[str]:
    """Output units with no active weight and input units none reads, at the end (masking.dead_units), per
    method and sparsity: a very sparse layer can be narrower than its shape. Only runs whose summary has them."""
    groups: dict[str, list[tuple[int, int, int]]] = {}
    for run_id, summary in summaries.items():
        if summary["method"] != "dense" and summary["layers"] and all("dead_outputs" in layer
                                                                       for layer in summary["layers"]):
            layers = summary["layers"]
            groups.setdefault(group(run_id, summary), []).append(
                (sum(x["dead_outputs"] for x in layers), sum(x["dead_inputs"] for x in layers),
                 sum(x["shape"][0] for x in layers)))
    if not groups:
        return []
    lines = ["", "## Dead units at the end", "",
             "Output units (rows, output channels) of the masked layers left with no active weight, and input units "
             "no weight reads, mean over the runs that record them (summaries from before this count lack it).", "",
             "| run | runs | dead outputs (of all) | dead inputs |", "|---|---|---|---|"]
    for key in sorted(groups):
        values = groups[key]
        lines.append(f"| {key} | {len(values)} | {statistics.fmean(v[0] for v in values):.1f} (of {values[0][2]}) | "
                     f"{statistics.fmean(v[1] for v in values):.1f} |")
    return lines


def mean_curve(curves: list[list[float | None]]) -> list[float]:
    length = min(len(c) for c in curves)
    out = []
    for i in range(length):
        values = [c[i] for c in curves if c[i] is not None]
        out.append(statistics.fmean(values) if values else float("nan"))
    return out


def plot(rows: dict, summaries: dict, prefix: str) -> None:
    iee = default_iee()
    with figure(RESULTS / f"{prefix}-accuracy.png", ncols=2, figsize=(11, 4)) as axes:
        iees = [(f"IEE, never_active={o['never_active']}{' (default)' if run == iee else ''}", run)
                for run, o in main_iees()]
        for label, method in (("static", "static"), ("SET", "set"), ("RigL", "rigl"), *iees,
                              ("RigL at IEE's FLOPs", "rigl-eqflops")):
            keys = [f"{method}-{s:g}" for s in SPARSITIES if f"{method}-{s:g}" in rows]
            if not keys:
                continue
            x = [100 * rows[k]["sparsity_target"] for k in keys]
            axes[0].errorbar(x, [100 * rows[k]["test_accuracy_mean"] for k in keys],
                             yerr=[100 * rows[k]["test_accuracy_std"] for k in keys], marker="o", capsize=3,
                             label=label)
            axes[1].scatter([rows[k]["train_flops_ratio"] for k in keys],
                            [100 * rows[k]["test_accuracy_mean"] for k in keys], label=label)
        if "dense" in rows:
            for ax in axes:
                ax.axhline(100 * rows["dense"]["test_accuracy_mean"], color="black", ls="--", lw=1, label="dense")
        style(axes[0], "sparsity (%)", "last-epoch test accuracy (%)")
        axes[1].set_xscale("log")
        style(axes[1], "training FLOPs (× dense training of E epochs)", "last-epoch test accuracy (%)")

    panels = (("iou_previous", "mask IoU with the previous update"),
              ("readmitted", "pruned units grown back by the same update"),
              ("survival_to_end", "grown units still active at the end"))
    with figure(RESULTS / f"{prefix}-masks.png", ncols=3, figsize=(15, 4)) as axes:
        for label, key in (("SET", "set-0.95"), ("RigL", "rigl-0.95"),
                           ("IEE, never-active at initial values", "iee-init-lr0.1-0.95"),
                           ("IEE, never-active at 0", "iee-zero-lr0.1-0.95"),
                           ("IEE, no exploration", "iee-no-explore-0.95")):
            runs = [s["mask_metrics"] for s in by_seed(summaries, key).values() if s["mask_metrics"].get("updates")]
            if not runs or "readmitted" not in runs[0]:
                continue
            for ax, (field, _) in zip(axes, panels):
                curve = mean_curve([r[field] for r in runs])
                ax.plot([100 * (i + 1) / len(curve) for i in range(len(curve))], curve, lw=1, label=label)
        for ax, (_, title) in zip(axes, panels):
            ax.set_ylim(-0.02, 1.02)
            style(ax, "mask update, % of all (IEE: cycles; RigL, SET: updates)", title=title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 steps per run, H = J = Q = 5, into a separate grid")
    p.add_argument("--model", default="mlp")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--hjq", type=int, default=HJQ, help="IEE's H = J = Q in steps")
    p.add_argument("--interval", type=int, default=None,
                   help="RigL/SET update interval (default: the paper's ratio to H, J, Q: 100 × hjq / 150)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: for conv nets, not for the MLP)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (threads are split between them)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (several jobs may share one GPU)")
    p.add_argument("--only", nargs="+", default=None, metavar="PATTERN", help="train only run ids matching these")
    p.add_argument("--report-only", action="store_true", help="write the tables from finished runs, train nothing")
    p.add_argument("--investigate", action="store_true",
                   help="also the IEE variants tried after the main grid (longer cycles, smaller update fraction, "
                        "0.3x exploration rate, no J stage) at 95 and 98 %%, and never-active units at 0 at every "
                        "sparsity")
    p.add_argument("--grid-name", default=None, help="results name (default unstructured-<model>-e<epochs>)")
    args = p.parse_args(argv)
    if args.interval is None:
        args.interval = max(1, round(PAPER_RIGL_INTERVAL * args.hjq / PAPER_HJQ))
    name = grid_name(args)
    runs = grid(args)
    if args.report_only:
        runs = {k: v for k, v in runs.items() if read_summary(args, k) is not None}
    summaries = run_grid(name, runs, jobs=args.jobs)
    if args.only and not args.report_only:  # a part of the grid: report on everything finished so far
        args.only = None
        summaries = {k: s for k in grid(args) if (s := read_summary(args, k)) is not None}
    rows = aggregate(summaries, group)
    setup = {"model": args.model, "dataset": "fashion-mnist", "distribution": "erk", "epochs": args.epochs,
             "augmentation": "random crop + flip" if augment(args) else "none", "batch size": 128,
             "seeds": args.seeds, "jobs": args.jobs,
             "optimizer": "SGD Nesterov 0.9, lr 0.1 cosine, wd 5e-4",
             "RigL/SET": f"update every {args.interval} steps, alpha 0.3 cosine, T_end 75 %",
             "IEE": f"H = J = Q = {5 if args.quick else args.hjq}, magnitude, cosine Omega, T_end 75 %; defaults "
                    f"({default_iee()}) {options_text(DEFAULT_IEE)}; the grid's IEE ({grid_iee()}, the ablations' "
                    f"base) {options_text(GRID_IEE)}"}
    command = " ".join(["python bench/unstructured.py", *(argv if argv is not None else sys.argv[1:])])
    md = write_results(name, rows, summaries, setup, command)
    extra = report(rows, summaries, args)
    (RESULTS / f"{name}.md").write_text(md + "\n" + extra + "\n")
    print(md + "\n" + extra)
    plot(rows, summaries, name)
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main))
