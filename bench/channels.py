"""Channel pruning under a latency budget measured on this CPU: HALP, IEE from scratch, IEE from a pretrained
model, the controls that separate budget from method, and Torch-Pruning's magnitude pruner at the same MACs as an
outside reference.

    python bench/channels.py --model resnet20 --pretrain-epochs E --epochs E   # the converged protocol
    python bench/channels.py --quick       # smoke test: a few steps per run, MACs cost, separate results

Steps (each resumable: finished runs are skipped):
1. dense training, one model per seed, for E (``--pretrain-epochs``) and for 2E epochs: the plateau check (the
   two within 0.3 points says E is long enough); HALP, IEE-pretrained and Torch-Pruning start from the E-epoch
   model and their total training cost includes it. A dense model of E/2 epochs feeds the cost-matched HALP;
2. the latency table of the model (batch ``--latency-batch``, one thread), measured once, before step 1 trains
   anything, on the idle machine (it times the architecture, not its weights);
3. at every latency target (a fraction of the dense model's latency), ``--epochs`` each: HALP (prunings every
   ``--prune-every`` steps (40, or fewer where 30 would not leave half a run to fine-tune), 30 of them, then
   fine-tuning), IEE from scratch, IEE from the pretrained model;
   controls: IEE from scratch for 2E epochs (budget), HALP with its total cost matched to IEE's (dense E/2 +
   pruning and fine-tuning E/2), IEE from scratch and from the pretrained model with its budget ramped over the
   first ``--ramp-cycles`` cycles (the first cut, an open choice); with ``--investigate [LABEL ...]``, IEE's open
   choices at the tightest target (:data:`INVESTIGATE`: the paper's exploration and each half of it, exploration
   learning rate, H = J = Q, α, growth without exploration or within groups, the floor, IEE stopped after one or
   three cycles), all of them or the ones named; ``--min-width`` gives HALP and IEE a floor in every run;
   then HALP and IEE from scratch at equal measured latency: per seed, the slower of the two is trained again
   with its budget tightened by the measured gap (``-tightened`` runs), and a paired table compares them;
4. Torch-Pruning's MagnitudePruner (L1, per layer) on the pretrained model, the ratio searched so that its MACs
   match HALP's exported model at that target, then fine-tuned for ``--epochs`` with the same recipe;
5. every model is exported (masked channels removed) and timed against the dense model, interleaved, one
   thread, batch ``--latency-batch``, median of ``--repeats`` runs after warm-up; and at batch 1, 64 and 256
   under PyTorch and ONNX Runtime (``--deploy``). The table gives each run's measured latency as a fraction of
   dense, so that methods are compared at the latency they reached, not the one they were asked for;
6. Torch-Pruning's pruner taken to every method's mean exported MACs and timed the same way (speed only,
   untrained): each method's speed-up over Torch-Pruning's at equal MACs.

``--report-only`` writes the tables from the runs finished so far and the latencies already measured, training
and timing nothing (a grid running across sessions reports as its runs land).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from runner import (
    RESULTS,
    augment_suffix,
    augments,
    commit,
    difference_text,
    figure,
    mean_std,
    paired_difference,
    run_grid,
    run_in_pool,
    script_main,
    style,
    width_fraction,
)

from regrow import checkpoint
from regrow.data import batches_per_epoch, get_batch, load_dataset
from regrow.env import resolve_device, synchronize
from regrow.errors import ConfigError
from regrow.flops import forward_flops, layer_macs
from regrow.latency_report import deployment_latency, latency_report, paired_timing
from regrow.methods.base import option_steps
from regrow.methods.channel import CHANNEL_PAPER_CYCLE, HALP, ChannelIEE
from regrow.schedules import cosine_lr
from regrow.training import MODEL, SUMMARY, TrainConfig, environment, evaluate, load_model, method_defaults, run_length

TARGETS = (0.55, 0.30)
TRAIN_SIZE = 60_000  # Fashion-MNIST's training set
# IEE for channels, its open choices (``--investigate``, from scratch at the tightest target), against the grid's IEE
# (regrow's defaults but the first cut, which it takes straight to the budget: explored channels from zero consumer
# weights, Θ_K training on during exploration, α = 0.3):
# ``paper-cycle`` is the paper's exploration (remembered values, Θ_K frozen: the default before one-epoch pilots,
# 3 seeds, H = J = Q = 10, found the defaults 3.73 ± 0.46 points better on ResNet-20 and 3.05 ± 0.46 on
# MobileNetV2-small), ``remembered`` and ``frozen`` each half of it. Then the exploration's learning rate, the cycle
# length, α = 0.1 (the weights' default), and growth by the importance a channel had when last active
# (``explore=false``), alone and with the ramp; a pilot (ResNet-20, MACs at 0.3, one seed, the paper's cycle) ranked
# the last two first: straight cut 80.9 %, ramped 82.3 %, without exploration 83.3 %, both 86.0 %, HALP from random
# weights 86.3 %.
# ``one-cycle``: IEE stopped after its first cycle (``max_cycles=1``; the mask is fixed from then on), which
# separates what the later cycles add from the first cut: a single knapsack solve's widths (on a trained model's
# scores), trained from random weights with the mask fixed, beat every IEE run of that pilot (bench/channel_widths.py).
# ``min-width0.25``: every group kept at a quarter of its channels or more; with widths fixed from random-init scores
# it gained 5.30 ± 1.26 points on MobileNetV2-small and lost 1.29 ± 0.62 on ResNet-20 (bench/channel_widths.py).
# ``within-groups``: every cycle gives each group back the channels it pruned from it (``regrow=within_groups``: the
# widths of the first cut kept, channels swapped inside groups); in a MobileNetV2-small pilot (seed 0, the paper's
# cycle) 70.1 % against 69.5 % for the knapsack's re-allocation. ``three-cycles``: IEE stopped after three cycles.
# Both stop with ``max_cycles``, which keeps Ω_t's schedule to t_end: stopping by a shorter t_end shrinks the first
# cut too (Ω = 0.225 of the budget instead of 0.30 at one cycle), and on MobileNetV2-small that alone moved one-epoch
# runs from 74.00 to 78.12 % (+4.12 ± 0.34, 3 seeds).
HJQ = ("estimate_steps", "improve_steps", "explore_steps")
INVESTIGATE = {"paper-cycle": dict(CHANNEL_PAPER_CYCLE), "remembered": {"explore_from": "remembered"},
               "frozen": {"freeze_active": True}, "lr0.3": {"explore_lr_scale": 0.3}, "lr1": {"explore_lr_scale": 1.0},
               "hjq10": dict.fromkeys(HJQ, 10), "hjq25": dict.fromkeys(HJQ, 25),
               "no-explore": {"explore": False}, "no-explore-ramp": {"explore": False, "ramp_cycles": "ramp"},
               "hjq10-ramp": {**dict.fromkeys(HJQ, 10), "ramp_cycles": "ramp"}, "one-cycle": {"max_cycles": 1},
               "min-width0.25": {"min_width": 0.25}, "alpha0.1": {"alpha": 0.1},
               "within-groups": {"regrow": "within_groups"}, "three-cycles": {"max_cycles": 3}}
MATCH_TOLERANCE = 0.02  # measured latencies within 2 % (relative) count as equal: about the timing noise
LATENCY = "latency.json"
TP_SPEED = "tp-speed.json"  # Torch-Pruning's pruner timed at each method's MACs (tp_speed_at_macs)


def recipe(args, **fields) -> TrainConfig:
    return TrainConfig(model=args.model, epochs=1 if args.quick else args.epochs, device=args.device,
                       max_steps=args.quick_steps if args.quick else None, channels_last=args.channels_last,
                       augment=augments(args.model, args.augment), progress=sys.stderr.isatty() and args.jobs == 1,
                       **fields)


def channel_options(args) -> dict:
    floor = {"min_width": args.min_width} if args.min_width else {}  # HALP's and IEE's; Torch-Pruning has none
    return {"group_size": args.group_size, "prune_first": args.prune_first, **floor}


def grids(args) -> tuple[dict[str, TrainConfig], dict[str, TrainConfig]]:
    pre = {f"dense-seed{s}": recipe(args, method="dense", seed=s, sparsity=0.0) for s in range(args.seeds)}
    if not args.quick:
        for config in pre.values():
            config.epochs = args.pretrain_epochs
        for s in range(args.seeds):  # the plateau check, and the short pretraining of the cost-matched HALP
            pre[f"dense-2x-seed{s}"] = recipe(args, method="dense", seed=s, sparsity=0.0)
            pre[f"dense-2x-seed{s}"].epochs = 2 * args.pretrain_epochs
            pre[f"dense-half-seed{s}"] = recipe(args, method="dense", seed=s, sparsity=0.0)
            pre[f"dense-half-seed{s}"].epochs = max(1, args.pretrain_epochs // 2)
    cost = "macs" if args.quick else "latency"
    hjq = 5 if args.quick else 50
    # IEE's first cut straight to the budget, as the paper has it (and as the committed grids ran it, when that was
    # the default); the ramped first cut, regrow's default since, is the iee-ramp control beside it
    iee = {**dict.fromkeys(HJQ, hjq), "ramp_cycles": 0, **channel_options(args)}
    halp = {"prune_every": 1 if args.quick else halp_interval(args), "prune_steps": 10 if args.quick else 30,
            **channel_options(args)}
    main = {}
    for target in args.targets:
        for s in range(args.seeds):
            dense = str(RESULTS / "runs" / args.name / f"dense-seed{s}" / MODEL)
            common = {"structure": "channel", "latency_target": target, "cost": cost, "seed": s,
                      "latency_batch": args.latency_batch}
            main[f"halp-{target:g}-seed{s}"] = recipe(args, method="halp", init_from=dense, method_options=halp,
                                                     **common)
            main[f"iee-scratch-{target:g}-seed{s}"] = recipe(args, method="iee", method_options=iee, **common)
            main[f"iee-pretrained-{target:g}-seed{s}"] = recipe(args, method="iee", init_from=dense,
                                                               method_options=iee, **common)
            if args.quick:
                continue
            # controls: the budget (IEE trained twice as long), the cost (HALP at IEE's total), the first cut
            main[f"iee-scratch-2x-{target:g}-seed{s}"] = recipe(args, method="iee", method_options=iee, **common)
            main[f"iee-scratch-2x-{target:g}-seed{s}"].epochs = 2 * args.epochs
            half = str(RESULTS / "runs" / args.name / f"dense-half-seed{s}" / MODEL)
            main[f"halp-matched-{target:g}-seed{s}"] = recipe(args, method="halp", init_from=half,
                                                             method_options=halp, **common)
            main[f"halp-matched-{target:g}-seed{s}"].epochs = max(1, args.epochs // 2)
            main[f"iee-ramp-{target:g}-seed{s}"] = recipe(
                args, method="iee", method_options={**iee, "ramp_cycles": args.ramp_cycles}, **common)
            # from a trained model the straight first cut costs IEE most (a one-epoch pilot from one dense model,
            # H = J = Q = 10: 82.8 % straight, 88.6 % ramped over 10 cycles, HALP 90.2 %): the ramp there too
            main[f"iee-pretrained-ramp-{target:g}-seed{s}"] = recipe(
                args, method="iee", init_from=dense, method_options={**iee, "ramp_cycles": args.ramp_cycles},
                **common)
            if args.investigate is not None and target == min(args.targets):  # IEE's open choices, tightest
                defaults = method_defaults(ChannelIEE)
                for label, options in INVESTIGATE.items():
                    options = {**iee, **options}
                    if args.investigate and label not in args.investigate or {**defaults, **options} == {**defaults,
                                                                                                        **iee}:
                        continue  # not asked for, or the grid's own IEE already (min-width0.25 at --min-width 0.25)
                    if options.get("ramp_cycles") == "ramp":  # the control's ramp, over the same steps
                        options["ramp_cycles"] = args.ramp_cycles * iee["estimate_steps"] // options["estimate_steps"]
                    main[f"iee-scratch-{label}-{target:g}-seed{s}"] = recipe(
                        args, method="iee", method_options=options, **common)
    return pre, main


def check_cycles(runs: dict[str, TrainConfig]) -> None:
    """Every IEE run fits at least one cycle, and its ramp: checked before anything trains, since a short
    ``--epochs`` would otherwise stop the grid at its first such run, after the dense pretraining."""
    defaults = method_defaults(ChannelIEE)
    for run_id, config in runs.items():
        if config.method != "iee":
            continue
        options = {**defaults, **config.method_options}
        length = sum(options[k] for k in HJQ)
        cycles = option_steps(options["t_end"], run_length(config, TRAIN_SIZE)[1], "t_end") // length
        needed = max(1, options["ramp_cycles"] or 0)  # None: regrow's default ramp, shortened to the cycles that fit
        if cycles < needed:
            raise ConfigError(f"{run_id}: {cycles} IEE cycle(s) of H + J + Q = {length} steps fit in its "
                              f"{config.epochs} epoch(s), it needs {needed}"
                              + (" for its ramp (--ramp-cycles)" if needed > 1 else "") + "; train longer")


def halp_interval(args) -> int:
    """HALP's steps between prunings: the paper's 40 (``--prune-every``), shortened where its 30 prunings would
    take more than half of the shortest HALP run (the cost-matched one, E/2 epochs), so that fine-tuning keeps at
    least half of every run."""
    shortest = max(1, args.epochs // 2) * batches_per_epoch(TRAIN_SIZE, 128)
    return max(1, min(args.prune_every, shortest // (2 * 30)))


def grid_epochs(args, epochs: int) -> float:
    """Epochs the whole grid trains at E = ``epochs``, per the plan of :func:`grids`, plus what is planned
    later: Torch-Pruning's fine-tuning (E per target and seed) and, at most, one tightened run per target and
    seed (E)."""
    sized = argparse.Namespace(**{**vars(args), "epochs": epochs, "pretrain_epochs": epochs, "quick": False})
    pre, main = grids(sized)
    later = 2 * epochs * len(args.targets) * args.seeds
    return sum(c.epochs for c in {**pre, **main}.values()) + later


def step_seconds(args, steps: int = 10) -> float:
    """Median seconds of one training step (batch 128, one thread) of the model under HALP's channel masks while
    it gathers importance: masks train the full-width network, so every run of the grid pays about this."""
    from regrow.models import create_model

    model = create_model(args.model).to(args.device)
    x, y = torch.randn(128, 1, 28, 28, device=args.device), torch.randint(0, 10, (128,), device=args.device)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparsifier = HALP(model, optimizer, latency_target=0.5, cost="macs", input_shape=(1, 28, 28),
                      prune_every=10 * steps, prune_steps=1, **channel_options(args))  # no pruning while timed
    times = []
    with one_thread():
        for i in range(steps + 3):
            synchronize(x.device)
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sparsifier.step()
            synchronize(x.device)
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def one_thread():
    """Run the body on one thread, as every run and every timing of the grid does (a latency table is keyed by the
    thread count: a check made on two threads would measure and read another table than the runs')."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def plan(args, hours: float) -> int:
    """Size the grid from the measured step time: the largest E (dense pretraining and every run) that fits; and
    say which targets the model can reach (the grid refuses the others before anything trains)."""
    seconds = step_seconds(args)
    per_epoch = batches_per_epoch(TRAIN_SIZE, 128) * seconds
    fits = [e for e in range(1, 201) if grid_epochs(args, e) * per_epoch / args.jobs <= hours * 3600]
    print(f"{args.model}: {seconds:.3f} s a step (batch 128, one thread; run this on an idle machine), "
          f"{per_epoch / 60:.1f} min an epoch; the grid trains {grid_epochs(args, 1):.1f}·E epochs "
          f"({args.seeds} seeds, targets {', '.join(f'{t:g}' for t in args.targets)}"
          f"{investigated(args)}) on {args.jobs} job(s): "
          + (f"E = {fits[-1]} fits {hours:g} h ({grid_epochs(args, fits[-1]) * per_epoch / args.jobs / 3600:.1f} h)"
             if fits else f"not even E = 1 fits {hours:g} h "
                          f"({grid_epochs(args, 1) * per_epoch / args.jobs / 3600:.1f} h)"))
    cost = "macs" if args.quick else "latency"
    thinnest, floor = reach(args, cost)
    out_of_reach = [f"{t:g}" for t in args.targets if t < floor]
    print(f"reach by {cost}: one group of {args.group_size} per layer {thinnest:.3f} of dense"
          + (f", {args.min_width:g} of every group (--min-width) {floor:.3f}" if args.min_width else "")
          + (f"; target {', '.join(out_of_reach)} out of reach: the grid would refuse it" if out_of_reach else ""))
    return 0


def investigated(args) -> str:
    if args.investigate is None:
        return ""
    return ", --investigate " + (" ".join(args.investigate) if args.investigate else "(all)")


def halp_on_a_fresh_model(args, latency_target: float, cost: str, **options) -> HALP:
    """HALP on an untrained copy of the grid's model, on its device (a latency table is measured there), with the
    grid's channel options (``options`` override them): what a run builds when it starts, without training."""
    from regrow.models import create_model

    return HALP(create_model(args.model).to(args.device), None, latency_target=latency_target, cost=cost,
                latency_batch=args.latency_batch, input_shape=(1, 28, 28), **{**channel_options(args), **options})


LOOSEST = 0.99  # the target a HALP is built at only to read its cost model (targets lie in (0, 1))


def reach(args, cost: str) -> tuple[float, float]:
    """The least cost this model reaches, as a fraction of dense: its thinnest version (one group of G channels per
    layer) and, with the grid's floor (``--min-width``), the floor's widths. By a latency table this measures (one
    thread) only the cells of those widths and of dense, not the whole table, and keeps none of them: ``--plan``
    may run on a busy machine, and the grid's table must be timed on an idle one."""
    with one_thread():
        return reach_of(halp_on_a_fresh_model(args, LOOSEST, cost), args.group_size)


def reach_of(sp: HALP, group_size: int) -> tuple[float, float]:
    """:func:`reach` read off a built HALP (its cost model measures what it lacks)."""
    thinnest = sp.allocator.cost_of([min(group_size, g.size) for g in sp.groups]) / sp.dense_cost
    floor = sp.allocator.cost_of([sp.allocator.fewest(i) for i in range(len(sp.groups))]) / sp.dense_cost
    return thinnest, floor


def prebuild_latency_table(args) -> int:
    """Measure every cell HALP/IEE can ask for, once, single-threaded, before runs share the cores."""
    with one_thread():
        sp = halp_on_a_fresh_model(args, LOOSEST, "latency")
        cells = sp.precompute_costs(progress=sys.stderr.isatty())
        thinnest, _ = reach_of(sp, args.group_size)  # measured by now
    print(f"latency table: {cells} cells, {sp.cost_model.measurements} measured now; dense {sp.dense_cost:.2f} ms "
          f"at batch {args.latency_batch}; one group per layer reaches {thinnest:.3f} of dense", flush=True)
    return cells


def floors_out_of_reach(args, runs: dict[str, TrainConfig]) -> dict[str, str]:
    """Runs whose latency target is below what this model reaches with their width floor (``min_width``; without
    one, one group of G channels per layer): run id → the reason, found by the same check a run makes when it
    starts, before anything trains and before the latency table is built (the check measures only the cells of
    dense and of the floor's widths, on one thread, as the table and the runs are). On the MLP, a quarter of each
    hidden layer is 0.323 of dense: above 0.3."""
    reasons, verdicts = {}, {}
    for run_id, config in runs.items():
        floor = config.method_options.get("min_width", 0)
        if config.structure != "channel":
            continue
        key = (floor, config.latency_target, config.cost)
        if key not in verdicts:
            try:
                with one_thread():
                    halp_on_a_fresh_model(args, config.latency_target, config.cost, min_width=floor)
                verdicts[key] = None
            except ConfigError as error:
                verdicts[key] = str(error)
        if verdicts[key]:
            reasons[run_id] = verdicts[key]
    return reasons


def leave_out_floors(args, main_runs: dict[str, TrainConfig]) -> None:
    """Take the runs whose floor cannot reach their target out of ``main_runs``: an open choice left out, with
    a line, where ``--investigate`` asked for all of them; a refusal (exit 2, before anything trains) where the
    floor was asked for by name or for every run (``--min-width``), or where the target is below even the
    thinnest network."""
    out_of_reach = floors_out_of_reach(args, main_runs)
    # a floor other than the grid's own (--min-width) can only come from an open choice (min-width0.25)
    named = [r for r in out_of_reach
             if args.investigate or main_runs[r].method_options.get("min_width", 0) == args.min_width]
    if named:
        raise ConfigError(f"{named[0]}: {out_of_reach[named[0]]}")
    for run_id, reason in out_of_reach.items():
        print(f"{run_id}: left out, its floor cannot reach the target: {reason}", flush=True)
        del main_runs[run_id]


def tp_pruned(args, dense: torch.nn.Module, shape: tuple, target_macs: float) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's MagnitudePruner (L1, one ratio for every layer) on a copy of ``dense``, the ratio bisected
    so that the pruned model's MACs come down to ``target_macs``; returns the model and its MACs."""
    import torch_pruning as tp

    example = torch.zeros(1, *shape, device=next(dense.parameters()).device)

    def pruned_at(ratio: float):
        model = copy.deepcopy(dense)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]  # ResNet's fc, MLP's last
        # as regrow's prune_first: only a first conv is kept (an MLP has none, so its hidden units are all prunable)
        ignored = [classifier] + ([] if args.prune_first or not convs else [convs[0]])
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        return model, sum(layer_macs(model, shape).values())

    lo, hi = 0.0, 0.95  # bisection on the per-layer ratio: MACs fall as it grows
    for _ in range(14):
        mid = (lo + hi) / 2
        _, macs = pruned_at(mid)
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    return pruned_at(hi)


def timed_against_dense(args, dense: torch.nn.Module, model: torch.nn.Module, shape: tuple) -> dict:
    """:func:`paired_timing` of ``model`` (as ``pruned``) against ``dense`` on one thread, as every model here is
    timed, at batch ``--latency-batch`` on a seeded random input."""
    with one_thread():
        torch.manual_seed(0)
        x = torch.randn(args.latency_batch, *shape, device=args.device)
        return paired_timing({"dense": dense.eval(), "pruned": model.eval()}, x, repeats=args.repeats)


def tp_speed_at_macs(args, latencies: dict, time_missing: bool = True) -> dict[str, dict]:
    """Per method and target: Torch-Pruning's magnitude pruner taken to that method's mean exported MACs, and timed
    against the dense model like every export (paired, one thread, batch ``--latency-batch``), so that "at least
    as fast as Torch-Pruning at equal MACs" is checked for every method, not only HALP, whose MACs the fine-tuned
    reference matches. Speed only: widths do not change in fine-tuning, so the pruned model is timed untrained (from
    seed 0's dense model). Cached in the grid's folder (TP_SPEED), keyed by method, target and MACs; with
    ``time_missing`` false only what the cache holds."""
    path = RESULTS / "runs" / args.name / TP_SPEED
    cache = json.loads(path.read_text()) if path.exists() else {}
    dense_path = RESULTS / "runs" / args.name / "dense-seed0" / MODEL
    groups: dict[str, list[float]] = {}
    for run_id, latency in latencies.items():
        groups.setdefault(run_id.rsplit("-seed", 1)[0], []).append(latency["exported"]["macs"])
    out = {}
    for group, macs in groups.items():
        key = f"{group}@{statistics.fmean(macs):.0f}"
        if key not in cache and not time_missing:
            continue
        if key not in cache:
            dense, meta = load_model(dense_path)
            dense = dense.to(args.device).eval()
            shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
            model, reached = tp_pruned(args, dense, shape, statistics.fmean(macs))
            timed = timed_against_dense(args, dense, model, shape)
            cache[key] = {"group": group, "target_macs": statistics.fmean(macs), "macs": reached,
                          "speedup": timed["pruned"]["speedup"], "pass_speedups": timed["pruned"]["pass_speedups"]}
            checkpoint.write_json(path, cache)
        out[group] = cache[key]
    return out


def tp_finetune(args, seed: int, target_macs: float, out, threads: int | None = None) -> dict:
    """Torch-Pruning's magnitude pruner on the pretrained model at ``target_macs``, fine-tuned like the others; its
    summary without the timing, which :func:`tp_timing` adds once nothing trains (fine-tunings run side by side)."""
    if (out / SUMMARY).exists():
        return json.loads((out / SUMMARY).read_text())
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dense_path = RESULTS / "runs" / args.name / f"dense-seed{seed}" / MODEL
    dense, meta = load_model(dense_path)
    dense = dense.to(args.device)
    shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
    model, macs = tp_pruned(args, dense, shape, target_macs)
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    epochs = 1 if args.quick else args.epochs
    steps_per_epoch = batches_per_epoch(len(train), 128)
    total = min(epochs * steps_per_epoch, args.quick_steps) if args.quick else epochs * steps_per_epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step_flops = 3 * forward_flops(layer_macs(model, shape)) * 128
    start = time.perf_counter()
    for step in range(total):
        epoch, index = divmod(step, steps_per_epoch)
        x, y = get_batch(train, 128, seed, epoch, index, train_augment=augments(args.model, args.augment))
        x, y = x.to(args.device), y.to(args.device)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, 0.1)
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    wall = time.perf_counter() - start
    accuracy, _ = evaluate(model, test)
    pre = json.loads((dense_path.parent / SUMMARY).read_text())
    dense_step = 3 * forward_flops(layer_macs(dense, shape)) * 128
    summary = {"method": "torch-pruning-magnitude", "seed": seed, "test_accuracy": accuracy, "macs": macs,
               "target_macs": target_macs, "steps": total, "wall_seconds": wall, "train_flops": step_flops * total,
               "dense_train_flops": dense_step * total,
               "total_train_flops": pre["train_flops"] + step_flops * total}
    checkpoint.save(out / MODEL, {"model": {k: v.cpu() for k, v in model.state_dict().items()}},
                    {"kind": "tp-reference", **meta})
    checkpoint.write_json(out / SUMMARY, summary)
    return summary


def tp_timing(args, seed: int, out) -> dict:
    """Time a fine-tuned Torch-Pruning reference against the dense model (one thread, paired, as every model here)
    and add it to its summary. Its architecture is rebuilt by pruning the same dense model to the same MACs (the
    pruner and the bisection are deterministic), then its weights are loaded."""
    summary = json.loads((out / SUMMARY).read_text())
    if "latency" in summary:
        return summary
    dense, meta = load_model(RESULTS / "runs" / args.name / f"dense-seed{seed}" / MODEL)
    dense = dense.to(args.device).eval()
    shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
    model, _ = tp_pruned(args, dense, shape, summary["target_macs"])
    sections, _ = checkpoint.load(out / MODEL)
    model.load_state_dict(sections["model"])  # the shapes must match: the same pruning, or this refuses
    measured = timed_against_dense(args, dense, model, shape)
    summary["latency"] = {"dense_ms": measured["dense"]["ms"], "measured_ms": measured["pruned"]["ms"],
                          "speedup": measured["pruned"]["speedup"], "batch_size": args.latency_batch, "threads": 1,
                          "macs_dense": sum(layer_macs(dense, shape).values())}
    checkpoint.write_json(out / SUMMARY, summary)
    return summary


def measured_fraction(latency: dict) -> float:
    """The exported model's measured latency as a fraction of dense: the inverse of the paired speed-up (the
    median of within-pass ratios); a measurement cached before passes were kept has only the two medians."""
    if "pass_speedups" in latency:
        return 1 / latency["measured_speedup"]
    return latency["exported"]["measured_ms"] / latency["dense"]["measured_ms"]


def same_latency(a: float, b: float) -> bool:
    """Two measured fractions of dense latency count as the same within MATCH_TOLERANCE (relative)."""
    return max(a, b) <= min(a, b) * (1 + MATCH_TOLERANCE)


def total_cost(summary: dict) -> float:
    """A run's training FLOPs, its dense pretraining included where it started from one."""
    return summary.get("total_train_flops", summary["train_flops"])


def latency_matched_runs(args, main_runs: dict[str, TrainConfig], summaries: dict, latencies: dict) -> dict:
    """HALP and IEE from scratch at the same measured latency. HALP lands under its budget (its prunings only
    remove channels, and a measured table is a staircase), IEE fills its budget: per target and seed, the one
    that landed slower is trained again with its budget tightened by the measured gap, its predicted fraction ×
    (faster measured fraction / its own). One correction step: both price the same table, so the remaining gap
    is the table's error, which the report shows."""
    out = {}
    for target in args.targets:
        for s in range(args.seeds):
            ids = {m: f"{m}-{target:g}-seed{s}" for m in ("halp", "iee-scratch")}
            if any(i not in latencies for i in ids.values()):
                continue
            fraction = {m: measured_fraction(latencies[i]) for m, i in ids.items()}
            if same_latency(*fraction.values()):
                continue
            slow, fast = sorted(fraction, key=fraction.get, reverse=True)
            config = copy.deepcopy(main_runs[ids[slow]])
            config.latency_target = (summaries[ids[slow]]["channels"]["predicted_fraction"]
                                     * fraction[fast] / fraction[slow])
            out[f"{slow}-tightened-{target:g}-seed{s}"] = config
    return out


def claim_verdict(pair: dict) -> tuple[str, str]:
    """Whether the paper's claim holds at one target, read off :func:`equal_latency_pairs`' entry: IEE from scratch
    at least as accurate as HALP for at most half its cost, at the same measured latency. Where a seed's two
    models did not land together, the claim is still decided when the faster of them is also the more accurate
    (it wins at both ends); otherwise it is left undecided. Returns the matching note and the verdict."""
    unmatched = [x for x in pair["pairs"]
                 if not same_latency(x["halp"]["fraction"], x["iee-scratch"]["fraction"])]
    iee_ahead = pair["accuracy_difference"][0] >= 0
    if not unmatched:
        note = ""
    else:
        faster = {min(("halp", "iee-scratch"), key=lambda m: x[m]["fraction"]) for x in unmatched}
        note = (f" (not matched in {len(unmatched)} of {len(pair['pairs'])} seeds: "
                f"{' and '.join('HALP' if m == 'halp' else 'IEE' for m in sorted(faster))} faster)")
        winner = "iee-scratch" if iee_ahead else "halp"
        loser = "halp" if iee_ahead else "iee-scratch"
        if faster != {winner} or any(x[winner]["accuracy"] < x[loser]["accuracy"] for x in unmatched):
            return note, "undecided (not at the same latency)"
    if not iee_ahead:
        return note, "no" + (" (HALP faster and more accurate)" if unmatched else "")
    return note, "yes" if pair["cost_ratio"] <= 0.5 else "no (more than half the cost)"


def equal_latency_pairs(args, summaries: dict, latencies: dict) -> dict[str, dict]:
    """Per target: HALP against IEE from scratch at the same measured latency (the slower of each seed's pair
    replaced by its latency-matched run), paired over seeds, with both total training costs."""
    out = {}
    for target in args.targets:
        pairs = []
        for s in range(args.seeds):
            pair = {}
            for m in ("halp", "iee-scratch"):
                run_id = f"{m}-tightened-{target:g}-seed{s}"
                run_id = run_id if run_id in summaries else f"{m}-{target:g}-seed{s}"
                if run_id not in summaries or run_id not in latencies:
                    break
                pair[m] = {"run": run_id, "accuracy": summaries[run_id]["test_accuracy"],
                           "fraction": measured_fraction(latencies[run_id]),
                           "cost": total_cost(summaries[run_id])}
            else:
                pairs.append(pair)
        if not pairs:
            continue
        diffs = [100 * (p["iee-scratch"]["accuracy"] - p["halp"]["accuracy"]) for p in pairs]
        out[f"{target:g}"] = {
            "seeds": len(pairs), "pairs": pairs,
            "accuracy_difference": (statistics.fmean(diffs),
                                    statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")),
            "fraction": {m: statistics.fmean(p[m]["fraction"] for p in pairs) for m in ("halp", "iee-scratch")},
            "accuracy": {m: mean_std(p[m]["accuracy"] for p in pairs) for m in ("halp", "iee-scratch")},
            "cost_ratio": statistics.fmean(p["iee-scratch"]["cost"] / p["halp"]["cost"] for p in pairs)}
    return out


# The runs whose exports are also timed where users deploy (--deploy): the methods themselves, not the controls or
# the open choices, which are judged by their accuracy at the latency they reached (the timing at the latency batch).
# A deployment timing (batch 1, 64, 256, both backends) took 43 s for one ResNet-20 export on one thread: for
# every run of a grid, about 45 minutes more of an idle machine.
DEPLOYED = ("halp", "iee-scratch", "iee-pretrained", "halp-tightened", "iee-scratch-tightened")


def deployed(run_id: str) -> bool:
    return run_id.rsplit("-seed", 1)[0].rsplit("-", 1)[0] in DEPLOYED


def measure(args, run_id: str) -> dict:
    """Export the run's model and time it against the dense model (cached in the run folder)."""
    out = RESULTS / "runs" / args.name / run_id
    device = torch.device(args.device)
    if (out / LATENCY).exists():
        cached = json.loads((out / LATENCY).read_text())
        if cached["device"].split("|", 1)[0] == device.type:  # timed on another kind of device: time it again
            return cached
    model, meta = load_model(out / MODEL)
    result = latency_report(model, meta, batch_size=args.latency_batch, repeats=args.repeats, threads=1,
                            device=device)
    if args.deploy and deployed(run_id):  # where users deploy: other batch sizes, ONNX Runtime (CPU provider)
        result["deploy"] = deployment_latency(model, meta, batch_sizes=args.deploy, repeats=args.repeats, threads=1,
                                              onnx=device.type == "cpu", device=device)
    checkpoint.write_json(out / LATENCY, result)
    return result


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps per run (MACs cost), separate results")
    p.add_argument("--quick-steps", type=int, default=30)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every HALP / IEE / fine-tuning run (E)")
    p.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of the dense pretraining (E)")
    p.add_argument("--seeds", type=int, default=3, help="paired seeds (the protocol asks for at least 3)")
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prune-first", action="store_true", help="let the first conv's channels be pruned "
                   "(a model without convs, the MLP, has every hidden unit prunable either way)")
    p.add_argument("--prune-every", type=int, default=40, help="HALP: steps between its 30 prunings (the paper's "
                   "40; shortened where 30 of them would take more than half of the shortest HALP run)")
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30, help="timed runs per model (median reported)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format in training (the trainer's default; faster on CPU)")
    p.add_argument("--plan", type=float, default=None, metavar="HOURS",
                   help="print the largest E whose whole grid fits HOURS on --jobs cores, from this model's step "
                        "time measured now (one thread), and train nothing")
    p.add_argument("--ramp-cycles", type=int, default=5, help="IEE-ramp control: cycles over which the budget "
                   "ramps down along HALP's path (default 5)")
    p.add_argument("--deploy", type=int, nargs="*", default=[1, 64, 256],
                   help="batch sizes timed under PyTorch and ONNX Runtime too (none: skip)")
    p.add_argument("--investigate", nargs="*", default=None, metavar="LABEL",
                   help="IEE's open choices at the tightest target, all of them or the LABELs given: "
                        + ", ".join(INVESTIGATE))
    p.add_argument("--min-width", type=width_fraction, default=0.0, help="HALP's and IEE's floor: every channel group "
                   "keeps at least this fraction of its channels (min_width; default 0: one chunk of G)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every run trains, the latency "
                   "table is measured and the exported models are timed (one device for all, so that a budget and "
                   "the latency it is judged by are the same device's)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip in every run (default: for conv nets, not for the MLP, whose dense "
                        "training plateaus without it)")
    p.add_argument("--name", default=None)
    p.add_argument("--report-only", action="store_true", help="write the tables from the finished runs and the "
                   "latencies already measured; train and time nothing")
    args = p.parse_args(argv)
    args.device = str(resolve_device(args.device))
    if args.plan is not None and not args.plan > 0:
        p.error(f"--plan takes a positive number of hours, got {args.plan}")
    unknown_labels = sorted(set(args.investigate or ()) - set(INVESTIGATE))
    if unknown_labels:
        p.error(f"--investigate: no open choice {', '.join(unknown_labels)}; choose from {', '.join(INVESTIGATE)}")
    floor = f"-w{args.min_width:g}" if args.min_width else ""  # another floor is another grid, not a resume
    args.name = args.name or ("channels-quick" if args.quick else
                              f"channels-{args.model}-e{args.epochs}{floor}{augment_suffix(args.model, args.augment)}")
    if args.quick and args.deploy == [1, 64, 256]:
        args.deploy = [1, 8]  # a smoke test of the deployment timings, not a measurement
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.plan is not None:
        return plan(args, args.plan)
    pre, main_runs = grids(args)
    if args.report_only:
        return report_only(args, pre, main_runs, argv)
    check_cycles(main_runs)
    for run_id in pre:  # a grid from before the pretrained weights were kept in git trains them again
        out = RESULTS / "runs" / args.name / run_id
        if (out / SUMMARY).exists() and not (out / MODEL).exists():
            print(f"{run_id}: finished, but its model file is missing; training it again", flush=True)
            shutil.rmtree(out)
    leave_out_floors(args, main_runs)  # before the table's build (most of an hour on MobileNetV2), not after it
    if not args.quick:  # first, while the machine is idle: the table times the architecture, not its weights
        prebuild_latency_table(args)
    pre_summaries = run_grid(args.name, pre, jobs=args.jobs)
    summaries = run_grid(args.name, main_runs, jobs=args.jobs)
    latencies = {run_id: measure(args, run_id) for run_id in summaries}
    # what trains after the first timing, side by side: Torch-Pruning's fine-tunings at HALP's MACs, then the
    # latency-matched runs; then both are timed, once nothing trains
    references = {}
    tp_runs = {}
    for target in args.targets:
        halp_macs = [latencies[k]["exported"]["macs"] for k in latencies if k.startswith(f"halp-{target:g}-")]
        for s in range(args.seeds):
            run_id = f"tp-magnitude-{target:g}-seed{s}"
            out = RESULTS / "runs" / args.name / run_id
            tp_runs[run_id] = (tp_finetune, (args, s, statistics.fmean(halp_macs), out))
    run_in_pool(tp_runs, args.jobs, lambda run_id, s: print(f"{run_id}: accuracy {s['test_accuracy']:.4f}",
                                                            flush=True))
    matched = latency_matched_runs(args, main_runs, summaries, latencies)
    if matched:
        summaries.update(run_grid(args.name, matched, jobs=args.jobs))
        latencies.update({run_id: measure(args, run_id) for run_id in matched})
    for run_id, (_, (_, seed, _, out)) in tp_runs.items():
        references[run_id] = tp_timing(args, seed, out)
    tp_speed = {} if args.quick else tp_speed_at_macs(args, latencies)
    rows = table_rows(args, pre_summaries, summaries, latencies, references, tp_speed)
    pairs = equal_latency_pairs(args, summaries, latencies)
    write(args, rows, pairs, pre_summaries, summaries, latencies, references, argv)
    return 0


def report_only(args, pre: dict, main_runs: dict, argv) -> int:
    """The tables from what has finished: every run with a summary, the latencies already measured (the grid
    times its models only once every run has trained, on the idle machine), the Torch-Pruning references done.
    Trains and times nothing, so that a grid running across sessions can be reported as its runs land."""
    folder = RESULTS / "runs" / args.name

    def finished(run_ids) -> dict:
        return {r: json.loads((folder / r / SUMMARY).read_text()) for r in run_ids if (folder / r / SUMMARY).exists()}

    tightened = sorted(p.name for p in folder.glob("*-tightened-*")) if folder.exists() else []
    pre_summaries = finished(pre)
    summaries = finished([*main_runs, *tightened])
    if not pre_summaries:
        raise ConfigError(f"{args.name}: no finished dense run to report on yet")
    latencies = {r: json.loads((folder / r / LATENCY).read_text()) for r in summaries
                 if (folder / r / LATENCY).exists()}
    references = {r: s for r, s in finished(f"tp-magnitude-{t:g}-seed{i}" for t in args.targets
                                            for i in range(args.seeds)).items()}
    rows = table_rows(args, pre_summaries, summaries, latencies, references,
                      tp_speed_at_macs(args, latencies, time_missing=False))
    pairs = equal_latency_pairs(args, summaries, latencies)
    print(f"{args.name}: {len(pre_summaries)} of {len(pre)} dense runs, {len(summaries)} of {len(main_runs)} runs "
          f"(+ {len(tightened)} tightened), {len(latencies)} timed, {len(references)} Torch-Pruning references",
          file=sys.stderr)
    write(args, rows, pairs, pre_summaries, summaries, latencies, references, argv)
    return 0


def diff_text(d: dict | None) -> str:
    return difference_text(d, missing="-")


def fidelity(summaries: dict, latencies: dict) -> dict | None:
    """How well the latency table predicted the trained models' measured speed-ups: |predicted / measured − 1|
    over every HALP/IEE run timed (the target: within 10 %)."""
    errors = {k: abs((1 / summaries[k]["channels"]["predicted_fraction"]) / latencies[k]["measured_speedup"] - 1)
              for k in latencies if summaries.get(k, {}).get("channels", {}).get("predicted_fraction")}
    if not errors:
        return None
    worst = max(errors, key=errors.get)
    return {"runs": len(errors), "mean": statistics.fmean(errors.values()), "max": errors[worst], "worst": worst,
            "within_10": sum(e <= 0.10 for e in errors.values())}


def table_rows(args, pre, summaries, latencies, references, tp_speed: dict) -> dict:
    dense_epochs_flops = statistics.fmean(s["train_flops"] / s["epochs"] for s in pre.values())
    rows = {}
    dense_ms = _mean_of(lat["dense"]["measured_ms"] for lat in latencies.values())  # None: nothing timed yet
    for kind, label in (("dense", "dense (pretrained, E)"), ("dense-2x", "dense 2E (plateau check)"),
                        ("dense-half", "dense E/2 (HALP-matched start)")):
        runs = [v for k, v in pre.items() if k.startswith(f"{kind}-seed")]
        if runs:
            rows[label] = {"accuracy": mean_std(s["test_accuracy"] for s in runs), "measured_ms": dense_ms,
                           "measured_fraction": 1.0, "speedup": 1.0, "macs_reduction": 1.0,
                           "cost": statistics.fmean(s["train_flops"] for s in runs) / dense_epochs_flops,
                           "n": len(runs), "wall": statistics.fmean(s["wall_seconds"] for s in runs)}
    methods = list(dict.fromkeys(k.rsplit("-seed", 1)[0].rsplit("-", 1)[0] for k in summaries))
    for target in args.targets:
        for method in methods:
            keys = [k for k in summaries if k.startswith(f"{method}-{target:g}-seed")]
            if not keys:
                continue
            lat = [latencies[k] for k in keys if k in latencies]  # every one, once the grid has timed them
            rows[f"{method} @ {target:g}"] = {
                "accuracy": mean_std(summaries[k]["test_accuracy"] for k in keys),
                "measured_ms": _mean_of(x["exported"]["measured_ms"] for x in lat),
                "measured_fraction": _mean_of(measured_fraction(x) for x in lat),
                "predicted_fraction": statistics.fmean(summaries[k]["channels"]["predicted_fraction"] for k in keys),
                "readmitted": _mean_of(summaries[k]["mask_metrics"].get("readmitted_share") for k in keys),
                "deploy": _deploy_means(lat),
                "speedup": _mean_of(x["measured_speedup"] for x in lat),
                "macs_reduction": _mean_of(x["macs_reduction"] for x in lat),
                "timed": len(lat),
                "tp_speedup_same_macs": tp_speed.get(f"{method}-{target:g}", {}).get("speedup"),
                "cost": statistics.fmean(total_cost(summaries[k]) for k in keys) / dense_epochs_flops,
                "n": len(keys), "wall": statistics.fmean(summaries[k]["wall_seconds"] for k in keys)}
        keys = [k for k in references if k.startswith(f"tp-magnitude-{target:g}-")]
        if keys:
            refs = [references[k] for k in keys]
            timed = [r["latency"] for r in refs if "latency" in r]  # every one, once the grid has timed them
            rows[f"torch-pruning magnitude @ MACs of halp {target:g}"] = {
                "accuracy": mean_std(r["test_accuracy"] for r in refs),
                "measured_ms": _mean_of(t["measured_ms"] for t in timed),
                "speedup": _mean_of(t.get("speedup", t["dense_ms"] / t["measured_ms"]) for t in timed),
                "macs_reduction": _mean_of(t["macs_dense"] / r["macs"] for r in refs if (t := r.get("latency"))),
                "cost": statistics.fmean(r["total_train_flops"] for r in refs) / dense_epochs_flops,
                "n": len(refs), "timed": len(timed), "wall": statistics.fmean(r["wall_seconds"] for r in refs)}
    return rows


def _mean_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


# The controls' comparisons (a, b): a − b paired, per target; what each one separates
CONTROLS = (("iee-scratch", "halp", "the claim's comparison (before latency matching)"),
            ("iee-scratch", "halp-matched", "HALP at IEE's total cost (dense E/2 + E/2)"),
            ("iee-scratch-2x", "halp", "IEE given twice the epochs"),
            ("iee-scratch-2x", "iee-scratch", "what twice the epochs give IEE"),
            ("iee-pretrained", "halp", "the same start and budget as HALP"),
            ("iee-pretrained", "iee-scratch", "what the pretrained start gives IEE"),
            ("iee-ramp", "iee-scratch", "the ramped first cut, from scratch"),
            ("iee-pretrained-ramp", "iee-pretrained", "the ramped first cut, from the pretrained model"))


def control_lines(args, pre: dict, summaries: dict, latencies: dict) -> list[str]:
    """One row per target and control comparison that has runs on both sides."""
    dense_flops = statistics.fmean(s["train_flops"] / s["epochs"] for s in pre.values())
    out = []
    for target in args.targets:
        for a, b, what in CONTROLS:
            ga, gb = f"{a}-{target:g}", f"{b}-{target:g}"
            d = paired_difference(summaries, ga, gb)
            if d is None:
                continue

            def side(group: str, value) -> str:
                mean = _mean_of(value(k) for k in summaries if k.rsplit("-seed", 1)[0] == group)
                return "-" if mean is None else f"{mean:.3f}"

            fraction = " / ".join(side(g, lambda k: measured_fraction(latencies[k]) if k in latencies else None)
                                  for g in (ga, gb))
            cost = " / ".join(side(g, lambda k: total_cost(summaries[k]) / dense_flops) for g in (ga, gb))
            out.append(f"| {target:g} | {a} − {b}: {what} | {diff_text(d)} | {fraction} | {cost} |")
    return out


def investigate_lines(args, pre: dict, summaries: dict, latencies: dict) -> list[str]:
    """One table row per investigated open choice, paired against the grid's IEE from scratch at that target."""
    target = f"{min(args.targets):g}"
    base = f"iee-scratch-{target}"
    dense_flops = statistics.fmean(s["train_flops"] / s["epochs"] for s in pre.values())  # the cost unit
    out = []
    for label, options in INVESTIGATE.items():
        group = f"iee-scratch-{label}-{target}"
        keys = [k for k in summaries if k.rsplit("-seed", 1)[0] == group]
        if not keys:
            continue
        lat = [latencies[k] for k in keys if k in latencies]
        readmitted = _mean_of(summaries[k]["mask_metrics"].get("readmitted_share") for k in keys)
        measured = _mean_of(measured_fraction(x) for x in lat)
        text = ", ".join(f"{k}={v}" for k, v in options.items())
        accuracy = mean_std(summaries[k]["test_accuracy"] for k in keys)
        cost = statistics.fmean(total_cost(summaries[k]) for k in keys) / dense_flops
        out.append(f"| {label} | {text} | {100 * accuracy[0]:.2f} ± {100 * accuracy[1]:.2f} % | "
                   f"{diff_text(paired_difference(summaries, group, base))} | "
                   f"{'-' if measured is None else f'{measured:.3f}'} | "
                   f"{statistics.fmean(summaries[k]['channels']['predicted_fraction'] for k in keys):.3f} | "
                   f"{'-' if readmitted is None else f'{100 * readmitted:.0f} %'} | "
                   f"{cost:.2f} | {len(keys)} |")
    return out


def _deploy_means(latencies: list[dict]) -> dict[str, float]:
    """Mean speed-up per backend and batch size over the seeds (where measured)."""
    found: dict[str, list[float]] = {}
    for lat in latencies:
        for backend in ("pytorch", "onnxruntime"):
            for batch, row in lat.get("deploy", {}).get(backend, {}).items():
                found.setdefault(f"{backend} b{batch}", []).append(row["speedup"])
    return {k: statistics.fmean(v) for k, v in found.items()}


def write(args, rows, pairs, pre, summaries, latencies, references, argv) -> None:
    command = " ".join(["python bench/channels.py", *(argv if argv is not None else sys.argv[1:])])
    env = environment()
    lines = [f"# {args.name}", "", f"Command: `{command}`  ", f"Tables written at {commit()}  ",
             f"Hardware: {env['processor']}, torch {env['torch']}; latency: batch {args.latency_batch}, 1 thread, "
             f"median of {args.repeats} interleaved runs after warm-up (exported model vs dense)  ",
             f"Setup: {args.model}, Fashion-MNIST, "
             + (f"quick smoke test: {args.quick_steps} steps per run, MACs cost, " if args.quick else
                f"dense pretraining {args.pretrain_epochs} epochs, every other run {args.epochs} epochs, ")
             + f"SGD Nesterov, lr 0.1 cosine, wd 5e-4, batch 128, augmentation "
             f"{'random crop + flip' if augments(args.model, args.augment) else 'none'}, G = {args.group_size}, "
             f"first conv {'prunable' if args.prune_first else 'never pruned'}, HALP prunes every "
             + ("1 step 10 times, IEE H = J = Q = 5" if args.quick else
                f"{halp_interval(args)} steps 30 times, IEE H = J = Q = 50, IEE-ramp over {args.ramp_cycles} cycles")
             + f", seeds {args.seeds}", "",
             "| run | last-epoch accuracy | measured latency | measured fraction of dense | predicted fraction | "
             "speed-up (measured) | MACs reduction | speed-up / MACs reduction | speed-up / Torch-Pruning's at the "
             "same MACs | total training cost (dense epochs) | re-admitted | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def number(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def over_tp(r: dict) -> float | None:
        return r["speedup"] / r["tp_speedup_same_macs"] if r.get("speedup") and r.get("tp_speedup_same_macs") else None

    for key, r in rows.items():
        predicted = f"{r['predicted_fraction']:.3f}" if "predicted_fraction" in r else "-"
        readmitted = f"{100 * r['readmitted']:.0f} %" if r.get("readmitted") is not None else "-"
        ratio = r["speedup"] / r["macs_reduction"] if r.get("speedup") and r.get("macs_reduction") else None
        timed = "" if r.get("timed", r["n"]) == r["n"] or r.get("measured_ms") is None else f" ({r['timed']} timed)"
        lines.append(f"| {key} | {100 * r['accuracy'][0]:.2f} ± {100 * r['accuracy'][1]:.2f} % | "
                     f"{number(r.get('measured_ms'), '.2f')}{' ms' if r.get('measured_ms') else ''}{timed} | "
                     f"{number(r.get('measured_fraction'), '.3f')} | {predicted} | "
                     f"{number(r.get('speedup'), '.2f')}{'×' if r.get('speedup') else ''} | "
                     f"{number(r.get('macs_reduction'), '.2f')}{'×' if r.get('macs_reduction') else ''} | "
                     f"{number(ratio, '.2f')} | {number(over_tp(r), '.2f')} | {r['cost']:.2f} | {readmitted} | "
                     f"{r['n']} |")
    compared = {k: over_tp(r) for k, r in rows.items() if over_tp(r) is not None}
    if compared:
        slower = {k: v for k, v in compared.items() if v < 1}
        lines += ["", "Every method's exported model at least as fast as Torch-Pruning's magnitude pruner at the same "
                  "MACs (its model at each row's mean MACs, timed the same way): "
                  + ("yes, " if not slower else "no: " + ", ".join(f"{k} {v:.2f}" for k, v in slower.items()) + "; ")
                  + f"{len(compared) - len(slower)} of {len(compared)} rows at 1.00 or above."]
    plateau = paired_difference(pre, "dense-2x", "dense")
    if plateau:
        verdict = "plateaued" if abs(plateau["mean"]) <= 0.3 else "not plateaued: the criterion is within 0.3"
        lines += ["", f"Dense plateau check: dense at {2 * args.pretrain_epochs} epochs − dense at "
                  f"{args.pretrain_epochs} = {diff_text(plateau)} points ({verdict})."]
    control_rows = control_lines(args, pre, summaries, latencies)
    if control_rows:
        lines += ["", "What separates budget from method, paired over seeds (accuracy difference in points; each "
                  "side's measured fraction of dense latency where timed, and its total training cost in dense "
                  "epochs):", "",
                  "| target | comparison | difference | measured fraction | cost |", "|---|---|---|---|---|",
                  *control_rows]
    investigated_rows = investigate_lines(args, pre, summaries, latencies)
    if investigated_rows:
        lines += ["", f"IEE's open choices at {min(args.targets):g} of dense latency, from scratch, paired against "
                  "the grid's IEE (regrow's defaults with the straight first cut); measured fractions once the grid "
                  "has timed its models:", "",
                  "| variant | options | accuracy | − the grid's IEE | measured fraction | predicted fraction | "
                  "re-admitted | training cost (dense epochs) | seeds |", "|---|---|---|---|---|---|---|---|---|",
                  *investigated_rows]
    fit = None if args.quick else fidelity(summaries, latencies)  # a quick grid budgets MACs: no table to judge
    if fit:
        lines += ["", f"The latency table against the exported models: predicted speed-up (1 / predicted fraction) "
                  f"against measured, over the {fit['runs']} HALP/IEE models timed: mean error "
                  f"{100 * fit['mean']:.1f} %, largest {100 * fit['max']:.1f} % ({fit['worst']}); "
                  f"{fit['within_10']} of {fit['runs']} within 10 %."]
    if pairs:
        lines += ["", "HALP against IEE from scratch at equal measured latency (per seed, the slower of the two "
                  f"trained again with its budget tightened by the measured gap, `-tightened` runs; within "
                  f"{100 * MATCH_TOLERANCE:g} % counts as equal). The paper's claim: IEE at least as accurate for at "
                  "most half of HALP's total training FLOPs:", "",
                  "| target | measured fraction HALP / IEE | HALP | IEE from scratch | IEE − HALP (paired) | "
                  "training FLOPs IEE / HALP | claim holds | seeds |", "|---|---|---|---|---|---|---|---|"]
        for target, p in pairs.items():
            (hm, hs), (im, is_) = (p["accuracy"][m] for m in ("halp", "iee-scratch"))
            d, se = p["accuracy_difference"]
            matching, holds = claim_verdict(p)
            lines.append(f"| {target} | {p['fraction']['halp']:.3f} / {p['fraction']['iee-scratch']:.3f}"
                         f"{matching} | {100 * hm:.2f} ± {100 * hs:.2f} | "
                         f"{100 * im:.2f} ± {100 * is_:.2f} | {d:+.2f} ± {se:.2f} | {p['cost_ratio']:.2f} | {holds} | "
                         f"{p['seeds']} |")
    deployed = {k: r["deploy"] for k, r in rows.items() if r.get("deploy")}
    if deployed:
        columns = sorted({c for d in deployed.values() for c in d},
                         key=lambda c: (c.split()[0], int(c.split()[1][1:])))
        lines += ["", "Measured speed-up over dense where users deploy (one thread; mean over seeds):", "",
                  "| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for key, d in deployed.items():
            lines.append(f"| {key} | " + " | ".join(f"{d[c]:.2f}×" if c in d else "-" for c in columns) + " |")
    lines += ["", "Training cost counts 3 × forward FLOPs as the network ran (masked channels excluded; IEE's "
              "exploration dense), in units of one dense epoch, pretraining included where a run starts from the "
              "dense model. Compare methods at their measured fraction of dense latency (a method may land under "
              "its budget); re-admitted: the share of pruned channels grown back in the same cycle.", ""]
    md = "\n".join(lines)
    (RESULTS / f"{args.name}.md").write_text(md)
    checkpoint.write_json(RESULTS / f"{args.name}.json", {
        "grid": args.name, "command": command, "commit": commit(), "environment": env, "args": vars(args),
        "rows": {k: {**v, "accuracy": list(v["accuracy"])} for k, v in rows.items()},
        "runs": {k: {f: v for f, v in s.items() if f not in ("layers", "config", "environment")}
                 for k, s in {**pre, **summaries}.items()},
        "equal_latency": pairs, "latency": latencies, "references": references})
    print(md)
    with figure(RESULTS / f"{args.name}.png", figsize=(9, 5)) as ax:
        markers = {"halp-matched": "D", "halp": "s", "iee-scratch-2x": "P", "iee-scratch": "o", "iee-ramp": "v",
                   "iee-pretrained-ramp": "<", "iee-pretrained": "^", "torch-pruning": "x", "dense": "*"}
        method = {key: key.split(" @ ")[0].split(" (")[0] for key in rows}  # a row's method, without its target
        # > 10 methods: tab20's colours, then the same colours hollow (the MLP grid has 27 methods), so that no two
        # methods share both colour and fill (methods of one family share a marker)
        order = {m: i for i, m in enumerate(dict.fromkeys(method.values()))}
        colors = {m: matplotlib_tab20(i) for m, i in order.items()}
        labelled = set()
        for key, r in rows.items():
            # x: the paired fraction of dense, not milliseconds: dense's own time drifts between timing sessions;
            # Torch-Pruning's reference has only its paired speed-up, whose inverse is the same quantity
            x = r.get("measured_fraction") or (1 / r["speedup"] if r.get("speedup") else None)
            if x is None:  # not timed yet (a report of a grid still training)
                continue
            marker = next((m for prefix, m in markers.items() if method[key].startswith(prefix)), "o")
            ax.errorbar(x, 100 * r["accuracy"][0], yerr=100 * r["accuracy"][1], fmt=marker,
                        color=colors[method[key]], mfc="none" if order[method[key]] >= 20 else colors[method[key]],
                        capsize=3, label=None if method[key] in labelled else method[key])
            labelled.add(method[key])
            ax.annotate(f"{r['cost']:.1f}", (x, 100 * r["accuracy"][0]), fontsize=6,
                        textcoords="offset points", xytext=(4, 3))  # total training cost, dense epochs
        style(ax, f"measured latency / dense (batch {args.latency_batch}, 1 thread)", "last-epoch test accuracy (%)",
              f"{args.model} on Fashion-MNIST (labels: training cost, dense epochs)", legend="outside")


def matplotlib_tab20(index: int):
    """The index-th colour of matplotlib's 20-colour map, for plots with more methods than the default cycle."""
    from matplotlib import colormaps

    return colormaps["tab20"](index % 20)


if __name__ == "__main__":
    sys.exit(script_main(main))
