"""One writer per run folder, and no result lost or mixed up."""

import json
import os
import subprocess
import sys
import time

import pytest

from regrow.cli import main
from regrow.runfolder import LOCK, FolderBusyError, RunFolder

SMALL = ["--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--no-progress", "--device", "cpu"]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK}


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    with RunFolder(tmp_path / "run"):
        with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
            RunFolder(tmp_path / "run").__enter__()
    with RunFolder(tmp_path / "run"):  # released: the next run takes it
        pass


def test_two_processes_with_the_same_out_exactly_one_runs(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "regrow.cli", "train", *SMALL, "--method", "set", "--epochs", "200",
            "--opt", "interval=5", "--out", str(out)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists():  # the first one is training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = subprocess.run([*args[:-2], "--seed", "1", "--out", str(out)], capture_output=True, text=True)
        assert second.returncode == 2
        assert "being written by another regrow process" in second.stderr and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # untouched, still training
    finally:
        first.kill()
        first.wait()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] > 0 for line in lines)  # one writer: no interleaved or broken lines


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--method", "static", "--max-steps", "3", "--out", str(out)]) == 0
    (out / "checkpoint.safetensors").unlink()  # a finished result without a checkpoint is still a result
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", *SMALL, "--method", "static", "--max-steps", "3", "--seed", "1", "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(["train", *SMALL, "--method", "static", "--max-steps", "3", "--seed", "1", "--overwrite",
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


def test_a_run_killed_before_its_first_checkpoint_is_named_as_such_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n')
    before = snapshot(out)
    assert main(["train", *SMALL, "--method", "static", "--max-steps", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "an unfinished run without a checkpoint (nothing to resume)" in err and "finished run" not in \
        err.replace("unfinished run", "")
    assert snapshot(out) == before


def test_export_never_writes_over_a_runs_own_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--model", "resnet8", "--method", "halp", "--structure", "channel", "--cost",
                 "macs", "--latency-target", "0.6", "--max-steps", "8", "--opt", "prune_every=2",
                 "--opt", "prune_steps=3", "--out", str(out)]) == 0
    before = snapshot(out)
    for target in ("model.safetensors", "summary.json", "checkpoint.safetensors"):
        capsys.readouterr()
        assert main(["export", str(out), "--out", str(out / target)]) == 2
        assert "would replace a run's own file" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(["export", str(out / "model.safetensors")]) == 0  # a file given: the export goes beside it
    assert (out / "exported.safetensors").exists()
    capsys.readouterr()
    assert main(["export", str(out)]) == 2  # exists now
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(out), "--overwrite"]) == 0


def test_stale_temporary_files_are_removed_and_files_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".model.safetensors.abc123.tmp").write_bytes(b"half a file")
    old = os.umask(0o022)
    try:
        assert main(["train", *SMALL, "--method", "static", "--max-steps", "2", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert not list(out.glob(".*.tmp"))
    assert (out / "summary.json").stat().st_mode & 0o777 == 0o644
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
