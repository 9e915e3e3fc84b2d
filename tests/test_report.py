"""Run reports: the per-layer table and totals from a summary, and clear errors for what is not one."""

import json

import pytest

from regrow.errors import DataError
from regrow.report import format_report, read_summary

SUMMARY = {"method": "rigl", "model": "mlp", "dataset": "synthetic", "seed": 3, "steps": 40,
           "layers": [{"name": "net.1", "shape": [300, 784], "numel": 235200, "density": 0.1, "macs": 235200},
                      {"name": "net.3", "shape": [10, 300], "numel": 3000, "density": 1.0, "macs": 3000}],
           "sparsity_target": 0.9, "sparsity_actual": 0.887, "params_total": 238310, "params_nonzero": 26630,
           "macs_dense": 238200, "macs_sparse": 26520, "train_flops": 1e9, "train_flops_ratio": 0.11,
           "dense_train_flops": 9e9, "test_accuracy": 0.8, "wall_seconds": 12.0, "distribution": "erk",
           "structure": "unstructured"}


def test_the_report_shows_each_layer_and_the_totals():
    text = format_report(SUMMARY)
    assert text.splitlines()[0] == "run: rigl on mlp / synthetic (seed 3, 40 steps)"
    row = next(line for line in text.splitlines() if line.startswith("net.1"))
    assert row.split() == ["net.1", "300×784", "235200", "23520", "0.1000", "23.52k"]
    assert "target 0.9000   achieved 0.8870" in text


def test_read_summary_refuses_what_is_not_a_summary(tmp_path):
    with pytest.raises(DataError, match="no summary.json"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"method": "rigl"}))
    with pytest.raises(DataError, match="not a regrow run summary"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    assert read_summary(tmp_path) == SUMMARY


def test_the_report_counts_dead_units_where_the_summary_has_them():
    summary = json.loads(json.dumps(SUMMARY))
    summary["layers"][0].update(dead_outputs=7, dead_inputs=20)
    summary["layers"][1].update(dead_outputs=0, dead_inputs=2)
    text = format_report(summary)
    row = next(line for line in text.splitlines() if line.startswith("net.1"))
    assert row.split()[-2:] == ["7", "20"]
    assert "7 of 310 output units have no active weight" in text
    assert "22 input units are read by none" in text
