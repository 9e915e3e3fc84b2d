"""bench-latency's report: dense against exported, with the predicted and the measured speed-up side by side."""

import statistics

import pytest

from regrow import latency_report as latency_module
from regrow.artifacts import load_model
from regrow.cli import main
from regrow.errors import ConfigError
from regrow.latency_report import format_latency_report, latency_report, paired_timing


def halp_run(tmp_path, monkeypatch):
    """A short HALP run of the MLP at 40 % of its MACs: a model with channels to remove."""
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--method", "halp", "--structure", "channel",
                 "--cost", "macs", "--latency-target", "0.4", "--batch-size", "16", "--max-steps", "12",
                 "--opt", "prune_every=2", "--opt", "prune_steps=3", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    return out


def test_a_channel_pruned_model_reports_fewer_macs_and_both_speedups(tmp_path, monkeypatch):
    out = halp_run(tmp_path, monkeypatch)
    model, meta = load_model(out / "model.safetensors")
    report = latency_report(model, meta, batch_size=4, repeats=3)
    assert report["dense"]["params"] > report["exported"]["params"]
    assert report["macs_reduction"] == report["dense"]["macs"] / report["exported"]["macs"] > 1.5
    for row in ("dense", "exported"):
        assert report[row]["measured_ms"] > 0 and report[row]["predicted_ms"] > 0
    assert report["passes"] == 3 and len(report["pass_speedups"]) == 3
    assert report["measured_speedup"] == statistics.median(report["pass_speedups"])
    text = format_latency_report(report)
    assert "MACs reduction" in text and f"{report['macs_reduction']:.2f}x" in text


def test_deployment_latency_at_several_batch_sizes_under_pytorch_and_onnx_runtime(tmp_path, monkeypatch, capsys):
    import json

    out = halp_run(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["bench-latency", str(out), "--deploy", "1,8", "--repeats", "3", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["batch_sizes"] == [1, 8] and r["threads"] == 1
    for backend in ("pytorch", "onnxruntime"):
        assert set(r[backend]) == {"1", "8"}
        for row in r[backend].values():
            assert row["dense_ms"] > 0 and row["exported_ms"] > 0
            assert row["speedup"] == row["dense_ms"] / row["exported_ms"]
    assert main(["bench-latency", str(out), "--deploy", "4", "--no-onnx", "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "pytorch" in text and "onnxruntime" not in text.split("\n", 1)[1]
    assert main(["bench-latency", str(out), "--deploy", "1,x"]) == 2
    assert "--deploy takes batch sizes" in capsys.readouterr().err


def test_paired_timing_takes_the_median_of_within_pass_ratios_not_the_ratio_of_pooled_medians(monkeypatch):
    # Three passes whose machine state differs: the pooled medians (dense 12 ms, pruned 5 ms) would say 2.4x;
    # within each pass the pruned model is 2x, 2.5x and 3x faster.
    passes = iter([{"dense": 10.0, "pruned": 5.0}, {"dense": 30.0, "pruned": 12.0}, {"dense": 12.0, "pruned": 4.0}])
    monkeypatch.setattr(latency_module, "time_models", lambda models, x, repeats: next(passes))
    timed = paired_timing({"dense": None, "pruned": None}, None, passes=3)
    assert timed["pruned"]["pass_speedups"] == [2.0, 2.5, 3.0]
    assert timed["pruned"]["speedup"] == 2.5 and timed["pruned"]["ms"] == 5.0
    assert timed["dense"]["speedup"] == 1.0 and timed["dense"]["ms"] == 12.0
    with pytest.raises(ConfigError, match="reference"):
        paired_timing({"pruned": None}, None)


def test_bench_latency_device_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    import torch

    missing = tmp_path / "no-such-run"  # never read: the device is refused first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench-latency", str(missing), "--device", "cuda"]) == 2
    assert "no usable CUDA GPU" in capsys.readouterr().err
    assert main(["bench-latency", str(missing), "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["bench-latency", str(missing), "--device", "cuda", "--deploy", "1,8"]) == 2
    assert "ONNX Runtime is timed on its CPU provider only" in capsys.readouterr().err


def test_models_and_input_on_different_devices_are_not_timed():
    import torch

    with pytest.raises(ConfigError, match="time them on one device"):
        latency_module.time_models({"dense": torch.nn.Linear(3, 3)}, torch.zeros(2, 3, device="meta"))
