"""Resumable benchmark grids on the reference trainer.

A grid is a list of named runs (a :class:`regrow.training.TrainConfig` each). Every run trains into
``bench/results/runs/<grid>/<run id>``: a finished run (``summary.json`` present) is skipped, an interrupted one
(checkpoint present) resumes, so a long grid can span several sessions. Results are aggregated over seeds
(mean ± std of the **last-epoch** test accuracy, never the best) and written as JSON + markdown (+ plots by
the grid's own script) under ``bench/results/``, with hardware, commit, training FLOPs and wall time.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from regrow.checkpoint import write_json  # noqa: E402
from regrow.env import resolve_device  # noqa: E402
from regrow.errors import RegrowError  # noqa: E402
from regrow.training import CHECKPOINT, SUMMARY, TrainConfig, build_trainer, environment  # noqa: E402

# Every bench script works from the repository root and names files relative to it, so the paths that runs record
# (a teacher checkpoint, a pretrained model) are the same on every machine. A path the user typed is relative to
# where the script was started: resolve it against INVOKED_FROM.
INVOKED_FROM = Path.cwd()
os.chdir(ROOT)
RESULTS = Path("bench") / "results"
COMMIT = "commit.txt"
CONV_MODELS = ("resnet8", "resnet20", "resnet32", "resnet56", "wrn22-2", "vgg", "mobilenetv2", "mobilenetv2-small")


def augments(model: str, asked: bool | None) -> bool:
    """Random crop + flip for conv nets; none for the MLP, which has no translation invariance to gain from it
    (measured: dense MLP 88.79 % with it against 90.15 % without at 30 epochs, and without it dense has plateaued
    at 30 epochs while with it 30 -> 60 -> 120 epochs still gain 0.71 and 0.40 points). ``asked`` (a script's
    ``--augment`` / ``--no-augment``) wins."""
    return model in CONV_MODELS if asked is None else asked


def augment_suffix(model: str, asked: bool | None) -> str:
    """A grid's name suffix when its augmentation is not the model's default: another grid, not a resume."""
    on = augments(model, asked)
    return "" if on == (model in CONV_MODELS) else ("-aug" if on else "-noaug")


def script_main(main: Callable[[], int]) -> int:
    """A bench script's entry point: bad input (one of regrow's errors: an unknown model, ``--device cuda`` on a
    machine without CUDA) is one line and exit 2, as on regrow's command line, not a traceback."""
    try:
        return main()
    except RegrowError as error:
        print(f"{Path(sys.argv[0]).name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except TasksFailed as error:  # each failure was printed as it happened; the finished runs are kept
        print(f"{Path(sys.argv[0]).name}: {error}; run the same command again to train only what is missing",
              file=sys.stderr)
        return 1


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        # results files are rewritten by the very script that asks, so they do not count as a change
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _train_one(config: TrainConfig, out: Path, resume: bool, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    # Not resuming, the folder holds at most what a run killed before its first checkpoint left (metrics, recipe):
    # the grid made that folder and nothing in it can be resumed, so the run starts over (run_grid only gets here
    # without a summary, so no finished run is replaced).
    return build_trainer(config, out).run(resume=resume, overwrite=not resume)


def _log(message: str) -> None:
    print(message, flush=True)


def mark_commit(out: Path, code: str) -> None:
    """Record the code a run is made with, for the results page."""
    out.mkdir(parents=True, exist_ok=True)
    (out / COMMIT).write_text(code + "\n")


def _die_with_parent() -> None:
    """Worker initializer: stop when the grid's process stops (killed, interrupted), instead of finishing the task
    in hand and writing its results next to a restarted grid's."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def run_in_pool(tasks: dict[str, tuple[Callable[..., dict], tuple]], jobs: int,
                finished: Callable[[str, dict], None]) -> None:
    """Call ``fn(*args, threads)`` for every ``{id: (fn, args)}`` and hand each result to ``finished(id, result)``.

    ``jobs > 1`` runs that many at once in spawned worker processes, each with an equal share of the threads
    (small nets use two cores better as two single-threaded runs than as one run on two threads); otherwise they
    run here, one after the other, with ``threads=None`` (the current setting).

    A task that fails is reported on stderr as it fails and the others go on (they are independent runs of a
    grid, hours of them); once all have ended, :class:`TasksFailed` names every failure, so that nothing after the
    pool (a report, a timing phase) runs on an incomplete grid.
    """
    failures: dict[str, BaseException] = {}
    for task_id, outcome in _outcomes(tasks, jobs):
        try:
            result = outcome()
        except Exception as error:  # noqa: BLE001 - reported, and raised together below
            failures[task_id] = error
            print(f"{task_id}: failed: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr,
                  flush=True)
            continue
        finished(task_id, result)
    if failures:
        raise TasksFailed(failures)


def _outcomes(tasks: dict[str, tuple[Callable[..., dict], tuple]], jobs: int) -> Iterator[tuple[str, Callable]]:
    """``(id, outcome)`` per task as it ends, where ``outcome()`` returns the result or raises the task's error:
    here one after the other with ``jobs <= 1``, else from the pool, in the order they finish."""
    if jobs <= 1:
        for task_id, (fn, args) in tasks.items():
            yield task_id, functools.partial(fn, *args, None)
        return
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # no fork after OpenMP has started
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_die_with_parent) as pool:
        futures = {pool.submit(fn, *args, threads): task_id for task_id, (fn, args) in tasks.items()}
        for future in as_completed(futures):
            yield futures[future], future.result


class TasksFailed(RuntimeError):
    """Some of a pool's tasks failed (the others finished): ``failures`` maps each id to its exception."""

    def __init__(self, failures: dict[str, BaseException]):
        self.failures = failures
        first = next(iter(failures.values()))
        super().__init__(f"{len(failures)} run(s) failed ({', '.join(failures)}); the first: "
                         f"{type(first).__name__}: {' '.join(str(first).split())}")


def run_grid(grid: str, runs: dict[str, TrainConfig], log: Callable[[str], None] = _log,
             jobs: int = 1) -> dict[str, dict]:
    """Train every run not yet finished (``jobs`` at a time, see :func:`run_in_pool`); return ``{run id: summary}``
    for all of them."""
    summaries, todo = {}, {}
    for config in runs.values():  # bad input (a --device this machine lacks) stops here, before any folder is made
        config.validate()
        resolve_device(config.device)
    code_commit = commit()
    for run_id, config in runs.items():
        out = RESULTS / "runs" / grid / run_id
        if (out / SUMMARY).exists():
            summaries[run_id] = json.loads((out / SUMMARY).read_text())
        else:
            resume = (out / CHECKPOINT).exists()
            todo[run_id] = (_train_one, (config, out, resume))
            if not resume:
                mark_commit(out, code_commit)
    log(f"{grid}: {len(summaries)} of {len(runs)} runs done already, {len(todo)} to train with {jobs} job(s)")

    def report(run_id: str, s: dict) -> None:
        summaries[run_id] = s
        log(f"[{len(summaries)}/{len(runs)}] {run_id}: accuracy {s['test_accuracy']:.4f}, "
            f"FLOPs {s['train_flops_ratio']:.3f}× dense, {s['wall_seconds']:.0f} s")

    run_in_pool(todo, jobs, report)
    return {run_id: summaries[run_id] for run_id in runs}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(summaries: dict[str, dict], a: str, b: str) -> dict[str, Any] | None:
    """accuracy(a) − accuracy(b) in points over the seeds both groups have (run ids ``<group>-seed<s>``): mean,
    standard error (NaN from one seed), n and the differences; None where no seed is shared."""
    def by_seed(group: str) -> dict[str, dict]:
        return {seed: s for run_id, s in summaries.items() for g, seed in [run_id.rsplit("-seed", 1)] if g == group}

    x, y = by_seed(a), by_seed(b)
    seeds = sorted(set(x) & set(y), key=int)
    if not seeds:
        return None
    diffs = [100 * (x[s]["test_accuracy"] - y[s]["test_accuracy"]) for s in seeds]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"mean": statistics.fmean(diffs), "se": se, "n": len(diffs), "diffs": diffs}


def difference_text(d: dict[str, Any] | None, missing: str = "") -> str:
    """A paired difference as ``+1.50 ± 0.50 (n=2)``; one seed has no standard error."""
    if d is None:
        return missing
    spread = f" ± {d['se']:.2f}" if d["n"] > 1 else ""
    return f"{d['mean']:+.2f}{spread} (n={d['n']})"


def aggregate(summaries: dict[str, dict], group_of: Callable[[str, dict], str]) -> dict[str, dict[str, Any]]:
    """Group runs (e.g. by method and sparsity, over seeds) into mean ± std rows."""
    groups: dict[str, list[dict]] = {}
    for run_id, s in summaries.items():
        groups.setdefault(group_of(run_id, s), []).append(s)
    rows = {}
    for key, items in groups.items():
        acc = mean_std([s["test_accuracy"] for s in items])
        rows[key] = {
            "method": items[0]["method"], "sparsity_target": items[0]["sparsity_target"],
            "sparsity_actual": statistics.fmean(s["sparsity_actual"] for s in items),
            "seeds": sorted(s["seed"] for s in items), "n": len(items),
            "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
            "test_accuracies": [s["test_accuracy"] for s in items],
            "train_flops_ratio": statistics.fmean(s["train_flops_ratio"] for s in items),
            "train_flops": statistics.fmean(s["train_flops"] for s in items),
            "wall_seconds_mean": statistics.fmean(s["wall_seconds"] for s in items),
            "epochs": items[0]["epochs"], "steps": items[0]["steps"],
        }
    return rows


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | sparsity (achieved) | last-epoch test accuracy, mean ± std | seeds | training FLOPs (× dense) "
             "| wall time per run |",
             "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['sparsity_actual']:.4f} | {100 * r['test_accuracy_mean']:.2f} ± "
                     f"{100 * r['test_accuracy_std']:.2f} % | {r['n']} | {r['train_flops_ratio']:.3f} | "
                     f"{r['wall_seconds_mean']:.0f} s |")
    return "\n".join(lines)


def hardware_of(summaries: dict[str, dict], env: dict[str, Any]) -> str:
    """Where the runs trained (a grid that spans sessions can span machines): processor, threads and torch of
    each run's own environment, with how many runs each; runs that kept none are counted as such, beside the
    machine writing the report (``env``)."""
    seen = Counter(f"{e['processor']}, {e.get('threads', '?')} thread(s), torch {e.get('torch', '?')}"
                   if e.get("processor") else None
                   for e in (s.get("environment") or {} for s in summaries.values()))
    unrecorded = seen.pop(None, 0)
    parts = [f"{key} ({n} run{'s' if n > 1 else ''})" for key, n in seen.most_common()]
    if unrecorded:
        parts.append(f"not recorded ({unrecorded} run{'s' if unrecorded > 1 else ''}; this report written on "
                     f"{env['processor']}, {env['threads']} threads, torch {env['torch']})")
    return "; ".join(parts)


def width_fraction(text: str) -> float:
    """argparse type of a width floor (``--min-width``): a fraction of every group's channels in [0, 1), refused in
    parsing, before any scoring or training starts."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a fraction of every group's channels in [0, 1), got {value:g}")
    return value


def write_results(grid: str, rows: dict[str, dict], summaries: dict[str, dict], setup: dict[str, Any],
                  command: str) -> str:
    """Write ``bench/results/<grid>.json`` and ``.md``; return the markdown."""
    env = environment()
    written_at = commit()
    total_wall = sum(s["wall_seconds"] for s in summaries.values())
    runs = {k: {f: v for f, v in s.items() if f not in ("layers", "config", "environment")}
            for k, s in summaries.items()}
    trained_at = sorted({(RESULTS / "runs" / grid / k / COMMIT).read_text().strip()
                         for k in summaries if (RESULTS / "runs" / grid / k / COMMIT).exists()}) or ["unknown"]
    write_json(RESULTS / f"{grid}.json", {"grid": grid, "command": command, "commit": written_at,
                                          "runs_trained_at": trained_at,
                                          "environment": env, "setup": setup, "total_wall_seconds": total_wall,
                                          "rows": rows, "runs": runs})
    md = "\n".join([
        f"# {grid}", "",
        f"Command: `{command}`  ",
        f"Runs trained at commit {', '.join(trained_at)}; tables written at {written_at}  ",
        f"Hardware: {hardware_of(summaries, env)}  ",
        "Setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()) + "  ",
        f"Total wall time of the grid: {total_wall / 60:.1f} min (sum over runs)", "",
        markdown_table(rows), "",
        "Accuracy is the test accuracy after the last epoch (not the best epoch). Training FLOPs follow "
        "3 × forward FLOPs of the network as it ran, relative to dense training of the same length.", ""])
    (RESULTS / f"{grid}.md").write_text(md)
    return md


@contextmanager
def figure(path: Path, ncols: int = 1, figsize: tuple[float, float] = (6, 4)) -> Iterator[Any]:
    """A matplotlib figure (headless) whose axes are yielded, then saved to ``path`` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")  # a legend beside the axes is kept, not cropped
    finally:
        plt.close(fig)


def style(ax, xlabel: str, ylabel: str | None = None, title: str | None = None, legend: str | None = "best") -> None:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend is None:  # one series, nothing to name
        return
    if legend == "outside":  # many series: beside the axes, where it cannot hide a point
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8, loc=legend)
