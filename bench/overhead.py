"""Overhead of masked training against dense training of the same model, side by side in one run.

    python bench/overhead.py            # ResNet-20, batch 128, 28×28×1 inputs
    python bench/overhead.py --quick    # fewer steps

1. Time per training step between mask updates: a dense model and the same model masked at 90 % (ERK, static
   mask, optimizer guard on), measured in alternating blocks so that machine noise hits both alike.
   Reported as the ratio of medians (goal: ≤ 1.10).
2. Share of wall time spent in mask updates: RigL with its default interval (100 steps), the time inside
   ``sp.step()`` against the whole training loop.
Writes bench/results/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from runner import RESULTS, commit

from regrow import masking, methods
from regrow.checkpoint import write_json
from regrow.models import create_model
from regrow.training import environment


def make(model_name: str, method: str | None, seed: int = 0, total_steps: int = 1000):
    torch.manual_seed(seed)
    model = create_model(model_name)
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
    start = time.perf_counter()
    sp.step()
    return time.perf_counter() - start


def time_block(model, optimizer, sp, batches) -> list[float]:
    times = []
    for x, y in batches:
        start = time.perf_counter()
        step(model, optimizer, sp, x, y)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    blocks, per_block, rigl_steps = (3, 5, 120) if args.quick else (8, 20, 600)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch_size,),
                                                                                  generator=g))
               for _ in range(per_block)]

    dense = make(args.model, None)
    masked = make(args.model, "static")
    for runner in (dense, masked):  # warm-up
        time_block(*runner, batches[:3])
    dense_times, masked_times = [], []
    for _ in range(blocks):
        dense_times += time_block(*dense, batches)
        masked_times += time_block(*masked, batches)
    dense_ms, masked_ms = 1e3 * statistics.median(dense_times), 1e3 * statistics.median(masked_times)

    model, optimizer, sp = make(args.model, "rigl", total_steps=rigl_steps * 4 // 3)
    update_seconds, total_start = 0.0, time.perf_counter()
    update_times = []
    for i in range(rigl_steps):
        x, y = batches[i % per_block]
        spent = step(model, optimizer, sp, x, y)
        update_seconds += spent
        if sp.is_update_step(sp.step_count):
            update_times.append(spent)
    total_seconds = time.perf_counter() - total_start
    assert len(update_times) == len(sp.history) > 0

    result = {
        "model": args.model, "batch_size": args.batch_size, "commit": commit(), "environment": environment(),
        "dense_step_ms_median": dense_ms, "masked_step_ms_median": masked_ms,
        "masked_over_dense": masked_ms / dense_ms,
        "steps_timed_each": len(dense_times),
        "rigl_steps": rigl_steps, "rigl_updates": len(update_times),
        "rigl_update_ms_mean": 1e3 * statistics.fmean(update_times),
        "mask_update_share_of_wall_time": update_seconds / total_seconds,
        "masked_layers": len(masking.masked_layers(masked[0])),
        "command": "python bench/overhead.py" + (" --quick" if args.quick else ""),
    }
    name = "overhead-quick" if args.quick else "overhead"
    write_json(RESULTS / f"{name}.json", result)
    env = result["environment"]
    md = "\n".join([
        f"# {name}", "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}; {env['processor']}, {env['threads']} threads, torch {env['torch']}  ",
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
