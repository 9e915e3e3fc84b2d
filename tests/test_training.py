import hashlib
import json

import pytest
import torch

from regrow.errors import CheckpointError, ConfigError, TrainingDivergedError
from regrow.training import CHECKPOINT, METRICS, MODEL, SUMMARY, TrainConfig, Trainer, load_model


def config(**kw):
    base = dict(model="resnet8", dataset="synthetic", synthetic_size=256, method="rigl", sparsity=0.8,
                epochs=2, batch_size=32, log_every=3, progress=False, seed=0,
                method_options={"interval": 4})
    base.update(kw)
    return TrainConfig(**base)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, method):
    options = {"interval": 4}
    full = Trainer(config(method=method, method_options=options), tmp_path / "full").run()
    # Stop after step 7 (mid-epoch, between mask updates), then resume in a fresh trainer.
    assert Trainer(config(method=method, method_options=options, checkpoint_every=7),
                   tmp_path / "cut").run(stop_after=7) is None
    resumed = Trainer(config(method=method, method_options=options, checkpoint_every=7),
                      tmp_path / "cut").run(resume=True)
    a, _ = load_model(tmp_path / "full" / MODEL)
    b, _ = load_model(tmp_path / "cut" / MODEL)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert (tmp_path / "full" / METRICS).read_text() == (tmp_path / "cut" / METRICS).read_text()
    for key in ("test_accuracy", "train_flops", "sparsity_actual", "mask_updates", "test_accuracy_per_epoch"):
        assert full[key] == resumed[key], key
    assert full["mask_updates"] > 0


def test_summary_has_the_contract_fields(tmp_path):
    s = Trainer(config(epochs=1), tmp_path).run()
    on_disk = json.loads((tmp_path / SUMMARY).read_text())
    for key in ("method", "sparsity_target", "sparsity_actual", "test_accuracy", "train_flops",
                "dense_train_flops", "wall_seconds", "layers"):
        assert key in on_disk
    assert 0.0 <= s["test_accuracy"] <= 1.0
    assert s["sparsity_actual"] == pytest.approx(0.8, abs=1e-4)
    assert 0 < s["train_flops"] < s["dense_train_flops"]
    assert all({"name", "numel", "density"} <= set(layer) for layer in s["layers"])


def test_dense_method_has_no_masks_and_costs_dense_flops(tmp_path):
    s = Trainer(config(method="dense", epochs=3, method_options={}), tmp_path).run()
    assert s["sparsity_actual"] == 0.0 and s["train_flops"] == s["dense_train_flops"]
    assert s["test_accuracy"] > 0.8  # the synthetic data is learnable: 4 classes, chance is 0.25
    assert all(layer["density"] == 1.0 for layer in s["layers"])


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    Trainer(config(checkpoint_every=5), tmp_path).run(stop_after=5)
    before = digest(tmp_path / CHECKPOINT)
    trainer = Trainer(config(checkpoint_every=5), tmp_path)
    trainer.train_data.images[:] = float("nan")
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 6"):
        trainer.run(resume=True)
    assert digest(tmp_path / CHECKPOINT) == before
    assert not (tmp_path / MODEL).exists()


def test_existing_run_is_not_overwritten_and_resume_checks_the_config(tmp_path):
    Trainer(config(epochs=1), tmp_path).run()
    before = digest(tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="already holds a run"):
        Trainer(config(epochs=1), tmp_path).run()
    with pytest.raises(CheckpointError, match="configuration differs.*sparsity"):
        Trainer(config(epochs=1, sparsity=0.5), tmp_path).run(resume=True)
    assert digest(tmp_path / CHECKPOINT) == before


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    Trainer(config(epochs=1), tmp_path).run()
    with pytest.raises(CheckpointError, match="resnet8 checkpoint, not resnet20"):
        load_model(tmp_path / MODEL, expect_model="resnet20")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")


def test_bad_training_options(tmp_path):
    for bad in (dict(epochs=0), dict(batch_size=-1), dict(lr=float("nan")), dict(sparsity=1.0)):
        with pytest.raises(ConfigError):
            Trainer(config(**bad), tmp_path)


def test_channels_last_trains_the_same_masked_network(tmp_path):
    options = {"estimate_steps": 3, "improve_steps": 2, "explore_steps": 3}
    standard = Trainer(config(method="iee", method_options=options, channels_last=False), tmp_path / "a")
    nhwc = Trainer(config(method="iee", method_options=options, channels_last=True), tmp_path / "b")
    a, b = standard.run(), nhwc.run()
    conv = nhwc.model.layer1[0].conv1
    assert conv.weight_mask.is_contiguous(memory_format=torch.channels_last)
    assert a["sparsity_actual"] == b["sparsity_actual"] and a["mask_updates"] == b["mask_updates"]
    assert abs(a["test_accuracy"] - b["test_accuracy"]) < 0.05  # same math, another summation order


def test_resume_with_another_thread_count_warns(tmp_path):
    Trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(stop_after=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(UserWarning, match=f"threads {threads + 1}; it was saved with {threads}"):
            Trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(resume=True)
    finally:
        torch.set_num_threads(threads)


def test_a_damaged_metrics_file_does_not_block_resume(tmp_path):
    Trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(stop_after=4)
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a crash
    with pytest.warns(UserWarning, match="1 damaged line"):
        summary = Trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(resume=True)
    assert summary["steps"] > 4
    assert all(json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines())
