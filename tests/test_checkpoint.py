"""Checkpoint files: nested sections round-trip exactly, writes are atomic, and other files are told apart."""

import os

import pytest
import torch
from safetensors.torch import save_file

from regrow import checkpoint
from regrow.errors import CheckpointError


def test_nested_sections_round_trip_exactly(tmp_path):
    sections = {"model": {"w": torch.randn(3, 4), "mask": torch.tensor([True, False])},
                "optimizer": {"state": {0: {"momentum": torch.ones(2)}}, "groups": [{"lr": 0.1, "nesterov": True}]},
                "trainer": {"step": 7, "evaluations": [{"acc": 0.5}], "note": None, "name": "x"}}
    checkpoint.save(tmp_path / "c.safetensors", sections, {"kind": "training", "step": 7})
    loaded, meta = checkpoint.load(tmp_path / "c.safetensors")
    assert meta == {"kind": "training", "step": 7}
    assert torch.equal(loaded["model"]["w"], sections["model"]["w"])
    assert loaded["model"]["mask"].dtype == torch.bool
    assert list(loaded["optimizer"]["state"]) == [0]  # non-string keys stay what they were
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum"], torch.ones(2))
    assert loaded["optimizer"]["groups"] == [{"lr": 0.1, "nesterov": True}] and loaded["trainer"]["note"] is None
    assert checkpoint.read_metadata(tmp_path / "c.safetensors") == meta


def test_objects_that_are_not_data_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot store a object"):
        checkpoint.save(tmp_path / "c.safetensors", {"x": object()})
    assert not (tmp_path / "c.safetensors").exists()


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("before")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(path, broken)
    assert path.read_text() == "before" and os.listdir(tmp_path) == ["f.txt"]


def test_plain_safetensors_and_other_files_are_told_apart(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    checkpoint.save(tmp_path / "ours.safetensors", {"model": {"w": torch.zeros(2)}})
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    assert set(checkpoint.load_plain(tmp_path / "plain.safetensors")) == {"w"}
    assert checkpoint.load_plain(tmp_path / "ours.safetensors") is None
    with pytest.raises(CheckpointError, match="not a regrow checkpoint"):
        checkpoint.load(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.load(tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load_plain(tmp_path / "missing.safetensors")
