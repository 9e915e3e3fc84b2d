"""A Lightning callback that trains with a regrow sparsifier.

    from regrow.integrations.lightning import RegrowCallback
    trainer = lightning.Trainer(max_epochs=10, callbacks=[RegrowCallback("rigl", sparsity=0.9)])
    trainer.fit(module, data)

The sparsifier is built at ``on_fit_start`` on the LightningModule and its (first) optimizer with ``total_steps`` =
``trainer.estimated_stepping_batches``, and steps after every optimizer step (automatic optimisation; with
``accumulate_grad_batches`` only the batches that end in a step count). Masks are buffers of the model, so
Lightning's checkpoints hold them; resuming ``fit`` from such a checkpoint is not supported yet (the fresh model
has no masks to load them into).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..zoo import torchvision_ready
from . import SparsifierFactory

torchvision_ready()  # a CUDA torchvision wheel on the CPU torch would otherwise break the framework's import
from lightning.pytorch import Callback  # noqa: E402


class RegrowCallback(Callback):
    """Sparsify the LightningModule with ``method`` (a regrow method name or class) and its ``options``."""

    def __init__(self, method: str | type = "rigl", **options: Any):
        self.factory = SparsifierFactory(method, **options)
        self.sparsifier = None
        self._global_step = 0

    def on_fit_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"RegrowCallback works with one optimizer; this module has {len(trainer.optimizers)}")
        if self.sparsifier is None:
            self.sparsifier = self.factory.build(pl_module, trainer.optimizers[0],
                                                 trainer.estimated_stepping_batches)
        self._global_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._global_step:  # an optimizer step happened in this batch
            self._global_step = trainer.global_step
            self.sparsifier.step()

