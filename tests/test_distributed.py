"""Data parallelism on the CPU (Gloo, two processes): identical masks and weights on every rank, a run equal to one
process with the same global batch, a mismatch that is an error, resume, and refusals."""

import pytest
import torch
from safetensors.torch import save_file

from regrow import SET, distributed
from regrow.cli import main
from regrow.errors import DistributedError
from regrow.training import MODEL, TrainConfig, build_trainer, load_model, train_parallel


def config(**kw):
    base = dict(model="mlp", dataset="synthetic", synthetic_size=200, method="rigl", sparsity=0.9, epochs=2,
                batch_size=32, augment=False, log_every=2, progress=False, seed=0, device="cpu",
                method_options={"interval": 2})
    base.update(kw)
    return TrainConfig(**base)


def run_and_keep_each_rank(cfg, out, stop_after=None, resume=False):
    """One rank's training; every rank then saves its own model, so the test can compare the ranks."""
    trainer = build_trainer(cfg, out)
    trainer.run(stop_after=stop_after, resume=resume)
    rank, _ = distributed.world()
    state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))


def load_rank(out, rank):
    from safetensors.torch import load_file
    return load_file(str(out / f"rank{rank}.safetensors"))


# 200 samples, batches of 32: the last batch (8) splits 4 + 4; IEE's cycles are shortened to fit 14 steps.
METHODS = {
    "rigl": {"interval": 2},
    "set": {"interval": 2},
    "iee": {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2, "criterion": "taylor"},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_hold_identical_masks_and_equal_one_process(tmp_path, method):
    cfg = config(method=method, method_options=METHODS[method])
    distributed.launch(run_and_keep_each_rank, 2, (cfg, tmp_path / "ddp"))
    single = build_trainer(cfg, tmp_path / "one").run()
    rank0, rank1 = load_rank(tmp_path / "ddp", 0), load_rank(tmp_path / "ddp", 1)
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # the two ranks: bit for bit, masks and weights
        assert torch.equal(rank0[key], rank1[key]), key
    one, _ = load_model(tmp_path / "one" / MODEL)
    masks = [k for k in rank0 if k.endswith("_mask")]
    assert masks and single["mask_updates"] >= 2
    for key, value in one.state_dict().items():  # the same run as one process, up to float rounding
        if key.endswith("_mask"):
            assert torch.equal(value, rank0[key]), key
        else:
            torch.testing.assert_close(value, rank0[key], rtol=1e-5, atol=1e-6)


def test_two_process_resume_continues_the_same_run(tmp_path):
    cfg = config(checkpoint_every=5)
    distributed.launch(run_and_keep_each_rank, 2, (cfg, tmp_path / "full"))
    distributed.launch(run_and_keep_each_rank, 2, (cfg, tmp_path / "cut", 5))
    distributed.launch(run_and_keep_each_rank, 2, (cfg, tmp_path / "cut", None, True))
    full, cut = load_rank(tmp_path / "full", 0), load_rank(tmp_path / "cut", 1)
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def differing_start_masks():
    """Each rank seeds its sparsifier differently: the start masks differ, which the first step must catch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = SET(model, optimizer, sparsity=0.5, total_steps=10, seed=distributed.world()[0])
    sp.step()


def test_masks_that_differ_between_ranks_are_an_error():
    with pytest.raises(DistributedError, match="differ between ranks after the mask update at step 1"):
        distributed.launch(differing_start_masks, 2)


def test_train_parallel_writes_one_run_folder(tmp_path):
    summary = train_parallel(config(epochs=1), tmp_path / "run", nproc=2)
    assert summary["environment"]["processes"] == 2
    assert summary["sparsity_masked"] == pytest.approx(0.9, abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "checkpoint.safetensors", "metrics.jsonl", "model.safetensors", "recipe.yaml", "summary.json"]


def test_a_batch_too_small_to_split_is_refused_before_work(tmp_path, capsys):
    # 200 samples in batches of 64: the last batch holds 8 samples, which 16 processes cannot share.
    # 512 synthetic samples in batches of 96: the last batch holds 32 samples, which 48 processes cannot share.
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "96", "--nproc", "48",
                 "--no-augment", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "a batch of 32 samples cannot be split over 48 processes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()  # refused before any process started or wrote
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--nproc", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--nproc must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_without_a_process_group_nothing_is_reduced():
    t = torch.arange(4.0)
    assert distributed.world() == (0, 1) and not distributed.active()
    assert distributed.average(t) is t
    assert distributed.mask_checksum(torch.tensor([1, 0, 1, 0])).tolist() != \
        distributed.mask_checksum(torch.tensor([0, 1, 0, 1])).tolist()


def test_channel_pruning_keeps_identical_masks_on_both_ranks(tmp_path):
    """HALP on a ResNet with BatchNorm: its Taylor-BN scores come from gradients DDP averages, so the ranks choose the
    same channels (the checksum would raise otherwise) and end with bit-identical weights and masks; BatchNorm makes
    it differ from one process, so that is not compared."""
    cfg = config(model="resnet8", method="halp", structure="channel", cost="macs", latency_target=0.6,
                 channels_last=False, method_options={"prune_every": 2, "prune_steps": 3})
    distributed.launch(run_and_keep_each_rank, 2, (cfg, tmp_path / "ddp"))
    rank0, rank1 = load_rank(tmp_path / "ddp", 0), load_rank(tmp_path / "ddp", 1)
    masks = [k for k in rank0 if k.endswith("weight_mask")]
    assert masks and any(not bool(rank0[k].all()) for k in masks)  # channels were pruned
    for key in rank0:  # BatchNorm's running statistics are each rank's own after its last local batch (plain DDP)
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(rank0[key], rank1[key]), key
