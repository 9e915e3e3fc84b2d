"""A Lightning callback that trains with a regrow sparsifier.

    from regrow.integrations.lightning import RegrowCallback
    trainer = lightning.Trainer(max_epochs=10, callbacks=[RegrowCallback("rigl", sparsity=0.9)])
    trainer.fit(module, data)                        # or trainer.fit(module, data, ckpt_path="last.ckpt")

The sparsifier is built at ``on_fit_start`` on the LightningModule and its (first) optimizer with ``total_steps`` =
``trainer.estimated_stepping_batches``, and steps after every optimizer step (automatic optimisation; with
``accumulate_grad_batches`` only the batches that end in a step count). Masks are buffers of the model, so
Lightning's checkpoints hold them, and the callback's own state (the sparsifier's schedule, history and random
state) goes into the checkpoint's callback section. Resuming ``fit`` from such a checkpoint installs both: the
fresh model has no mask buffers yet, so the callback takes the masks out of the checkpoint's state dict before
Lightning's (strict) load of the weights, builds the sparsifier at ``on_fit_start``, puts the loaded weights back
and installs the saved masks and schedule; Lightning then restores the optimizer state. A checkpoint written
without the callback is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..zoo import torchvision_ready
from . import SparsifierFactory, mask_entries

torchvision_ready()  # a CUDA torchvision wheel on the CPU torch would otherwise break the framework's import
from lightning.pytorch import Callback  # noqa: E402


class RegrowCallback(Callback):
    """Sparsify the LightningModule with ``method`` (a regrow method name or class) and its ``options``."""

    def __init__(self, method: str | type = "rigl", **options: Any):
        self.factory = SparsifierFactory(method, **options)
        self.sparsifier = None
        self._global_step = 0
        self._saved_masks: dict[str, torch.Tensor] | None = None  # taken out of a checkpoint being resumed
        self._saved_state: dict[str, Any] | None = None
        self._unwrap = None  # puts the module's own on_load_checkpoint back

    # ----- resume: masks out of the weights' load, back in once the sparsifier exists --------------------------
    def setup(self, trainer, pl_module, stage):
        # Lightning names the checkpoint it resumes from only once it reads it, after this hook: the module's
        # on_load_checkpoint, which runs just before the (strict) load of the weights, takes the masks out.
        if stage != "fit" or self.sparsifier is not None:
            return
        original = pl_module.on_load_checkpoint
        own = pl_module.__dict__.get("on_load_checkpoint")  # usually none: the hook is the class's method

        def unwrap():
            if own is None:
                pl_module.__dict__.pop("on_load_checkpoint", None)
            else:
                pl_module.__dict__["on_load_checkpoint"] = own

        self._unwrap = unwrap

        def take_masks(checkpoint):
            self._unwrap()
            original(checkpoint)
            state = checkpoint["state_dict"]
            self._saved_masks = {k: state.pop(k) for k in mask_entries(state)}

        pl_module.on_load_checkpoint = take_masks

    def state_dict(self) -> dict[str, Any]:
        return {"sparsifier": self.sparsifier.state_dict()} if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_state = state_dict.get("sparsifier")

    def on_fit_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"RegrowCallback works with one optimizer; this module has {len(trainer.optimizers)}")
        if self._unwrap is not None:  # the module's hook is its own again (it already is if a checkpoint was read)
            self._unwrap()
            self._unwrap = None
        if self.sparsifier is None:
            optimizer, total = trainer.optimizers[0], trainer.estimated_stepping_batches
            if trainer.ckpt_path is None:
                self.sparsifier = self.factory.build(pl_module, optimizer, total)
            elif not self._saved_masks or self._saved_state is None:
                raise CheckpointError(f"resuming from {trainer.ckpt_path}, which holds no RegrowCallback state: its "
                                      "masks cannot be restored (the checkpoint was not written with RegrowCallback);"
                                      " start a new run")
            else:  # Lightning restores the optimizer state after this hook
                self.sparsifier = self.factory.resume(pl_module, optimizer, total, self._saved_masks,
                                                      self._saved_state, trainer.ckpt_path)
                self._saved_masks = self._saved_state = None
        self._global_step = trainer.global_step

    def on_train_start(self, trainer, pl_module):
        self._global_step = trainer.global_step  # a resumed run's loops are restored after on_fit_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._global_step:  # an optimizer step happened in this batch
            self._global_step = trainer.global_step
            self.sparsifier.step()
