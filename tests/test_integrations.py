"""The Hugging Face Trainer and Lightning callbacks, each with a tiny model in its own framework (skipped, with the
reason, where the framework is not installed: both are optional extras)."""

import pytest
import torch
from torch import nn

from regrow import masking
from regrow.errors import ConfigError
from regrow.integrations import SparsifierFactory, unwrap_model, unwrap_optimizer
from regrow.zoo import torchvision_ready

torchvision_ready()  # before importorskip imports a framework that imports an installed torchvision


def check_sparse(model, sparsifier, sparsity):
    layers = masking.masked_layers(model)
    assert layers and sparsifier.actual_sparsity() == pytest.approx(sparsity, abs=2e-3)
    for name, module in layers.items():  # what the forward sees is zero wherever the mask is
        assert torch.count_nonzero(module.weight[~masking.mask_of(module)]) == 0, name


def test_unknown_method_fails_when_the_callback_is_made():
    with pytest.raises(ConfigError, match="unknown method"):
        SparsifierFactory("rigll", sparsity=0.9)


def test_wrappers_are_unwrapped():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_optimizer(Wrapper(Wrapper(optimizer))) is optimizer
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    own = nn.Sequential()
    own.module = nn.Linear(4, 2)  # a model's own submodule called "module" is not a wrapper
    assert unwrap_model(own) is own
    with pytest.raises(ConfigError, match="no torch optimizer"):
        unwrap_optimizer(object())


def tiny_bert(transformers):
    """A 2-layer BERT classifier from a config, and 64 token sequences whose first token decides the label."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 64, (64, 8), generator=torch.Generator().manual_seed(0))
    return model, [{"input_ids": i, "labels": y} for i, y in zip(ids, (ids[:, 0] > 31).long())]


def test_hugging_face_trainer_trains_a_sparse_bert(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the huggingface extra is not installed")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from regrow.integrations.huggingface import RegrowCallback

    model, data = tiny_bert(transformers)
    callback = RegrowCallback("rigl", sparsity=0.8, interval=2, exclude=["classifier"])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    result = trainer.train()
    sp = callback.sparsifier
    assert sp.step_count == 12 == trainer.state.global_step  # one mask step per optimizer step
    assert len(sp.history) >= 4 and sum(h["grown"] for h in sp.history) > 0
    assert "bert.encoder.layer.0.attention.self.query" in sp.layers and "classifier" not in sp.layers
    check_sparse(model, sp, 0.8)
    assert result.training_loss == result.training_loss  # finite, not NaN


def hf_run(tmp_path, transformers, steps=12, resume=None, save_steps=6):
    from regrow.integrations.huggingface import RegrowCallback

    model, data = tiny_bert(transformers)
    callback = RegrowCallback("rigl", sparsity=0.8, interval=2, exclude=["classifier"])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                                          learning_rate=1e-3, report_to=[], save_strategy="steps",
                                          save_steps=save_steps, logging_strategy="no", use_cpu=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return model, callback.sparsifier


def test_hugging_face_resume_restores_masks_and_schedule(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the huggingface extra is not installed")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    full, full_sp = hf_run(tmp_path / "full", transformers)
    hf_run(tmp_path / "cut", transformers, steps=12, save_steps=6)  # writes checkpoint-6 (and -12)
    assert (tmp_path / "cut" / "checkpoint-6" / "regrow_sparsifier.safetensors").is_file()
    resumed, resumed_sp = hf_run(tmp_path / "cut", transformers, resume=str(tmp_path / "cut" / "checkpoint-6"))
    assert resumed_sp.step_count == 12 and len(resumed_sp.history) == len(full_sp.history)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        if name.endswith("_mask"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_hugging_face_resume_without_the_callbacks_file_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the huggingface extra is not installed")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from regrow.errors import CheckpointError

    hf_run(tmp_path, transformers, steps=6, save_steps=6)
    (tmp_path / "checkpoint-6" / "regrow_sparsifier.safetensors").unlink()
    with pytest.raises(CheckpointError, match="its masks cannot be restored"):
        hf_run(tmp_path, transformers, steps=12, resume=str(tmp_path / "checkpoint-6"))


def lightning_run(lightning, callback, epochs, checkpoint_dir=None, resume=None):
    """The tests' MLP under Lightning: 32 batches of 16 per epoch, a step every second batch (SGD, momentum)."""

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    x = torch.randn(256, 16)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    module = Module()
    checkpoints = [lightning.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1,
                                                               every_n_epochs=1)] if checkpoint_dir else []
    trainer = lightning.Trainer(max_epochs=epochs, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                                logger=False, enable_checkpointing=bool(checkpoint_dir), enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[*([callback] if callback else []), *checkpoints])
    trainer.fit(module, data, ckpt_path=resume)
    return module, trainer


def test_lightning_trainer_trains_a_sparse_mlp():
    lightning = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    from regrow.integrations.lightning import RegrowCallback

    callback = RegrowCallback("set", sparsity=0.9, interval=3)
    module, trainer = lightning_run(lightning, callback, epochs=2)
    sp = callback.sparsifier
    assert trainer.global_step == 16 and sp.step_count == 16  # 32 batches, a step every second one
    assert sp.total_steps == 16 and len(sp.history) >= 3
    check_sparse(module, sp, 0.9)


def test_lightning_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """Lightning's strict load of a checkpoint's weights into a fresh module (no mask buffers yet) works: the masks
    come out of the checkpoint, back in once the sparsifier is built, with the saved schedule; the resumed run ends
    where the uninterrupted one does (masks exact, weights to float rounding). A checkpoint written without the
    callback is refused."""
    lightning = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    from regrow.errors import CheckpointError
    from regrow.integrations.lightning import RegrowCallback

    uninterrupted = RegrowCallback("rigl", sparsity=0.8, interval=3)
    whole, _ = lightning_run(lightning, uninterrupted, epochs=3, checkpoint_dir=tmp_path / "whole")
    saved = sorted((tmp_path / "whole").glob("epoch=0-*.ckpt"))
    assert len(saved) == 1
    callback = RegrowCallback("rigl", sparsity=0.8, interval=3)
    resumed, trainer = lightning_run(lightning, callback, epochs=3, resume=str(saved[0]))
    assert trainer.global_step == 24 and callback.sparsifier.step_count == 24
    history = callback.sparsifier.history  # the mask updates, none lost or repeated across the resume
    assert len(history) >= 4 and history == uninterrupted.sparsifier.history
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        if name.endswith("_mask"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    check_sparse(resumed, callback.sparsifier, 0.8)
    assert "on_load_checkpoint" not in vars(resumed) and "on_load_checkpoint" not in vars(whole)  # hooks put back

    lightning_run(lightning, None, epochs=1, checkpoint_dir=tmp_path / "plain")  # a dense run without the callback
    plain = sorted((tmp_path / "plain").glob("*.ckpt"))[0]
    with pytest.raises(CheckpointError, match="holds no RegrowCallback state"):
        lightning_run(lightning, RegrowCallback("rigl", sparsity=0.8, interval=3), epochs=2, resume=str(plain))
