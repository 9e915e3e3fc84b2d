"""A Hugging Face ``Trainer`` callback that trains with a regrow sparsifier.

    from regrow.integrations.huggingface import RegrowCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RegrowCallback("rigl", sparsity=0.9)])
    trainer.train()                                      # or trainer.train(resume_from_checkpoint=True)
    callback.sparsifier.finalize()                       # optional: bake the masks into the weights

The sparsifier is built at ``on_train_begin`` on the Trainer's model and optimizer with ``total_steps`` =
``state.max_steps`` (schedule options given as fractions are fractions of that), and steps after every optimizer
step (``on_optimizer_step``: gradient accumulation gives one mask step per optimizer step, and RigL's dense gradient
is summed over the accumulated micro-batches).

Checkpoints: the Trainer saves the weights (their dense values) but a fresh model has no masks to load the masks
into, and the sparsifier's schedule position is not the model's. So at every save the callback writes its own
file next to the Trainer's, ``checkpoint-N/regrow_sparsifier.safetensors`` (the masks and the sparsifier's state;
no pickle), and when training resumes from ``checkpoint-N`` it installs them: the resumed run has the masks and
the schedule it was saved with. A resume without that file is refused (it would start new masks on trained
weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..errors import CheckpointError
from ..zoo import torchvision_ready
from . import SparsifierFactory, mask_entries, unwrap_model

torchvision_ready()  # a CUDA torchvision wheel on the CPU torch would otherwise break the framework's import
from transformers import TrainerCallback  # noqa: E402

STATE_FILE = "regrow_sparsifier.safetensors"


class RegrowCallback(TrainerCallback):
    """Sparsify the Trainer's model with ``method`` (a regrow method name or class) and its ``options``."""

    def __init__(self, method: str | type = "rigl", **options: Any):
        self.factory = SparsifierFactory(method, **options)
        self.sparsifier = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.sparsifier is not None and state.global_step == self.sparsifier.step_count:
            return  # train() called again on the same model: the masks it has are the run's
        if state.global_step == 0:
            self.sparsifier = self.factory.build(model, optimizer, state.max_steps)
            return
        # Resuming from checkpoint-N: the Trainer has loaded its weights and optimizer state; the masks and the
        # schedule come from the callback's own file.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        path = folder / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"resuming from {folder}, which has no {STATE_FILE}: its masks cannot be restored "
                                  "(the checkpoint was not written with RegrowCallback); start a new run instead")
        sections, _ = checkpoint.load(path)
        self.sparsifier = self.factory.resume(model, optimizer, state.max_steps, sections["masks"],
                                              sections["sparsifier"], path)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.step()

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.sparsifier is None or not folder.is_dir() or not _is_writer(args):
            return
        weights = unwrap_model(model).state_dict()
        masks = {k: weights[k] for k in mask_entries(weights)}
        checkpoint.save(folder / STATE_FILE, {"masks": masks, "sparsifier": self.sparsifier.state_dict()},
                        {"kind": "regrow-huggingface-callback", "step": state.global_step})


def _is_writer(args) -> bool:
    """One process writes the file (the Trainer's own rule for its checkpoint files)."""
    return getattr(args, "should_save", True) and int(os.environ.get("RANK", "0")) == 0
