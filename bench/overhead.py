"""Overhead of masked training against dense training, and the speed of the trainer's options, side by side.

    python bench/overhead.py            # both parts: ResNet-20 masking overhead, then the speed options
    python bench/overhead.py --quick    # fewer steps
    python bench/overhead.py --part options --models mlp resnet8   # only the speed options, on these models

1. Time per training step between mask updates: a dense model and the same model masked at 90 % (ERK, static
   mask, optimizer guard on), measured in alternating blocks so that machine noise hits both alike.
   Reported as the ratio of medians (goal: ≤ 1.10).
2. Share of wall time spent in mask updates: RigL with its default interval (100 steps), the time inside
   ``sp.step()`` against the whole training loop.
3. Training-speed options of the trainer, each in its own process (the allocator setting is process-wide), the
   processes taking turns round by round, one thread each (as grid jobs run): glibc's allocator as it is against
   the steady allocator (freed memory kept in the process), NCHW against channels_last, eager against
   ``torch.compile``. A step is a whole trainer step on a masked model (90 % ERK, batch made and augmented,
   forward, backward, optimizer with the guard, ``sp.step()``). Reports the median step and minor page faults per
   step. The allocator changes no number (the same floating-point operations); channels_last and compile change
   the kernels, so the same masked network is trained for a few hundred steps each way and the losses compared.
Writes bench/results/overhead.{json,md} (parts 1-2) and overhead-options.{json,md} (part 3).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from runner import RESULTS, ROOT, commit, script_main

from regrow import masking, methods
from regrow.checkpoint import write_json
from regrow.env import resolve_device, synchronize
from regrow.models import create_model
from regrow.training import environment


def make(model_name: str, method: str | None, seed: int = 0, total_steps: int = 1000, device: str = "cpu"):
    torch.manual_seed(seed)
    model = create_model(model_name).to(device)  # before the optimizer and the sparsifier: they follow it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sp = None
    if method is not None:
        sp = methods.create(method, model, optimizer, sparsity=0.9, distribution="erk", total_steps=total_steps)
    return model, optimizer, sp


def step(model, optimizer, sp, x, y) -> float:
    """One training step; returns the seconds spent in ``sp.step()``."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if sp is None:
        return 0.0
    synchronize(x.device)  # on a GPU: the queued step's kernels are not the update's time
    start = time.perf_counter()
    sp.step()
    synchronize(x.device)
    return time.perf_counter() - start


def time_block(model, optimizer, sp, batches) -> list[float]:
    device = next(model.parameters()).device
    times = []
    for x, y in batches:
        synchronize(device)
        start = time.perf_counter()
        step(model, optimizer, sp, x, y)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def masking_overhead(args) -> None:
    blocks, per_block, rigl_steps = (3, 5, 120) if args.quick else (8, 20, 600)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device))
               for _ in range(per_block)]

    dense = make(args.model, None, device=args.device)
    masked = make(args.model, "static", device=args.device)
    for runner in (dense, masked):  # warm-up
        time_block(*runner, batches[:3])
    dense_times, masked_times = [], []
    for _ in range(blocks):
        dense_times += time_block(*dense, batches)
        masked_times += time_block(*masked, batches)
    dense_ms, masked_ms = 1e3 * statistics.median(dense_times), 1e3 * statistics.median(masked_times)

    model, optimizer, sp = make(args.model, "rigl", total_steps=rigl_steps * 4 // 3, device=args.device)
    synchronize(device)
    update_seconds, total_start = 0.0, time.perf_counter()
    update_times = []
    for i in range(rigl_steps):
        x, y = batches[i % per_block]
        synchronize(device)  # the update's time is its own, not the queued step's
        spent = step(model, optimizer, sp, x, y)
        update_seconds += spent
        if sp.is_update_step(sp.step_count):
            update_times.append(spent)
    synchronize(device)
    total_seconds = time.perf_counter() - total_start
    assert len(update_times) == len(sp.history) > 0

    result = {
        "model": args.model, "batch_size": args.batch_size, "commit": commit(), "environment": environment(device),
        "device": str(device),
        "dense_step_ms_median": dense_ms, "masked_step_ms_median": masked_ms,
        "masked_over_dense": masked_ms / dense_ms,
        "steps_timed_each": len(dense_times),
        "rigl_steps": rigl_steps, "rigl_updates": len(update_times),
        "rigl_update_ms_mean": 1e3 * statistics.fmean(update_times),
        "mask_update_share_of_wall_time": update_seconds / total_seconds,
        "masked_layers": len(masking.masked_layers(masked[0])),
        "command": "python bench/overhead.py" + (" --quick" if args.quick else "")
                   + (f" --device {args.device}" if device.type != "cpu" else ""),
    }
    name = ("overhead-quick" if args.quick else "overhead") + ("" if device.type == "cpu" else f"-{device.type}")
    write_json(RESULTS / f"{name}.json", result)
    env = result["environment"]
    md = "\n".join([
        f"# {name}", "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}; {env['processor']}, {env['threads']} threads, torch {env['torch']}"
        + (f"; on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "") + "  ",
        f"{args.model}, batch {args.batch_size}, 28×28×1 inputs, SGD Nesterov + weight decay.", "",
        "| measure | value |", "|---|---|",
        f"| dense training step (median of {len(dense_times)}) | {dense_ms:.1f} ms |",
        f"| masked training step, 90 % ERK, between updates (median of {len(masked_times)}) | {masked_ms:.1f} ms |",
        f"| ratio masked / dense | {result['masked_over_dense']:.3f} |",
        f"| RigL mask update (mean of {len(update_times)}) | {result['rigl_update_ms_mean']:.1f} ms |",
        f"| share of RigL wall time in mask updates (interval 100) | "
        f"{100 * result['mask_update_share_of_wall_time']:.2f} % |", ""])
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


# ----- part 3: the trainer's speed options ----------------------------------------------------------------------
OPTIONS = {  # label -> (steady allocator, channels_last, torch.compile, method)
    "glibc allocator, NCHW": (False, False, False, "static"),
    "steady allocator, NCHW": (True, False, False, "static"),
    "steady allocator, channels_last": (True, True, False, "static"),
    "steady allocator, channels_last, compile": (True, True, True, "static"),
    # a method whose masks and gradient capture change during training (RigL, an update every 100 steps)
    "RigL: steady allocator, channels_last": (True, True, False, "rigl"),
    "RigL: steady allocator, channels_last, compile": (True, True, True, "rigl"),
}


def option_worker(spec: dict) -> dict:
    """Train ``spec['steps']`` trainer steps of a masked model in this process with one option set; time them."""
    from regrow.training import TrainConfig, build_trainer

    torch.set_num_threads(1)
    config = TrainConfig(model=spec["model"], method=spec.get("method", "static"), sparsity=0.9, distribution="erk",
                         epochs=1, max_steps=spec["steps"], channels_last=spec["channels_last"], device="cpu",
                         compile=spec["compile"], progress=False, seed=0)
    trainer = build_trainer(config, "/dev/null/unused")  # train_step only: nothing is written
    started = time.perf_counter()
    losses, times, faults = [], [], []
    for step in range(spec["steps"]):
        before, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        loss, _ = trainer.train_step(step)
        times.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        losses.append(loss)
        if step == spec["warmup"] - 1:
            warm = time.perf_counter() - started
    from regrow.training import evaluate
    accuracy, _ = evaluate(trainer.model, trainer.test_data)
    timed = times[spec["warmup"]:]
    return {"step_ms": 1e3 * statistics.median(timed),
            "minor_faults_per_step": statistics.fmean(faults[spec["warmup"]:]), "warmup_seconds": warm,
            "test_accuracy": accuracy, "final_loss": statistics.fmean(losses[-20:]), "steps": spec["steps"],
            "timed_steps": len(timed)}


def speed_options(args) -> None:
    steps, warmup, rounds = (60, 10, 2) if args.quick else (args.steps, 20, args.rounds)
    results: dict[str, dict[str, list[dict]]] = {m: {label: [] for label in OPTIONS} for m in args.models}
    for r in range(rounds):
        for model in args.models:
            for label, (steady, channels_last, compiled, method) in OPTIONS.items():
                if compiled and r > 0 and not args.compile_every_round:
                    continue  # compiling costs ~40 s a process; one round of it is enough to see the speed
                spec = {"model": model, "steps": steps, "warmup": warmup, "channels_last": channels_last,
                        "compile": compiled, "method": method}
                env = {**os.environ, "REGROW_STEADY_ALLOCATOR": "1" if steady else "0", "OMP_NUM_THREADS": "1"}
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:  # recorded, not fatal: a failing option is a result too
                    error = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1][:300]
                    print(f"round {r + 1}/{rounds} {model:9s} {label:42s} FAILED: {error}", flush=True)
                    results[model][label].append({"failed": error})
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results[model][label].append(result)
                print(f"round {r + 1}/{rounds} {model:9s} {label:42s} {result['step_ms']:8.1f} ms/step "
                      f"{result['minor_faults_per_step']:9.0f} faults/step  acc {result['test_accuracy']:.4f}",
                      flush=True)
    rows = []
    for model, per in results.items():
        base = statistics.median(x["step_ms"] for x in per["glibc allocator, NCHW"] if "failed" not in x)
        for label, all_runs in per.items():
            runs = [x for x in all_runs if "failed" not in x]
            if not runs:
                rows.append({"model": model, "options": label, "failed": all_runs[0]["failed"]})
                continue
            ms = statistics.median(x["step_ms"] for x in runs)
            rows.append({"model": model, "options": label, "step_ms": ms, "speedup": base / ms,
                         "minor_faults_per_step": statistics.fmean(x["minor_faults_per_step"] for x in runs),
                         "test_accuracy": [x["test_accuracy"] for x in runs],
                         "final_loss": [x["final_loss"] for x in runs],
                         "warmup_seconds": statistics.fmean(x["warmup_seconds"] for x in runs),
                         "rounds": len(runs)})
    command = "python bench/overhead.py " + " ".join(args.argv)
    name = "overhead-options-quick" if args.quick else "overhead-options"
    env = environment()
    write_json(RESULTS / f"{name}.json", {"command": command, "commit": commit(), "environment": env,
                                          "steps": steps, "warmup": warmup, "rounds": rounds, "rows": rows})
    lines = [f"# {name}", "", f"Command: `{command}`  ",
             f"Commit: {commit()}; {env['processor']}, one thread per process, torch {env['torch']}  ",
             f"Each cell: a process training a 90 % ERK model (static mask unless RigL) for {steps} trainer steps "
             f"(batch 128, Fashion-MNIST, augmentation on); median of the steps after the first {warmup}, median over "
             f"{rounds} rounds taken in turn (compile: one round); test accuracy after those steps.", "",
             "| model | options | step | speed-up vs glibc/NCHW/eager | minor page faults / step | warm-up | "
             f"test accuracy after {steps} steps |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['model']} | {row['options']} | failed: `{row['failed']}` | | | | |")
            continue
        acc = ", ".join(f"{100 * a:.2f}" for a in row["test_accuracy"])
        lines.append(f"| {row['model']} | {row['options']} | {row['step_ms']:.1f} ms | {row['speedup']:.2f}× | "
                     f"{row['minor_faults_per_step']:.0f} | {row['warmup_seconds']:.1f} s | {acc} % |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="part 1-2: the model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--part", choices=["masking", "options", "all"], default="all")
    p.add_argument("--models", nargs="+", default=["mlp", "resnet8", "resnet20"], help="part 3: the models")
    p.add_argument("--steps", type=int, default=300, help="part 3: trainer steps per process")
    p.add_argument("--rounds", type=int, default=3, help="part 3: processes per option set, taken in turn")
    p.add_argument("--compile-every-round", action="store_true")
    p.add_argument("--device", default="cpu", help="part 1-2: cpu (default) or cuda (part 3's options are the "
                   "CPU's: allocator, one thread per process)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = str(resolve_device(args.device))
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.worker:
        print(json.dumps(option_worker(json.loads(args.worker))))
        return 0
    if args.part in ("masking", "all"):
        masking_overhead(args)
    if args.part in ("options", "all"):
        speed_options(args)
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main))
