import json
import subprocess
import sys

import pytest
import torch

from regrow.cli import _config_from, build_parser, main
from regrow.training import build_trainer

SMALL = ["--model", "resnet8", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def run_cli(*args):
    """The CLI as a user runs it: a separate process, so tracebacks and exit codes are what they see."""
    return subprocess.run([sys.executable, "-m", "regrow.cli", *args], capture_output=True, text=True)


def test_train_report_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--method", "rigl", "--sparsity", "0.9", "--distribution", "erk",
                 "--max-steps", "8", "--opt", "interval=2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # updates at steps 2 and 4: T_end = 0.75 × 8 = 6 and none from T_end on
    assert summary["method"] == "rigl" and summary["steps"] == 8 and summary["mask_updates"] == 2
    assert summary["sparsity_target"] == 0.9 and abs(summary["sparsity_actual"] - 0.9) < 1e-4
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "layer1.0.conv1" in report and "target 0.9000   achieved 0.9000" in report and "MACs" in report
    metrics = summary["mask_metrics"]
    assert f"mask updates    2: {metrics['pruned_total']:,} units pruned" in report
    assert f"with the previous mask: first update {metrics['iou_previous'][0]:.3f}" in report
    assert main(["report", str(out), "--plot", str(tmp_path / "d.png"), "--mask-plot", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "d.png").stat().st_size > 1000 and (tmp_path / "m.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["eval", str(out / "model.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert result["sparsity"] == pytest.approx(summary["sparsity_actual"])


@pytest.mark.parametrize("args, message", [
    (["train", "--sparsity", "1.3"], "sparsity must be in [0, 1)"),
    (["train", "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["train", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["train", "--method", "rigel"], "unknown method 'rigel'"),
    (["train", "--distribution", "erkk"], "unknown distribution 'erkk'"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "Fashion-MNIST not found"),
    (["train", "--opt", "nonsense"], "--opt takes key=value"),
    (["report", "/nonexistent"], "no summary.json"),
    (["train", "--method", "halp", "--structure", "channel", "--latency-target", "1.5"],
     "latency_target is a fraction of the dense model's cost in (0, 1)"),
    (["train", "--method", "iee", "--structure", "channel", "--latency-target", "0"], "latency_target"),
    (["train", "--method", "halp"], "halp prunes channels: add --structure channel"),
    (["train", "--method", "rigl", "--structure", "channel"], "no channel version; channel methods: halp, iee"),
    (["train", "--method", "iee", "--structure", "channel", "--cost", "macs", "--latency-target", "0.001",
      "--model", "resnet8"], "below what this model reaches with one group"),
    (["train", "--method", "halp", "--structure", "channel", "--latency-target", "12parsecs"],
     "'12parsecs' is neither a fraction such as 0.3 nor a time such as 12ms"),
    (["train", "--method", "halp", "--structure", "channel", "--latency-target", "12ms", "--cost", "macs"],
     "a budget in milliseconds is a measured latency: it takes --structure channel and --cost latency"),
    (["train", "--method", "halp", "--structure", "channel", "--latency-target", "0ms"],
     "latency_target_ms must be a positive number of milliseconds, got 0.0"),
    (["train", "--method", "halp", "--structure", "channel", "--latency-target", "100000ms", "--latency-batch", "2",
      "--model", "resnet8"], "ms at batch 2 on this device, within the 100000 ms asked for: nothing to prune"),
    (["train", "--method", "halp", "--structure", "channel", "--init-from", "/nonexistent/model.safetensors"],
     "no checkpoint at"),
    (["export", "/nonexistent"], "no checkpoint at"),
    (["eval", "/nonexistent/model.safetensors"], "no checkpoint at"),
    (["train", "--device", "cuda"], "this machine has no usable CUDA GPU"),
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "--amp", "fp8"], "invalid choice: 'fp8'"),
    (["report", "/nonexistent", "--mask-plot", "m.png"], "no summary.json"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, args, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if args[0] == "train":
        args = args + (["--dataset", "synthetic"] if "--dataset" not in args else []) + ["--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_installed_command_exits_2_with_one_line():
    """The one check through a separate process: what a user's shell sees (exit status, stderr, no traceback)."""
    proc = run_cli("train", "--sparsity", "1.3", "--dataset", "synthetic")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["regrow: error: sparsity must be in [0, 1) (fraction of weights set "
                                                "to zero), got 1.3"]


def test_nan_loss_and_wrong_architecture_from_the_cli(tmp_path, capsys):
    assert main(["train", *SMALL, "--lr", "1e30", "--method", "static", "--out", str(tmp_path / "nan")]) == 2
    err = capsys.readouterr().err
    assert "loss is" in err and "Traceback" not in err
    assert not (tmp_path / "nan" / "model.safetensors").exists()
    assert main(["train", *SMALL, "--method", "static", "--max-steps", "2", "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ok" / "model.safetensors"), "--model", "resnet20"]) == 2
    assert "resnet8 checkpoint, not resnet20" in capsys.readouterr().err


def test_iee_from_the_cli_with_options_and_mask_metrics(tmp_path, capsys):
    out = tmp_path / "iee"
    assert main(["train", *SMALL, "--method", "iee", "--sparsity", "0.8", "--max-steps", "16",
                 "--opt", "estimate_steps=2", "--opt", "improve_steps=1", "--opt", "explore_steps=2",
                 "--opt", "criterion=taylor", "--opt", "freeze_bn=false", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method_options"] == {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2,
                                                   "criterion": "taylor", "freeze_bn": False}
    assert summary["mask_updates"] == 12 // 5 == summary["mask_metrics"]["updates"]  # T_end = 12: 2 cycles of 5
    assert len(summary["mask_metrics"]["iou_previous"]) == 2
    assert summary["mask_metrics"]["pruned"] == summary["mask_metrics"]["grown"]
    capsys.readouterr()
    assert main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "iee: " in help_text and "explore_steps=50" in help_text


def test_threads_sets_torchs_threads_for_the_run_and_stays_out_of_the_recipe(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--max-steps", "2", "--no-progress",
                     "--threads", "1", "--out", str(out)]) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((out / "summary.json").read_text())["environment"]["threads"] == 1
        assert "threads" not in (out / "recipe.yaml").read_text()  # how to run it, not what the run is
    finally:
        torch.set_num_threads(before)


def test_sparsity_defaults_to_what_the_structure_fixes(tmp_path):
    def sparsity(*args):
        return _config_from(build_parser().parse_args(["train", *args, "--out", str(tmp_path / "x")])).sparsity
    assert sparsity("--structure", "2:4") == 0.5 and sparsity("--structure", "1:4") == 0.75
    assert sparsity() == 0.9 and sparsity("--structure", "2:4", "--sparsity", "0.5") == 0.5


def test_cli_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    args = [*SMALL, "--method", "set", "--sparsity", "0.8", "--epochs", "2", "--opt", "interval=3",
            "--checkpoint-every", "5"]
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    # interrupt a second run right after its step-5 checkpoint, then resume it from the command line
    config = _config_from(build_parser().parse_args(["train", *args, "--out", str(tmp_path / "cut")]))
    assert build_trainer(config, tmp_path / "cut").run(stop_after=5) is None
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert main(["train", *args, "--out", str(tmp_path / "cut")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full = (tmp_path / "full" / "model.safetensors").read_bytes()
    assert full == (tmp_path / "cut" / "model.safetensors").read_bytes()
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_channel_training_export_and_latency_from_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path / "cache"))
    dense, run = tmp_path / "dense", tmp_path / "halp"
    assert main(["train", *SMALL, "--method", "dense", "--max-steps", "6", "--out", str(dense)]) == 0
    assert main(["train", *SMALL, "--method", "halp", "--structure", "channel", "--cost", "macs",
                 "--latency-target", "0.4", "--max-steps", "20", "--init-from", str(dense / "model.safetensors"),
                 "--opt", "prune_every=2", "--opt", "prune_steps=5", "--opt", "group_size=2", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    channels = summary["channels"]
    assert channels["predicted_cost"] <= channels["budget"] and channels["predicted_fraction"] <= 0.4
    assert summary["mask_updates"] == 5 and summary["sparsity_target"] is None
    dense_summary = json.loads((dense / "summary.json").read_text())
    assert summary["total_train_flops"] == pytest.approx(summary["train_flops"] + dense_summary["train_flops"])
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "channel budget  macs" in capsys.readouterr().out
    assert main(["export", str(run)]) == 0 and main(["export", str(run), "--format", "onnx"]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    from regrow.export import load_exported
    model, meta = load_exported(run / "exported.safetensors")
    params = sum(p.numel() for p in model.parameters())
    assert params < summary["params_total"] and meta["model"] == "resnet8"
    assert main(["bench-latency", str(run), "--repeats", "3", "--batch-size", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exported"]["params"] == params and result["batch_size"] == 4
    assert result["exported"]["macs"] < result["dense"]["macs"]
    assert result["exported"]["measured_ms"] > 0 and result["dense"]["predicted_ms"] > 0


def test_a_budget_in_milliseconds_is_converted_once_and_the_recipe_keeps_the_fraction(tmp_path, capsys, monkeypatch):
    import yaml

    from regrow import latency_report
    from regrow.channels import costs

    monkeypatch.setattr(latency_report, "paired_timing",
                        lambda models, x, **kw: {"dense": {"ms": 40.0, "speedup": 1.0, "pass_speedups": [1.0]}})
    monkeypatch.setattr(costs, "time_layer", lambda shape, c_in, c_out, *args, **kw: 1e-3 * (c_in * c_out + 1))
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path / "cache"))
    run = ["train", *SMALL, "--max-steps", "2", "--method", "halp", "--structure", "channel", "--latency-batch", "2",
           "--opt", "prune_first=true", "--opt", "prune_every=1", "--opt", "prune_steps=1"]
    assert main([*run, "--latency-target", "12ms", "--out", str(tmp_path / "run")]) == 0
    assert "12 ms at batch 2 is 0.3000 of the dense model's 40 ms measured now" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["latency_target"] == pytest.approx(0.3)
    assert summary["config"]["latency_target_ms"] == 12.0 and summary["config"]["latency_dense_ms"] == 40.0
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "asked for 12 ms at batch 2: 30.00% of the dense forward, 40 ms measured" in capsys.readouterr().out
    timings = iter([{"dense": {"ms": 40.0}, "exported": {"ms": 13.0, "speedup": 40 / 13, "pass_speedups": [3.1]}}] * 2)
    monkeypatch.setattr(latency_report, "paired_timing", lambda *a, **k: next(timings))
    assert main(["bench-latency", str(tmp_path / "run"), "--batch-size", "2", "--repeats", "1"]) == 0
    assert "budget: 12 ms asked for at batch 2, exported 13 ms (over by 8.3 %)" in capsys.readouterr().out
    assert main(["bench-latency", str(tmp_path / "run"), "--batch-size", "4", "--repeats", "1"]) == 0
    assert "budget:" not in capsys.readouterr().out  # another batch than the budget's: nothing to compare
    recipe = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert recipe["latency_target"] == pytest.approx(0.3)  # the fraction: repeating the run times nothing
    monkeypatch.setattr(latency_report, "paired_timing", lambda *a, **k: pytest.fail("timed again"))
    assert main(["train", "--recipe", str(tmp_path / "run" / "recipe.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["config"]["latency_target"] == summary["config"]["latency_target"]
    assert again["test_accuracy"] == summary["test_accuracy"]
