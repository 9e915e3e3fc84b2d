"""The benchmark scripts' own machinery: the post-training grid's plan and the worker pool's lifetime."""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from regrow.errors import ConfigError

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_pts(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # runner changes into the repository root; the fixture puts the cwd back
    monkeypatch.syspath_prepend(str(BENCH))
    import pts as bench_pts_module
    return bench_pts_module


def grid_args(**overrides):
    args = Namespace(generations=2, population=4, epochs=1, quick=False, name="pts-test", seeds=2,
                     sparsities=[0.5, 0.9], calibration_sizes=[64, 32], unipts_sparsities=[0.5, 0.9], ablations=True)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def methods_at(phase, sparsity):
    return sorted({method for method, s, *_ in phase.values() if s == sparsity})


def test_pts_plan_runs_unipts_only_where_asked_and_ablations_only_when_asked(bench_pts):
    main, ablations, variants, small = bench_pts.plan(grid_args())
    assert methods_at(main, 0.5) == methods_at(main, 0.9) == ["magnitude", "pot", "unipts", "wanda"]
    assert len(ablations) == 2 * len(bench_pts.ABLATIONS)

    main, ablations, variants, small = bench_pts.plan(grid_args(unipts_sparsities=[0.9], ablations=False))
    assert methods_at(main, 0.5) == methods_at(small, 0.5) == ["magnitude", "pot", "wanda"]
    assert methods_at(main, 0.9) == ["magnitude", "pot", "unipts", "wanda"]
    assert ablations == {}
    assert len(variants) == 2 * 2 * len(bench_pts.BN_VARIANTS)  # the baselines' BN variants still run

    _, ablations, _, _ = bench_pts.plan(grid_args(unipts_sparsities=[0.5]))
    assert ablations == {}  # the ablations reuse the 90 % UniPTS runs, which this grid does not make


def test_pts_rejects_unipts_sparsities_outside_the_grid_before_doing_anything(bench_pts, capsys):
    with pytest.raises(SystemExit):
        bench_pts.main(["--sparsities", "0.5", "0.9", "--unipts-sparsities", "0.8"])
    assert "--unipts-sparsities [0.8] must be among --sparsities [0.5, 0.9]" in capsys.readouterr().err


@pytest.fixture
def bench_unstructured(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(BENCH))
    import unstructured as module
    return module


def unstructured_args(**overrides):
    args = Namespace(quick=False, model="mlp", epochs=30, seeds=3, hjq=50, interval=33, jobs=2, device="cpu",
                     only=None, grid_name="unstructured-test", augment=None, investigate=False)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_unstructured_grid_is_paired_and_in_the_long_regime(bench_unstructured, monkeypatch):
    module = bench_unstructured
    monkeypatch.setattr(module, "read_summary", lambda args, run_id: None)  # nothing finished yet
    runs = module.grid(unstructured_args())
    groups = {module.group(k, None) for k in runs}
    for g in groups:  # every group has every seed: paired comparisons
        assert {f"{g}-seed{s}" for s in range(3)} <= set(runs)
    steps = 30 * 469
    iee = runs[f"{module.default_iee()}-0.95-seed0"]
    hjq = iee.method_options["estimate_steps"]
    assert (0.75 * steps) // (3 * hjq) >= 50  # at least 50 IEE cycles
    assert runs["rigl-0.95-seed1"].method_options["interval"] == 33  # the paper's 4.5 RigL updates per cycle
    assert runs["dense-2x-seed2"].epochs == 60
    assert not runs["dense-seed0"].augment and module.grid(unstructured_args(model="resnet8"))["dense-seed0"].augment
    assert all(f"{m}-{s:g}" in groups for m in ("static", "set", "rigl") for s in module.SPARSITIES)
    assert not any(k.startswith("rigl-eqflops") for k in runs)  # planned only from finished runs
    only = module.grid(unstructured_args(only=["rigl-0.95-*"]))
    assert sorted(only) == [f"rigl-0.95-seed{s}" for s in range(3)]
    conv = module.grid(unstructured_args(model="resnet8", investigate=True, only=["iee-zero-bn-*"]))
    assert sorted(conv) == [f"iee-zero-bn-0.95-seed{s}" for s in range(3)]  # BatchNorm: conv nets only
    assert conv["iee-zero-bn-0.95-seed0"].method_options["freeze_bn"] is False
    both = module.grid(unstructured_args(model="resnet8", investigate=True, only=["iee-zero-no-freeze-0*"]))
    assert sorted(both) == sorted(f"iee-zero-no-freeze-{p}-seed{s}" for s in range(3) for p in ("0.9", "0.95", "0.98"))
    options = both["iee-zero-no-freeze-0.95-seed0"].method_options
    assert options["never_active"] == "zero" and options["freeze_active"] is False
    alpha = module.grid(unstructured_args(model="resnet8", investigate=True, only=["iee-zero-alpha0.1-*"]))
    assert sorted(alpha) == [f"iee-zero-alpha0.1-0.95-seed{s}" for s in range(3)]
    assert alpha["iee-zero-alpha0.1-0.95-seed2"].method_options["alpha"] == 0.1
    assert not module.grid(unstructured_args(investigate=True, only=["iee-zero-bn-*"]))
    mlp = module.grid(unstructured_args(investigate=True, only=["iee-zero-no-freeze-*", "iee-zero-alpha0.1-*"]))
    assert len(mlp) == 21 and mlp["iee-zero-no-freeze-0.98-seed1"].method_options["freeze_active"] is False
    both_changes = mlp["iee-zero-no-freeze-alpha0.1-0.95-seed0"].method_options
    assert both_changes["freeze_active"] is False and both_changes["alpha"] == 0.1
    assert sorted(k for k in mlp if "-alpha" in k and "freeze" not in k) == [f"iee-zero-alpha0.1-0.95-seed{s}"
                                                                              for s in range(3)]
    planned = set(module.grid(unstructured_args(model="resnet8", investigate=True)))
    follow_ups = planned - set(module.grid(unstructured_args(model="resnet8")))
    groups = {run.rsplit("-seed", 1)[0] for run in follow_ups}  # the MLP's own follow-ups are not the conv net's
    assert groups == {"iee-zero-bn-0.95", "iee-zero-alpha0.1-0.95", "iee-init-scale0.1-0.95", "iee-init-scale0.3-0.95",
                      *(f"iee-zero-{v}-{p}" for v in ("no-freeze", "lr0.1") for p in ("0.9", "0.95", "0.98"))
                      } - {"iee-zero-lr0.1-0.95"}  # in the grid's open choices; the defaults are main runs
    mlp_plan = set(module.grid(unstructured_args(investigate=True)))
    assert {"iee-hjq100-0.95-seed0", "iee-init-lr0.3-0.98-seed0", "iee-momentum-zero-0.95-seed2"} <= mlp_plan
    for model in ("mlp", "resnet8"):  # the shrunk initial values: every net, at 95 %
        scaled = module.grid(unstructured_args(model=model, investigate=True, only=["iee-init-scale*"]))
        assert sorted(scaled) == [f"iee-init-scale{f}-0.95-seed{s}" for f in ("0.1", "0.3") for s in range(3)]
        options = scaled["iee-init-scale0.3-0.95-seed1"].method_options
        assert options["never_active"] == "init" and options["never_active_scale"] == 0.3


def test_unstructured_grid_keeps_its_own_iee_when_the_defaults_change(bench_unstructured, monkeypatch):
    """Finished runs keep their meaning: the grid's IEE, its open choices and ablations stay on the paper's cycle
    (pinned, whatever regrow's defaults are), regrow's defaults join at every sparsity under their own pinned id,
    and the report's IEE is regrow's default."""
    module = bench_unstructured
    monkeypatch.setattr(module, "read_summary", lambda args, run_id: None)
    runs = module.grid(unstructured_args())
    assert module.default_iee() == "iee-zero-no-freeze-alpha0.1" and module.grid_iee() == "iee-init-lr0.1"
    for sparsity in module.SPARSITIES:
        grid_own = runs[f"iee-init-lr0.1-{sparsity:g}-seed2"].method_options
        assert grid_own["never_active"] == "init" and grid_own["freeze_active"] is True and grid_own["alpha"] == 0.3
        default = runs[f"iee-zero-no-freeze-alpha0.1-{sparsity:g}-seed2"].method_options
        assert {k: default[k] for k in module.DEFAULT_IEE} == module.DEFAULT_IEE
    for run in ("iee-no-explore-0.95-seed0", "iee-zero-lr0.1-0.95-seed1", "iee-init-lr1-0.95-seed0"):
        assert runs[run].method_options["freeze_active"] is True and runs[run].method_options["alpha"] == 0.3, run
    assert runs["iee-no-freeze-0.95-seed0"].method_options["freeze_active"] is False
    assert module.priority("iee-zero-no-freeze-alpha0.1-0.98-seed1") == (0, 1)  # a main run


def test_unstructured_pinned_default_iee_is_regrows_default(bench_unstructured):
    """The grid names regrow's IEE defaults by a pinned id; when a default changes, this fails (give the new
    defaults their own id) instead of the grid relabelling finished runs."""
    from regrow import methods
    from regrow.methods.iee import IEE
    defaults = methods.method_options(IEE)
    assert {k: defaults[k] for k in bench_unstructured.DEFAULT_IEE} == bench_unstructured.DEFAULT_IEE


def test_unstructured_equal_flops_epochs_come_from_the_finished_runs(bench_unstructured, monkeypatch):
    module = bench_unstructured
    finished = {f"{module.grid_iee()}-0.95-seed0": {"train_flops": 6.0},
                "rigl-0.95-seed0": {"train_flops": 1.0}}
    monkeypatch.setattr(module, "read_summary", lambda args, run_id: finished.get(run_id))
    runs = module.grid(unstructured_args())
    assert [runs[f"rigl-eqflops-0.95-seed{s}"].epochs for s in range(3)] == [180] * 3
    assert "rigl-eqflops-0.9-seed0" not in runs


def test_unstructured_report_counts_dead_units_only_from_runs_that_record_them(bench_unstructured):
    def run(dead_outputs, dead_inputs):
        return {"method": "rigl", "layers": [{"shape": [16, 8, 3, 3], "dead_outputs": dead_outputs,
                                              "dead_inputs": dead_inputs},
                           {"shape": [10, 16], "dead_outputs": 0, "dead_inputs": 1}]}
    summaries = {"rigl-0.98-seed0": run(4, 2), "rigl-0.98-seed1": run(6, 4),
                 "set-0.98-seed0": {"method": "set", "layers": [{"shape": [16, 8, 3, 3]}]},  # older: no count
                 "dense-seed0": {"method": "dense", "layers": [{"shape": [16, 8, 3, 3], "dead_outputs": 0,
                                                               "dead_inputs": 0}]}}  # no masks: not listed
    lines = bench_unstructured.dead_unit_lines(summaries)
    assert "| rigl-0.98 | 2 | 5.0 (of 26) | 4.0 |" in lines
    assert not any(line.startswith(("| set-0.98", "| dense")) for line in lines)
    assert bench_unstructured.dead_unit_lines({"set-0.98-seed0": summaries["set-0.98-seed0"]}) == []


def test_unstructured_report_sets_training_loss_of_the_last_epoch_against_test_loss(bench_unstructured, monkeypatch,
                                                                                      tmp_path):
    monkeypatch.setattr(bench_unstructured, "RESULTS", tmp_path)
    args = unstructured_args()
    logs = {"rigl-0.95-seed0": [(0, 0.9), (1, 0.3), (1, 0.5), (1, None)],  # None: an interval all exploration
            "rigl-0.95-seed1": [(0, 0.8), (1, 0.2)]}
    for run_id, records in logs.items():
        folder = tmp_path / "runs" / "unstructured-test" / run_id
        folder.mkdir(parents=True)
        lines = [json.dumps({"step": i, "epoch": e, "loss": loss}) for i, (e, loss) in enumerate(records)]
        lines.append(json.dumps({"step": 99, "epoch": 1, "test_accuracy": 0.9, "test_loss": 0.5}))
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert bench_unstructured.last_epoch_train_loss(args, "rigl-0.95-seed0") == pytest.approx(0.4)
    assert bench_unstructured.last_epoch_train_loss(args, "rigl-0.95-seed9") is None
    summaries = {"rigl-0.95-seed0": {"seed": 0, "test_loss": 0.45}, "rigl-0.95-seed1": {"seed": 1, "test_loss": 0.35},
                 "set-0.95-seed0": {"seed": 0, "test_loss": 0.5}}  # no metrics: left out
    lines = bench_unstructured.fit_lines({"rigl-0.95": {}, "set-0.95": {}}, summaries, args)
    assert "| rigl-0.95 | 0.3000 | 0.4000 | +0.1000 | 2 |" in lines
    assert not any(line.startswith("| set-0.95") for line in lines)
    assert bench_unstructured.fit_lines({"set-0.95": {}}, summaries, args) == []


def test_unstructured_paired_differences_show_a_standard_error_only_from_two_seeds(bench_unstructured):
    summaries = {f"{m}-0.95-seed{s}": {"seed": s, "test_accuracy": acc}
                 for m, s, acc in (("a", 0, 0.90), ("a", 1, 0.91), ("b", 0, 0.89), ("b", 1, 0.89), ("c", 0, 0.88))}
    two = bench_unstructured.paired_difference(summaries, "a-0.95", "b-0.95")
    assert bench_unstructured.diff_cell(two) == "+1.50 ± 0.50 (n=2)"
    one = bench_unstructured.paired_difference(summaries, "c-0.95", "b-0.95")
    assert bench_unstructured.diff_cell(one) == "-1.00 (n=1)"
    assert bench_unstructured.diff_cell(None) == ""


@pytest.mark.parametrize("layer, shape", [
    (torch.nn.Linear(6, 4), (3, 6)),
    (torch.nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 9)),
    (torch.nn.Conv2d(4, 8, 3, stride=2, groups=2), (2, 4, 9, 9)),
    (torch.nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect"), (1, 2, 5, 5, 5))])
def test_explored_share_computes_a_layers_output_as_the_layer_does(monkeypatch, layer, shape):
    monkeypatch.syspath_prepend(str(BENCH))
    import explored_share

    x = torch.randn(shape)
    with torch.no_grad():
        layer.bias.zero_()  # the split leaves the bias out
        assert torch.allclose(explored_share.layer_output(layer, x, layer.weight), layer(x), atol=1e-6)


def test_explored_share_splits_each_layer_into_what_active_and_explored_units_compute(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import explored_share

    from regrow.cli import main as regrow_main
    from regrow.errors import RegrowError

    def train(name, *extra):
        out = tmp_path / name
        assert regrow_main(["train", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "16", "--max-steps",
                            "12", "--no-progress", "--device", "cpu", "--out", str(out),
                            *extra]) == 0
        return out

    iee = ["--method", "iee", "--sparsity", "0.9",
           "--opt", "estimate_steps=2", "--opt", "improve_steps=2", "--opt", "explore_steps=2"]
    init = explored_share.measure(train("init", *iee, "--opt", "never_active=init"), batches=2, batch_size=16,
                                  data_dir=None)
    zero = explored_share.measure(train("zero", *iee, "--opt", "never_active=zero"), 2, 16, None)
    assert init["masked_sparsity"] == pytest.approx(0.9, abs=0.02) and init["samples"] == 32
    for result in (init, zero):
        for layer in result["layers"]:
            if layer["density"] < 1:  # a layer the allocation keeps dense explores nothing
                assert layer["explored_over_active"] > 0
    # never-active units at their initial values add far more to the exploring network than units explored from 0
    first = init["layers"][0]
    assert first["mean_abs_inactive"] > 5 * zero["layers"][0]["mean_abs_inactive"]
    assert first["explored_over_active"] > zero["layers"][0]["explored_over_active"]
    with pytest.raises(RegrowError, match="no masked layer"):
        explored_share.measure(train("dense", "--method", "dense"), 1, 16, None)


@pytest.fixture
def bench_channels(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(BENCH))
    import channels as module
    import runner
    # results under the test's folder, whichever test imported runner first (its import moves to the repository)
    for holder in (module, runner):
        monkeypatch.setattr(holder, "RESULTS", tmp_path / "bench" / "results")
    return module


def test_channels_reads_a_measured_fraction_from_the_paired_speedup_when_the_passes_are_kept(bench_channels):
    # passes kept: 1 / the median of within-pass ratios, not the ratio of the two pooled medians (0.4 here)
    paired = {"dense": {"measured_ms": 20.0}, "exported": {"measured_ms": 8.0}, "measured_speedup": 2.0,
              "pass_speedups": [1.9, 2.0, 2.6]}
    assert bench_channels.measured_fraction(paired) == 0.5
    # a latency.json cached before passes were kept: the ratio of its two medians
    assert bench_channels.measured_fraction({"dense": {"measured_ms": 20.0}, "exported": {"measured_ms": 8.0}}) == 0.4


def test_channels_tightens_the_slower_of_halp_and_iee_to_the_faster_ones_measured_latency(bench_channels):
    module = bench_channels
    args = Namespace(targets=[0.3], seeds=2)
    main = {k: module.TrainConfig(model="resnet20", method=k.split("-0.3")[0].split("-")[0], latency_target=0.3)
            for k in ("halp-0.3-seed0", "iee-scratch-0.3-seed0", "halp-0.3-seed1", "iee-scratch-0.3-seed1")}

    def landed(predicted, accuracy, cost):
        return {"channels": {"predicted_fraction": predicted}, "test_accuracy": accuracy, "train_flops": cost,
                "total_train_flops": cost}

    def timed(fraction):
        return {"dense": {"measured_ms": 20.0}, "exported": {"measured_ms": 20.0 * fraction}}

    # seed 0: HALP lands well under the budget (0.25 measured against IEE's 0.30); seed 1: within the tolerance
    summaries = {"halp-0.3-seed0": landed(0.26, 0.90, 4.0), "iee-scratch-0.3-seed0": landed(0.30, 0.89, 1.0),
                 "halp-0.3-seed1": landed(0.29, 0.91, 4.0), "iee-scratch-0.3-seed1": landed(0.30, 0.90, 1.0)}
    latencies = {"halp-0.3-seed0": timed(0.25), "iee-scratch-0.3-seed0": timed(0.30),
                 "halp-0.3-seed1": timed(0.300), "iee-scratch-0.3-seed1": timed(0.303)}
    planned = module.latency_matched_runs(args, main, summaries, latencies)
    assert list(planned) == ["iee-scratch-tightened-0.3-seed0"]
    assert planned["iee-scratch-tightened-0.3-seed0"].latency_target == pytest.approx(0.30 * 0.25 / 0.30)
    assert main["iee-scratch-0.3-seed0"].latency_target == 0.3  # the original run's recipe is left alone

    summaries["iee-scratch-tightened-0.3-seed0"] = landed(0.25, 0.88, 1.0)
    latencies["iee-scratch-tightened-0.3-seed0"] = timed(0.251)
    pairs = module.equal_latency_pairs(args, summaries, latencies)["0.3"]
    assert [p["iee-scratch"]["run"] for p in pairs["pairs"]] == ["iee-scratch-tightened-0.3-seed0",
                                                                 "iee-scratch-0.3-seed1"]
    assert pairs["accuracy_difference"][0] == pytest.approx(((0.88 - 0.90) + (0.90 - 0.91)) / 2 * 100)
    assert pairs["cost_ratio"] == pytest.approx(0.25)
    assert module.latency_matched_runs(args, main, summaries, latencies) == planned  # resumable: the same plan


def test_channels_grid_leaves_out_or_refuses_a_width_floor_that_cannot_reach_its_target(bench_channels):
    module = bench_channels
    # the MLP with a quarter of each hidden layer (groups of 4) keeps 0.233 of dense MACs: 0.2 out of reach, 0.3 not
    args = module.parse(["--model", "mlp", "--quick", "--targets", "0.2", "--investigate"])

    def iee(target, **options):
        return module.recipe(args, method="iee", structure="channel", latency_target=target, cost="macs", seed=0,
                             method_options=options)

    runs = {"iee-scratch-min-width0.25-0.2-seed0": iee(0.2, min_width=0.25),
            "iee-scratch-min-width0.25-0.3-seed0": iee(0.3, min_width=0.25),
            "iee-scratch-one-cycle-0.2-seed0": iee(0.2, max_cycles=1)}
    module.leave_out_floors(args, runs)  # every open choice asked for: the one out of reach is left out
    assert list(runs) == ["iee-scratch-min-width0.25-0.3-seed0", "iee-scratch-one-cycle-0.2-seed0"]
    args.investigate = ["min-width0.25"]  # asked for by name: refused before anything trains
    runs["iee-scratch-min-width0.25-0.2-seed0"] = iee(0.2, min_width=0.25)
    with pytest.raises(ConfigError, match="iee-scratch-min-width0.25-0.2-seed0: latency_target=0.2 .* 0.233 of dense"):
        module.leave_out_floors(args, runs)
    args.investigate, args.min_width = None, 0.25  # a floor for every run (--min-width): refused too
    with pytest.raises(ConfigError, match="below what this model reaches with 0.25 of every group"):
        module.leave_out_floors(args, {"halp-0.2-seed0": module.recipe(
            args, method="halp", structure="channel", latency_target=0.2, cost="macs", seed=0,
            method_options={"min_width": 0.25})})
    args.min_width = 0.0  # no floor: a target below the thinnest network (one group of 4 per layer, 0.012) too
    thin = {"halp-0.01-seed0": module.recipe(args, method="halp", structure="channel", latency_target=0.01,
                                             cost="macs", seed=0, method_options={})}
    with pytest.raises(ConfigError, match="halp-0.01-seed0: .* one group of 4 channels per layer .* 0.012 of dense"):
        module.leave_out_floors(args, thin)
    thin["halp-0.01-seed0"].latency_target = 0.02
    module.leave_out_floors(args, thin)
    assert list(thin) == ["halp-0.01-seed0"]


def test_channels_plan_says_which_targets_the_model_reaches(bench_channels, capsys):
    args = bench_channels.parse(["--model", "mlp", "--quick", "--targets", "0.3", "0.2", "--min-width", "0.25"])
    assert bench_channels.plan(args, 1.0) == 0
    reach = capsys.readouterr().out.splitlines()[-1]
    assert reach == ("reach by macs: one group of 4 per layer 0.012 of dense, 0.25 of every group (--min-width) "
                     "0.233; target 0.2 out of reach: the grid would refuse it")


def test_channels_claim_verdict_decides_unmatched_pairs_only_when_the_faster_is_the_more_accurate(bench_channels):
    module = bench_channels

    def entry(*seeds, cost_ratio=0.3):  # seeds: (HALP fraction, HALP accuracy, IEE fraction, IEE accuracy)
        pairs = [{"halp": {"fraction": hf, "accuracy": ha}, "iee-scratch": {"fraction": i_f, "accuracy": ia}}
                 for hf, ha, i_f, ia in seeds]
        difference = sum(100 * (p["iee-scratch"]["accuracy"] - p["halp"]["accuracy"]) for p in pairs) / len(pairs)
        return {"pairs": pairs, "accuracy_difference": (difference, 0.0), "cost_ratio": cost_ratio}

    assert module.claim_verdict(entry((0.30, 0.90, 0.301, 0.91))) == ("", "yes")
    assert module.claim_verdict(entry((0.30, 0.90, 0.301, 0.91), cost_ratio=0.6)) == (
        "", "no (more than half the cost)")
    assert module.claim_verdict(entry((0.30, 0.91, 0.301, 0.90))) == ("", "no")
    # HALP landed faster and is more accurate: the claim fails whatever the latency gap
    note, verdict = module.claim_verdict(entry((0.25, 0.91, 0.30, 0.90), (0.30, 0.91, 0.301, 0.90)))
    assert note == " (not matched in 1 of 2 seeds: HALP faster)"
    assert verdict == "no (HALP faster and more accurate)"
    # IEE ahead only where it is the slower one: not at the same latency, so not decided either way
    note, verdict = module.claim_verdict(entry((0.25, 0.90, 0.30, 0.91)))
    assert verdict == "undecided (not at the same latency)"
    # IEE faster and more accurate: holds
    assert module.claim_verdict(entry((0.30, 0.90, 0.25, 0.91)))[1] == "yes"
    # HALP behind on average but ahead in the unmatched seed where it was faster: undecided
    note, verdict = module.claim_verdict(entry((0.25, 0.90, 0.30, 0.89), (0.30, 0.85, 0.301, 0.90)))
    assert verdict == "undecided (not at the same latency)"


def test_channels_report_only_tabulates_what_has_landed_and_trains_nothing(bench_channels):
    module = bench_channels
    argv = ["--model", "resnet8", "--seeds", "2", "--targets", "0.3", "--investigate", "one-cycle", "--report-only"]
    with pytest.raises(ConfigError, match="no finished dense run"):
        module.main(argv)
    folder = module.RESULTS / "runs" / "channels-resnet8-e3"

    def land(run_id, accuracy, epochs=3, predicted=None, readmitted=None, timed=None):
        (folder / run_id).mkdir(parents=True)
        summary = {"test_accuracy": accuracy, "train_flops": 10.0 * epochs, "epochs": epochs, "wall_seconds": 1.0,
                   "mask_metrics": {"readmitted_share": readmitted}}
        if predicted is not None:
            summary["channels"] = {"predicted_fraction": predicted}
        (folder / run_id / module.SUMMARY).write_text(json.dumps(summary))
        if timed is not None:  # measured speed-up 1 / fraction, MACs cut 5x
            (folder / run_id / module.LATENCY).write_text(json.dumps(
                {"dense": {"measured_ms": 20.0}, "exported": {"measured_ms": 20.0 * timed, "macs": 1000.0},
                 "measured_speedup": 1 / timed, "pass_speedups": [1 / timed], "macs_reduction": 5.0}))

    land("dense-seed0", 0.90), land("dense-seed1", 0.92)
    land("dense-2x-seed0", 0.91, epochs=6), land("dense-2x-seed1", 0.935, epochs=6)
    land("iee-scratch-0.3-seed0", 0.85, predicted=0.30, readmitted=0.2, timed=0.33)
    land("iee-scratch-0.3-seed1", 0.86, predicted=0.30, readmitted=0.4, timed=0.30)
    land("iee-scratch-one-cycle-0.3-seed0", 0.87, predicted=0.30)  # landed, not timed yet
    land("iee-scratch-one-cycle-0.3-seed1", 0.89, predicted=0.30)
    land("halp-0.3-seed0", 0.88, predicted=0.26)  # seed 1 still training
    land("halp-matched-0.3-seed0", 0.80, predicted=0.27)
    # Torch-Pruning timed at IEE's MACs earlier: 4x against IEE's 3.18x (the mean of 1/0.33 and 1/0.30)
    (folder / module.TP_SPEED).write_text(json.dumps({"iee-scratch-0.3@1000": {"speedup": 4.0}}))
    assert module.main(argv) == 0
    md = (module.RESULTS / "channels-resnet8-e3.md").read_text()
    assert not (folder / "halp-0.3-seed1").exists() and not (folder / "tp-magnitude-0.3-seed0").exists()
    # the plateau check, paired: (0.91 − 0.90, 0.935 − 0.92) → +1.25 ± 0.25
    assert "dense at 6 epochs − dense at 3 = +1.25 ± 0.25 (n=2) points (not plateaued" in md
    # the open choice paired against the grid's IEE: (0.87 − 0.85, 0.89 − 0.86) → +2.50 ± 0.50; not timed yet
    row = next(line for line in md.splitlines() if line.startswith("| one-cycle |"))
    assert "| 88.00 ± 1.41 % | +2.50 ± 0.50 (n=2) | - | 0.300 |" in row and row.endswith("| 2 |")
    halp = next(line for line in md.splitlines() if line.startswith("| halp @ 0.3 |"))
    assert "| 88.00 ± 0.00 % | - | - | 0.260 | - | - | - |" in halp  # trained, not timed: no latency invented
    iee = next(line for line in md.splitlines() if line.startswith("| iee-scratch @ 0.3 |"))
    assert "| 0.315 | 0.300 |" in iee and "| 30 % |" in iee  # mean measured fraction, mean re-admission
    assert "| 3.18× | 5.00× | 0.64 | 0.80 |" in iee  # over the 5x MACs cut, and over Torch-Pruning's at its MACs
    assert "Torch-Pruning's magnitude pruner at the same MACs" in md and "no: iee-scratch @ 0.3 0.80; 0 of 1" in md
    # the controls, paired where both sides have the seed: IEE from scratch against HALP at its cost, seed 0 only
    assert ("| 0.3 | iee-scratch − halp-matched: HALP at IEE's total cost (dense E/2 + E/2) | +5.00 (n=1) | "
            "0.315 / - | 3.000 / 3.000 |") in md
    # the table's fidelity over the timed models: |0.33/0.30 − 1| = 10 % and 0
    assert "over the 2 HALP/IEE models timed: mean error 5.0 %, largest 10.0 % (iee-scratch-0.3-seed0)" in md


def save_dense_resnet8(module, folder):
    """A seeded ResNet-8 saved as the grid's dense-seed0 model, as the channel grid's pretraining leaves it."""
    from regrow import checkpoint
    from regrow.models import create_model

    torch.manual_seed(0)
    dense = create_model("resnet8")
    meta = {"kind": "model", "model": "resnet8", "dataset": "fashion-mnist", "in_channels": 1, "num_classes": 10,
            "input_size": 28, "input_shape": [1, 28, 28], "method": "dense"}
    checkpoint.save(folder / "dense-seed0" / module.MODEL, {"model": dense.state_dict()}, meta)
    return dense


def test_channels_times_torch_pruning_at_each_methods_macs_once(bench_channels, monkeypatch):
    module = bench_channels
    args = module.parse(["--model", "resnet8", "--seeds", "1", "--targets", "0.3", "--repeats", "2",
                         "--latency-batch", "2", "--prune-first"])
    folder = module.RESULTS / "runs" / args.name
    dense = save_dense_resnet8(module, folder)
    dense_macs = sum(module.layer_macs(dense, (1, 28, 28)).values())
    latencies = {f"iee-scratch-0.3-seed{s}": {"exported": {"macs": dense_macs * f}} for s, f in ((0, 0.3), (1, 0.4))}
    timed = module.tp_speed_at_macs(args, latencies)
    entry = timed["iee-scratch-0.3"]
    assert entry["target_macs"] == pytest.approx(0.35 * dense_macs)  # the mean over the group's seeds
    assert 0.9 * entry["target_macs"] <= entry["macs"] <= entry["target_macs"]  # pruned to it, not past it by much
    assert entry["speedup"] > 0 and len(entry["pass_speedups"]) == 3
    monkeypatch.setattr(module, "paired_timing", lambda *a, **k: pytest.fail("timed again"))
    assert module.tp_speed_at_macs(args, latencies) == timed  # cached in the grid's folder
    assert module.tp_speed_at_macs(args, {"halp-0.3-seed0": {"exported": {"macs": dense_macs / 2}}},
                                   time_missing=False) == {}  # a report times nothing


def test_channels_times_torch_prunings_fine_tuned_reference_with_the_weights_it_trained(bench_channels, monkeypatch):
    # tp_finetune trains side by side and saves only weights; tp_timing later rebuilds the architecture by pruning
    # the same dense model again and must time exactly the model that was fine-tuned, not a fresh pruning of it
    module = bench_channels
    from regrow import checkpoint
    from regrow.data import load_dataset

    args = module.parse(["--model", "resnet8", "--seeds", "1", "--targets", "0.3", "--repeats", "2",
                         "--latency-batch", "2", "--prune-first", "--quick", "--quick-steps", "2"])
    folder = module.RESULTS / "runs" / args.name
    dense = save_dense_resnet8(module, folder)
    checkpoint.write_json(folder / "dense-seed0" / module.SUMMARY, {"train_flops": 1.0})
    monkeypatch.setattr(module, "load_dataset",
                        lambda name, split: load_dataset("synthetic", split, synthetic_size=256))
    dense_macs = sum(module.layer_macs(dense, (1, 28, 28)).values())
    out = folder / "torch-pruning-0.3-seed0"
    trained = module.tp_finetune(args, 0, 0.4 * dense_macs, out)
    assert trained["steps"] == 2 and "latency" not in trained  # timed later, once nothing trains
    assert trained["macs"] <= 0.4 * dense_macs
    saved = checkpoint.load(out / module.MODEL)[0]["model"]
    fresh, _ = module.tp_pruned(args, dense, (1, 28, 28), 0.4 * dense_macs)
    assert any(not torch.equal(saved[k], v) for k, v in fresh.state_dict().items())  # fine-tuning moved weights

    timed_models = []

    def fake_timing(models, x, repeats):
        timed_models.append(models["pruned"])
        return {"dense": {"ms": 2.0}, "pruned": {"ms": 1.0, "speedup": 2.0, "pass_speedups": [2.0, 2.0, 2.0]}}

    monkeypatch.setattr(module, "paired_timing", fake_timing)
    summary = module.tp_timing(args, 0, out)
    (model,) = timed_models
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # the fine-tuned weights
    assert sum(module.layer_macs(model, (1, 28, 28)).values()) == trained["macs"]
    assert summary["latency"]["speedup"] == 2.0
    assert json.loads((out / module.SUMMARY).read_text())["latency"]["speedup"] == 2.0
    assert module.tp_timing(args, 0, out) == summary and len(timed_models) == 1  # timed once


def test_channels_times_the_methods_where_users_deploy_and_not_every_control(bench_channels):
    module = bench_channels
    run_ids = [*module.grids(module.parse(["--seeds", "1", "--model", "resnet8", "--investigate"]))[1],
               "halp-tightened-0.3-seed0", "iee-scratch-tightened-0.55-seed0"]
    timed = sorted(r for r in run_ids if module.deployed(r))
    assert timed == sorted(["halp-0.55-seed0", "halp-0.3-seed0", "iee-scratch-0.55-seed0", "iee-scratch-0.3-seed0",
                            "iee-pretrained-0.55-seed0", "iee-pretrained-0.3-seed0", "halp-tightened-0.3-seed0",
                            "iee-scratch-tightened-0.55-seed0"])


def test_channels_augments_conv_nets_and_not_the_mlp_unless_asked_and_names_the_exception(bench_channels):
    module = bench_channels

    def grid(*argv):
        args = module.parse(["--seeds", "1", "--targets", "0.3", "--epochs", "2", *argv])
        pre, main = module.grids(args)
        flags = {c.augment for c in [*pre.values(), *main.values()]}
        assert len(flags) == 1  # every run of a grid alike, the dense pretraining included
        return args.name, flags.pop()

    assert grid("--model", "resnet20") == ("channels-resnet20-e2", True)
    assert grid("--model", "mobilenetv2-small") == ("channels-mobilenetv2-small-e2", True)
    assert grid("--model", "mlp") == ("channels-mlp-e2", False)  # the MLP's dense training plateaus without it
    assert grid("--model", "mlp", "--augment") == ("channels-mlp-e2-aug", True)  # another grid, not a resume
    assert grid("--model", "resnet20", "--no-augment") == ("channels-resnet20-e2-noaug", False)


def test_channels_grid_size_counts_every_run_the_protocol_trains(bench_channels):
    module = bench_channels
    args = module.parse(["--seeds", "1", "--targets", "0.3", "--model", "resnet8"])
    # dense E + 2E + E/2; HALP E, IEE E, IEE-pretrained E, IEE 2E, HALP cost-matched E/2, IEE ramped from scratch
    # and from the pretrained model E each; later: Torch-Pruning's fine-tuning E and at most one tightened run E
    assert module.grid_epochs(args, 4) == (4 + 8 + 2) + (4 + 4 + 4 + 8 + 2 + 4 + 4) + (4 + 4)
    investigate = module.parse(["--seeds", "1", "--targets", "0.3", "--model", "resnet8", "--investigate"])
    assert module.grid_epochs(investigate, 4) == module.grid_epochs(args, 4) + 4 * len(module.INVESTIGATE)
    assert module.grid_epochs(module.parse(["--seeds", "3", "--model", "resnet8"]), 4) == 6 * module.grid_epochs(
        args, 4) - 3 * (4 + 8 + 2)  # the dense models are per seed, not per target
    module.check_cycles(module.grids(investigate)[1])  # E = 3: 1055 steps before t_end, 7 cycles of 150, 35 of 30
    # the one-cycle control stops IEE after its first cycle, Ω_t on the full run's schedule (t_end untouched)
    one_cycle = module.grids(investigate)[1]["iee-scratch-one-cycle-0.3-seed0"].method_options
    assert one_cycle["max_cycles"] == 1 and "t_end" not in one_cycle
    short = module.parse(["--seeds", "1", "--targets", "0.3", "--model", "resnet8", "--epochs", "1"])
    with pytest.raises(ConfigError, match=r"iee-ramp-0.3-seed0: 2 IEE cycle\(s\) of H \+ J \+ Q = 150 steps .* "
                                          r"needs 5 for its ramp"):
        module.check_cycles(module.grids(short)[1])  # 352 steps before t_end: 2 cycles, the ramp wants 5
    straight = module.grids(short)[1]["iee-scratch-0.3-seed0"]
    assert straight.method_options["ramp_cycles"] == 0  # the grid's IEE: the paper's straight cut, as measured
    default = dataclasses.replace(straight, method_options={k: v for k, v in straight.method_options.items()
                                                            if k != "ramp_cycles"})
    module.check_cycles({"iee-default": default})  # regrow's default ramp shortens to the 2 cycles that fit
    assert module.halp_interval(module.parse(["--epochs", "20"])) == 40  # the paper's interval where it fits
    assert module.halp_interval(module.parse(["--epochs", "2"])) == 469 // 60
    with pytest.raises(SystemExit) as refused:  # a plan for no time at all: one line, exit 2
        module.parse(["--plan", "0"])
    assert refused.value.code == 2


def test_channels_grid_investigates_the_open_choices_asked_for_under_the_floor_asked_for(bench_channels):
    module = bench_channels
    base = ["--seeds", "1", "--targets", "0.3", "--model", "resnet8"]
    every = {k for k in module.grids(module.parse(base + ["--investigate"]))[1] if "-scratch-" in k}
    two = module.grids(module.parse(base + ["--investigate", "one-cycle", "alpha0.1"]))[1]
    assert {k for k in two if k.startswith("iee-scratch-") and k not in module.grids(module.parse(base))[1]} == {
        "iee-scratch-one-cycle-0.3-seed0", "iee-scratch-alpha0.1-0.3-seed0"}
    assert len(every) > len(module.INVESTIGATE)
    floored = module.parse(base + ["--min-width", "0.25", "--investigate", "min-width0.25", "alpha0.1"])
    assert floored.name == "channels-resnet8-e3-w0.25"  # another floor is another grid
    runs = module.grids(floored)[1]
    assert runs["halp-0.3-seed0"].method_options["min_width"] == 0.25
    assert runs["iee-scratch-alpha0.1-0.3-seed0"].method_options["min_width"] == 0.25
    assert "iee-scratch-min-width0.25-0.3-seed0" not in runs  # the grid's own IEE already
    assert "min_width" not in module.grids(module.parse(base))[1]["halp-0.3-seed0"].method_options
    # the paper's exploration against the grid's IEE at regrow's defaults; a label that resolves to the defaults
    # (Θ_K frozen where it is already) is not trained twice
    paper = module.grids(module.parse(base + ["--investigate", "paper-cycle", "frozen"]))[1]
    assert paper["iee-scratch-paper-cycle-0.3-seed0"].method_options["explore_from"] == "remembered"
    assert paper["iee-scratch-frozen-0.3-seed0"].method_options["freeze_active"] is True
    assert "explore_from" not in paper["iee-scratch-0.3-seed0"].method_options
    module.INVESTIGATE["thawed"] = {"freeze_active": False}
    try:
        assert "iee-scratch-thawed-0.3-seed0" not in module.grids(module.parse(base + ["--investigate"]))[1]
    finally:
        del module.INVESTIGATE["thawed"]
    for bad in (["--investigate", "one-cycle", "lr7"], ["--min-width", "1"], ["--min-width", "-0.1"]):
        with pytest.raises(SystemExit) as refused:  # before anything trains: one line, exit 2
            module.parse(base + bad)
        assert refused.value.code == 2


WORKER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {bench!r})
import runner

def wait(pid_file, threads):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
    return {{}}

if __name__ == "__main__":
    runner.run_in_pool({{"a": (wait, ({pid_file!r},))}}, 2, lambda k, s: None)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_pool_workers_stop_when_the_grid_process_is_killed(tmp_path):
    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "grid.py"
    script.write_text(WORKER_SCRIPT.format(bench=str(BENCH), pid_file=str(pid_file)))
    grid = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        os.kill(grid.pid, signal.SIGKILL)
        grid.wait()
        deadline = time.monotonic() + 20
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the grid's process"
            time.sleep(0.1)
    finally:
        grid.kill()


FAILING_POOL_SCRIPT = """
import json, sys
sys.path.insert(0, {bench!r})
import runner

def task(name, threads):
    if name == "bad":
        raise ValueError("this run broke")
    return {{"name": name}}

if __name__ == "__main__":
    done = []
    try:
        runner.run_in_pool({{k: (task, (k,)) for k in ("a", "bad", "b", "c")}}, int(sys.argv[1]),
                           lambda k, s: done.append(s["name"]))
    except runner.TasksFailed as error:
        print(json.dumps({{"done": sorted(done), "failed": sorted(error.failures), "message": str(error)}}))
"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_run_does_not_stop_the_others_and_fails_the_pool_once_they_end(tmp_path, jobs):
    # a run that fails at its start (a folder it refuses to replace) used to end the loop that collects results:
    # the pool still trained every other run, silently, and the grid's end phase never came
    script = tmp_path / "grid.py"
    script.write_text(FAILING_POOL_SCRIPT.format(bench=str(BENCH)))
    done = subprocess.run([sys.executable, str(script), str(jobs)], capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["done"] == ["a", "b", "c"] and result["failed"] == ["bad"]
    assert "1 run(s) failed (bad)" in result["message"] and "this run broke" in result["message"]
    assert "bad: failed: ValueError: this run broke" in done.stderr  # said when it happened, not only at the end


def test_a_grid_starts_over_a_run_killed_before_its_first_checkpoint(bench_channels):
    import runner

    from regrow.training import TrainConfig

    config = TrainConfig(model="mlp", dataset="synthetic", method="static", sparsity=0.5, epochs=1, max_steps=2,
                         batch_size=32, synthetic_size=64)
    out = runner.RESULTS / "runs" / "grid" / "static-seed0"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n')  # killed before its first checkpoint
    summaries = runner.run_grid("grid", {"static-seed0": config})
    assert summaries["static-seed0"]["steps"] == 2
    assert '{"step": 1, "loss": 2.3}' not in (out / "metrics.jsonl").read_text()  # the stale line went with it
    assert runner.run_grid("grid", {"static-seed0": config}) == summaries  # finished: not trained again


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"  # a zombie has stopped; only its parent's wait is missing


def test_channels_runs_everything_on_one_device_and_refuses_one_this_machine_lacks(bench_channels, monkeypatch):
    import torch

    from regrow.errors import ConfigError

    args = bench_channels.parse(["--quick"])
    assert args.device == "cpu" and bench_channels.recipe(args, method="dense").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        bench_channels.parse(["--quick", "--device", "cuda"])



def test_reports_name_the_hardware_each_run_trained_on_and_count_the_runs_that_kept_none(bench_unstructured):
    import runner

    here = {"processor": "CPU A", "threads": 2, "torch": "2.13"}
    runs = {"a": {"environment": {"processor": "CPU A", "threads": 1, "torch": "2.13"}},
            "b": {"environment": {"processor": "CPU B", "threads": 1, "torch": "2.13"}},
            "c": {"environment": {"processor": "CPU A", "threads": 1, "torch": "2.13"}}, "d": {}}
    assert runner.hardware_of(runs, here) == ("CPU A, 1 thread(s), torch 2.13 (2 runs); CPU B, 1 thread(s), "
                                              "torch 2.13 (1 run); not recorded (1 run; this report written on "
                                              "CPU A, 2 threads, torch 2.13)")
    assert runner.hardware_of({"d": {}, "e": {"environment": None}}, here).startswith("not recorded (2 runs;")
    assert runner.width_fraction("0.25") == 0.25
    for bad in ("1", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 1\)"):
            runner.width_fraction(bad)


def test_a_bench_scripts_bad_input_is_one_line_and_exit_2_before_any_run_folder(bench_unstructured, monkeypatch,
                                                                                 capsys, tmp_path):
    import runner
    import torch

    from regrow.errors import ConfigError

    def bad():
        raise ConfigError("first line\n  second line")
    assert runner.script_main(bad) == 2
    assert capsys.readouterr().err.strip().endswith("error: first line second line")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results")
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        runner.run_grid("grid-test", bench_unstructured.grid(unstructured_args(device="cuda", only=["dense-seed0"])))
    assert not (tmp_path / "results").exists()  # refused before any folder was made


def test_channel_widths_cuts_both_allocations_out_at_the_budget_they_were_given(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(BENCH))
    import channel_widths as module

    from regrow.flops import layer_macs
    from regrow.training import load_model

    dense_path = BENCH / "results" / "runs" / "channels-resnet20-e2" / "dense-seed0" / "model.safetensors"
    for bad in ("1", "-0.1"):  # refused before any scoring: one line, exit 2
        with pytest.raises(SystemExit) as refused:
            module.parse(["--dense", str(dense_path), "--min-width", bad])
        assert refused.value.code == 2
    args = module.parse(["--importance-batches", "2", "--dense", str(dense_path), "--min-width", "0.5"])
    dense, _ = load_model(args.dense, expect_model="resnet20")
    dense_macs = sum(layer_macs(dense, (1, 28, 28)).values())
    keeps, described = module.allocate(args, dense)
    assert set(keeps) == set(module.ALLOCATIONS)
    widths = {allocation: described[allocation]["kept_channels"] for allocation in keeps}
    assert widths["one-solve"] != widths["path"]  # the two ways land on different widths
    by_size = {}  # one keep fraction for every group: groups of one size keep as many channels
    for root, count in widths["uniform"].items():
        by_size.setdefault(dense.get_submodule(root).out_channels, set()).add(count)
    assert len(by_size) == 3 and all(len(counts) == 1 for counts in by_size.values())
    sizes = {root: dense.get_submodule(root).out_channels for root in widths["floor"]}
    assert all(count >= args.min_width * sizes[root] for root, count in widths["floor"].items())
    assert any(count < args.min_width * sizes[root] for root, count in widths["one-solve"].items())
    for allocation, kept in keeps.items():
        assert described[allocation]["macs_fraction"] <= args.target
        small = module.cut(load_model(args.dense)[0], kept, args)
        # the exported network has exactly the widths chosen: its MACs are what the allocator priced
        macs = sum(layer_macs(small, (1, 28, 28)).values())
        assert macs / dense_macs == pytest.approx(described[allocation]["macs_fraction"], rel=1e-6)
        modules = dict(small.named_modules())
        assert all(modules[root].out_channels == count for root, count in widths[allocation].items())


def test_channels_summary_sets_the_grids_targets_side_by_side_from_their_reports(bench_channels, monkeypatch):
    import channels_summary as summary

    monkeypatch.setattr(summary, "RESULTS", bench_channels.RESULTS)
    bench_channels.RESULTS.mkdir(parents=True)

    def run(accuracy, predicted=None, flops=1.0):
        return {"test_accuracy": accuracy, "train_flops": flops,
                **({"channels": {"predicted_fraction": predicted}} if predicted else {})}

    def pair(halp, iee):
        return {"halp": {"fraction": 0.30, "accuracy": halp}, "iee-scratch": {"fraction": 0.30, "accuracy": iee}}

    report = {
        "commit": "abc1234", "args": {"model": "mlp", "pretrain_epochs": 30, "targets": [0.55, 0.3]},
        "runs": {"dense-seed0": run(0.900), "dense-seed1": run(0.902), "dense-2x-seed0": run(0.905),
                 "dense-2x-seed1": run(0.907), "halp-0.3-seed0": run(0.90, 0.33, 10.0),
                 "halp-0.3-seed1": run(0.90, 0.33, 10.0), "iee-scratch-0.3-seed0": run(0.88, 0.25, 3.0),
                 "iee-scratch-0.3-seed1": run(0.89, 0.25, 3.0), "iee-scratch-2x-0.3-seed0": run(0.90, None, 6.0),
                 "iee-scratch-2x-0.3-seed1": run(0.90, None, 6.0),
                 "iee-scratch-one-cycle-0.3-seed0": run(0.89), "iee-scratch-one-cycle-0.3-seed1": run(0.91),
                 "iee-pretrained-0.3-seed0": run(0.80), "iee-pretrained-0.3-seed1": run(0.81),
                 "iee-pretrained-ramp-0.3-seed0": run(0.82), "iee-pretrained-ramp-0.3-seed1": run(0.84)},
        "latency": {r: {"measured_speedup": 1 / 0.30} for r in ("halp-0.3-seed0", "iee-scratch-0.3-seed0")},
        "equal_latency": {"0.3": {"seeds": 2, "pairs": [pair(0.90, 0.88), pair(0.90, 0.89)],
                                  "accuracy_difference": [-1.5, 0.5], "cost_ratio": 0.3,
                                  "fraction": {"halp": 0.30, "iee-scratch": 0.30}}},
        "rows": {"halp @ 0.3": {"speedup": 3.0, "tp_speedup_same_macs": 2.5},
                 "iee-scratch @ 0.3": {"speedup": 2.0, "tp_speedup_same_macs": 2.5}, "dense": {"speedup": 1.0}}}
    (bench_channels.RESULTS / "channels-fake.json").write_text(json.dumps(report))
    assert summary.main(["channels-fake"]) == 0
    md = (bench_channels.RESULTS / "channels-summary.md").read_text()
    # IEE 1.5 points under HALP at the same latency: the claim does not hold, whatever the cost
    assert "| mlp, E = 30 | +0.50 | 0.3 | 0.300 / 0.300 | -1.50 ± 0.50 (n=2) | 0.30 | no |" in md
    # IEE's export 0.80 of Torch-Pruning's speed; the table 10 % (HALP: 0.30 measured / 0.33 predicted) and 20 % off
    assert "| mlp, E = 30 | 1 / 2 | 0.80–1.20× | iee-scratch @ 0.3 0.80 | 1 / 2 | 14.5 % | 20.0 % (iee-scratch-0.3-" \
           "seed0) |" in md
    # IEE at E: 0.3 of HALP's cost, 1.5 points under; at 2E: 0.6, level; at half the cost, on the line: 0.5 under
    assert "| mlp, E = 30 | 0.3 | 0.30, -1.50 | 0.60, +0.00 | -0.50 |" in md
    assert "| one-cycle | +1.50 ± 0.50 (n=2) |" in md and "| ramp |" not in md  # only what the grid measured
    assert "| ramp-pretrained | +2.50 ± 0.50 (n=2) |" in md  # against IEE from the same start, not from scratch
    assert json.loads((bench_channels.RESULTS / "channels-summary.json").read_text())["grids"] == {
        "channels-fake": "abc1234"}
    with pytest.raises(ConfigError, match="no report channels-missing.json"):
        summary.main(["channels-missing"])  # named: refused, nothing rewritten
    assert (bench_channels.RESULTS / "channels-summary.md").read_text() == md


def test_channels_reach_by_a_latency_table_keeps_no_cell_it_measured(bench_channels, monkeypatch, tmp_path):
    # --plan may run on a busy machine: the cells it times must not land in the table the grid builds on an idle one
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path / "cache"))
    args = bench_channels.parse(["--model", "mlp", "--min-width", "0.25", "--latency-batch", "4"])
    thinnest, floor = bench_channels.reach(args, "latency")
    assert 0 < thinnest < floor < 1
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_table_recheck_times_the_dense_cells_again_and_reads_the_grids_fidelity_off_them(bench_channels,
                                                                                         monkeypatch, tmp_path):
    import table_recheck as recheck

    from regrow.channels.costs import LatencyTable, layer_shapes
    from regrow.models import create_model

    monkeypatch.setattr(recheck, "RESULTS", bench_channels.RESULTS)
    model = create_model("resnet8")
    shapes = layer_shapes(model, torch.zeros(1, 1, 28, 28), epilogues=True)
    table = LatencyTable(shapes, cache_dir=tmp_path / "cache", key="cpu|fake", measure=lambda *a: 2.0)
    table.reference_ms = 1.0
    cells = recheck.dense_cells(model, shapes)
    dense = sum(table(name, c_in, c_out) for name, c_in, c_out in cells)
    full = {(shapes[name].key(), c_in, c_out) for name, c_in, c_out in cells}
    for name, c_in, c_out in cells:  # narrower cells, twice as many as the dense ones: the sample's majority
        for narrower in ((c_in, c_out // 2), (max(1, c_in // 2), c_out // 2), (max(1, c_in // 4), c_out // 4)):
            if min(narrower) >= 1 and (shapes[name].key(), *narrower) not in full:
                table(name, *narrower)
    table.save()
    held = sum(len(row) for row in table.entries.values())
    assert held > 3 * len({key for key, _, _ in full})

    def grid(entries_sha=None):
        import hashlib
        entries = json.dumps(json.loads(table.path.read_text())["entries"], sort_keys=True)
        fingerprint = {"path": str(table.path), "device": "cpu|fake", "reference_ms": 1.0, "cells": 0,
                       "sha256": entries_sha or hashlib.sha256(entries.encode()).hexdigest()}
        for run, predicted, measured in (("halp-0.3-seed0", 2.0, 1.0), ("iee-scratch-0.3-seed0", 2.0, 1.9)):
            folder = bench_channels.RESULTS / "runs" / "channels-fake" / run
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "summary.json").write_text(json.dumps({
                "config": {"model": "resnet8", "latency_batch": 64, "method_options": {}},
                "channels": {"cost_table": fingerprint}}))
            (folder / "latency.json").write_text(json.dumps({
                "dense": {"predicted_ms": dense}, "predicted_speedup": predicted, "measured_speedup": measured}))

    # timed again: every dense cell at half the table's value, the narrower ones as the table has them
    def time_layer(shape, c_in, c_out, batch, device, repeats, reference_ms):
        return 1.0 if (shape.key(), c_in, c_out) in full else 2.0
    monkeypatch.setattr(recheck, "time_layer", time_layer)
    grid()
    assert recheck.main(["channels-fake", "--sample", str(held), "--passes", "2"]) == 0
    result = json.loads((bench_channels.RESULTS / "table-recheck-channels-fake.json").read_text())
    # the sample is every cell the table holds, most of them as the table has them (no drift); the dense cells
    # take half their time: the dense sum, and with it every predicted speed-up, is halved
    assert result["sample_ratio"] == {"median": 1.0, "min": 0.5, "max": 1.0, "cells": held}
    assert result["dense_ms"]["cached"] == pytest.approx(dense)
    assert result["dense_ms"]["passes"] == pytest.approx([dense / 2] * 2)
    assert result["dense_factor"] == pytest.approx(0.5)
    # committed: HALP predicted 2.0 against 1.0 measured (100 % off), IEE 2.0 against 1.9 (5 %); re-timed, HALP
    # 1.0 (exact) and IEE 1.0 against 1.9 (47 % under)
    committed, retimed = result["fidelity_as_committed"], result["fidelity_dense_retimed"]
    assert (committed["within"], committed["over_predicted"], committed["worst_run"]) == (1, 2, "halp-0.3-seed0")
    assert (retimed["within"], retimed["over_predicted"], retimed["worst_run"]) == (1, 0, "iee-scratch-0.3-seed0")
    assert retimed["worst"] == pytest.approx(1 - 1.0 / 1.9)
    md = (bench_channels.RESULTS / "table-recheck-channels-fake.md").read_text()
    assert f"Cells more than 10 % under their value in the table: {len(cells)}." in md
    assert (bench_channels.RESULTS / "table-recheck-channels-fake.png").exists()
    grid(entries_sha="0" * 64)  # the table changed since the grid used it: refused before anything is timed
    monkeypatch.setattr(recheck, "time_layer", lambda *a, **k: pytest.fail("timed a cell"))
    with pytest.raises(ConfigError, match="no longer holds the cells the grid used"):
        recheck.main(["channels-fake"])
