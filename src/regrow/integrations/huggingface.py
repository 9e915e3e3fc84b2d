"""A Hugging Face ``Trainer`` callback that trains with a regrow sparsifier.

    from regrow.integrations.huggingface import RegrowCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RegrowCallback("rigl", sparsity=0.9)])
    trainer.train()
    callback.sparsifier.finalize()          # optional: bake the masks into the weights

The sparsifier is built at ``on_train_begin`` on the Trainer's model and optimizer with ``total_steps`` =
``state.max_steps`` (schedule options given as fractions are fractions of that), and steps after every optimizer
step (``on_optimizer_step``: gradient accumulation gives one mask step per optimizer step, and RigL's dense gradient
is summed over the accumulated micro-batches). Masks are buffers of the model (``<layer>.weight_mask``), so the
Trainer's checkpoints hold them; the sparsifier's own schedule position is in ``callback.sparsifier.state_dict()``.
"""

from __future__ import annotations

from typing import Any

from ..zoo import torchvision_ready
from . import SparsifierFactory

torchvision_ready()  # a CUDA torchvision wheel on the CPU torch would otherwise break the framework's import
from transformers import TrainerCallback  # noqa: E402


class RegrowCallback(TrainerCallback):
    """Sparsify the Trainer's model with ``method`` (a regrow method name or class) and its ``options``."""

    def __init__(self, method: str | type = "rigl", **options: Any):
        self.factory = SparsifierFactory(method, **options)
        self.sparsifier = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.sparsifier is None:  # a second train() call (resume) keeps the masks it has
            self.sparsifier = self.factory.build(model, optimizer, state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.step()
