"""bench-latency's report: dense against exported, with the predicted and the measured speed-up side by side."""

from regrow.artifacts import load_model
from regrow.cli import main
from regrow.latency_report import format_latency_report, latency_report


def test_a_channel_pruned_model_reports_fewer_macs_and_both_speedups(tmp_path, monkeypatch):
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--method", "halp", "--structure", "channel",
                 "--cost", "macs", "--latency-target", "0.4", "--batch-size", "16", "--max-steps", "12",
                 "--opt", "prune_every=2", "--opt", "prune_steps=3", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    model, meta = load_model(out / "model.safetensors")
    report = latency_report(model, meta, batch_size=4, repeats=3)
    assert report["dense"]["params"] > report["exported"]["params"]
    assert report["macs_reduction"] == report["dense"]["macs"] / report["exported"]["macs"] > 1.5
    for row in ("dense", "exported"):
        assert report[row]["measured_ms"] > 0 and report[row]["predicted_ms"] > 0
    assert report["measured_speedup"] == report["dense"]["measured_ms"] / report["exported"]["measured_ms"]
    text = format_latency_report(report)
    assert "MACs reduction" in text and f"{report['macs_reduction']:.2f}x" in text
