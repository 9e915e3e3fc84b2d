"""The reference trainer: SGD + cosine learning rate, a sparsifier step after every optimizer step, JSON-lines
metrics, atomic checkpoints every N steps, and a resume that ends bit-identical to an uninterrupted run.

Everything random in a run is a function of the seed and the step (data order, augmentation, the sparsifier's
own generator is checkpointed), so stopping after any checkpoint and resuming gives the same weights, masks and
metrics. The output folder holds ``checkpoint.safetensors`` (resumable state), ``metrics.jsonl``,
``model.safetensors`` (the final masked model) and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed, masking, methods
from .artifacts import (
    CHECKPOINT,
    METRICS,
    MODEL,
    RECIPE,
    RESULT_FILES,
    SUMMARY,
    build_model,
    example_inputs,
    load_model,
    model_metadata,
)
from .data import Dataset, batches_per_epoch, eval_batches, get_batch, load_dataset, subset_indices
from .env import environment, resolve_device, steady_allocator
from .errors import CheckpointError, ConfigError, TrainingDivergedError, check_sparsity
from .flops import forward_flops, layer_macs, sparse_macs
from .methods.channel import CHANNEL_PAPER_CYCLE
from .methods.iee import PAPER_CYCLE
from .models import create_model
from .recipe import write_recipe
from .runfolder import RunFolder
from .schedules import cosine_lr

# Options a resume may change: they do not change what a run computes (the device changes only the rounding:
# a run moved to another device goes on, but is bit-identical only to a run on that device).
_RESUME_FREE = {"data_dir", "checkpoint_every", "eval_every", "progress", "device"}
# Sparsifier arguments the trainer sets itself: as --opt they would be overridden (and recorded) without effect.
TRAINER_OPTIONS = {"sparsity", "distribution", "structure", "total_steps", "seed", "dense_first", "dense_last",
                   "latency_target", "cost", "input_shape", "input_dtype", "latency_batch"}
AMP_MODES = ("none", "bf16")
# Method defaults that changed since checkpoints without a record of them (``method_defaults``) were written, by
# sparsifier class (IEE for weights and for channels share a name, not their options): what such a checkpoint ran
# with (both IEEs: the paper's cycle), or UNRECORDED where that changed too among them (the resume must give it).
UNRECORDED = object()
UNRECORDED_DEFAULTS = {methods.IEE: {**PAPER_CYCLE, "never_active": UNRECORDED},
                       methods.ChannelIEE: CHANNEL_PAPER_CYCLE}


def method_defaults(cls: type) -> dict[str, Any]:
    """A sparsifier class's defaults, as a recipe and a checkpoint record them. Only plain values (str, number,
    bool, None): a default such as an empty exclusion tuple means the same in every version that takes the option.
    Training options (sparsity, latency target, ...) are the run's own keys."""
    return {k: v for k, v in methods.method_options(cls).items()
            if k not in TRAINER_OPTIONS and (v is None or isinstance(v, (str, int, float, bool)))}


@dataclass
class TrainConfig:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    method: str = "rigl"
    sparsity: float = 0.9
    distribution: str = "erk"
    structure: str = "unstructured"
    method_options: dict[str, Any] = field(default_factory=dict)
    dense_first: bool = False
    dense_last: bool = False
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = True
    # NHWC memory layout: 1.2x faster convolutions on CPU (bench/overhead.py); no effect on models without convs
    channels_last: bool = True
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available)
    amp: str = "none"  # "bf16": forward and loss under bfloat16 autocast
    compile: bool = False  # torch.compile the training forward (measured in bench/overhead.py; opt-in, see README)
    # Channel structure (structure="channel", methods halp / iee): the budget is a cost, not a sparsity.
    latency_target: float = 0.5  # fraction of the dense model's cost
    # the budget given as a time (ms, at latency_batch on the run's device): latency_target is then that time over
    # the dense model's forward (latency_dense_ms), measured once when the run starts (resolve_latency_ms)
    latency_target_ms: float | None = None
    latency_dense_ms: float | None = None
    cost: str = "latency"  # "latency" (table measured on this device) or "macs"
    latency_batch: int = 64  # batch size the latency table is measured at
    init_from: str | None = None  # a dense model.safetensors to start from (HALP's pretrained model)
    train_subset: int | None = None
    synthetic_size: int = 512
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1  # epochs between test evaluations (the last step is always evaluated)
    checkpoint_every: int = 0  # steps; 0: only at the end of every epoch
    progress: bool = True

    def validate(self) -> None:
        cls = methods.resolve(self.method, self.structure)  # an unknown method fails here, before any work
        if self.structure == "channel":
            if not isinstance(self.latency_target, (int, float)) or not 0 < self.latency_target < 1:
                raise ConfigError(f"latency_target is a fraction of the dense model's cost in (0, 1), "
                                  f"got {self.latency_target!r}")
        elif cls is not methods.Dense:
            check_sparsity(self.sparsity)
        if self.latency_target_ms is not None:
            if self.structure != "channel" or self.cost != "latency":
                raise ConfigError("a budget in milliseconds is a measured latency: it takes --structure channel and "
                                  "--cost latency")
        for name in ("latency_target_ms", "latency_dense_ms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (math.isfinite(value) and value > 0)):
                raise ConfigError(f"{name} must be a positive number of milliseconds, got {value!r}")
        if self.latency_dense_ms is not None and self.latency_target_ms is None:
            raise ConfigError("latency_dense_ms is the dense latency a budget in milliseconds was converted with; "
                              "it needs latency_target_ms")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every,
                    "eval_every": self.eval_every}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ConfigError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        for name in ("momentum", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:  # also false for NaN
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ConfigError(f"warmup_epochs must be a number >= 0, got {self.warmup_epochs}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        for name in ("latency_batch", "synthetic_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.train_subset is not None and (not isinstance(self.train_subset, int) or self.train_subset <= 0):
            raise ConfigError(f"train_subset must be a positive integer, got {self.train_subset!r}")
        trainer_keys = sorted(set(self.method_options) & TRAINER_OPTIONS)
        if trainer_keys:
            raise ConfigError(f"{', '.join(trainer_keys)} is a training option, not a method option: use "
                              f"--{trainer_keys[0].replace('_', '-')} instead of --opt {trainer_keys[0]}=...")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"unknown amp mode {self.amp!r}; known: {', '.join(AMP_MODES)}")
        resolve_device(self.device)

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUME_FREE}


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1000) -> tuple[float, float]:
    """(top-1 accuracy in [0, 1], mean cross-entropy) on ``data``, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for x, y in eval_batches(data, batch_size):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data), loss_sum / len(data)


def check_logits(model: nn.Module, sample: torch.Tensor, num_classes: int) -> None:
    """The trainer evaluates (and by default trains) on ``model(x)`` as class logits: say so before training if the
    forward returns anything else (a tuple, a dict, another width)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    finally:
        model.train(was_training)
    if not torch.is_tensor(out):
        raise ConfigError(f"the model's forward returns a {type(out).__name__}, and regrow's trainer needs the class "
                          f"logits as one tensor (batch, {num_classes}): wrap the model so that it returns them")
    if out.dim() != 2 or out.shape != (sample.shape[0], num_classes):
        raise ConfigError(f"the model's forward returns a tensor of shape {tuple(out.shape)} for a batch of "
                          f"{sample.shape[0]}; regrow's trainer needs class logits (batch, {num_classes})")


def layer_table(model: nn.Module, macs: dict[str, int]) -> list[dict[str, Any]]:
    """Per prunable layer: name, shape, numel, density, MACs (dense), and the output and input units left with no
    active weight (:func:`masking.dead_units`) — the ``layers`` field of a summary."""
    table = []
    for name, m in masking.prunable_layers(model).items():
        dead_outputs, dead_inputs = masking.dead_units(m)
        table.append({"name": name, "shape": list(m.weight.shape), "numel": m.weight.numel(),
                      "density": masking.density(m), "macs": macs.get(name, 0),
                      "dead_outputs": dead_outputs, "dead_inputs": dead_inputs})
    return table


def run_length(config: TrainConfig, samples: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of ``config`` on a training set of ``samples``."""
    steps_per_epoch = batches_per_epoch(samples, config.batch_size)
    total = config.epochs * steps_per_epoch
    return steps_per_epoch, total if config.max_steps is None else min(total, config.max_steps)


def _set_up_device(device: torch.device) -> None:
    if device.type == "cpu":
        steady_allocator()  # freed activations stay in the process: no page faults every step (same numbers)
    else:  # the same kernels on every run, so that a resumed run repeats an uninterrupted one
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def build_trainer(config: TrainConfig, out: str | os.PathLike) -> Trainer:
    """The trainer a :class:`TrainConfig` describes: its data, its model (on its device), SGD with Nesterov
    momentum, its sparsifier. The command line, the benchmarks and the tests all start runs here."""
    config.validate()
    config, _ = resolve_latency_ms(config, out)  # a budget in ms: the fraction of the dense model it is, once
    c = config
    device = distributed.local_device(resolve_device(c.device))  # the Trainer sets it up (allocator, kernels)
    torch.manual_seed(c.seed)
    train_data = load_dataset(c.dataset, "train", c.data_dir, synthetic_size=c.synthetic_size, seed=c.seed)
    test_data = load_dataset(c.dataset, "test", c.data_dir, synthetic_size=c.synthetic_size, seed=c.seed)
    if c.train_subset is not None:
        train_data = train_data.subset(subset_indices(train_data.labels, c.train_subset, c.seed))
    if c.augment and (train_data.images.dim() != 4 or not train_data.images.is_floating_point()):
        raise ConfigError(f"augmentation crops and flips images (N, C, H, W); {c.dataset} has samples of shape "
                          f"{list(train_data.images.shape[1:])}: pass --no-augment")
    model = create_model(c.model, in_channels=train_data.in_channels, num_classes=train_data.num_classes,
                         input_size=train_data.input_size)
    pretrain = _load_pretrained(model, c.init_from, c.model) if c.init_from is not None else None
    # Initialised on the CPU, then moved: the same seed gives the same start on every device.
    model = model.to(device)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                                nesterov=c.nesterov and c.momentum > 0, weight_decay=c.weight_decay)
    _, total_steps = run_length(c, len(train_data))
    options = dict(c.method_options)
    if c.structure == "channel":
        options.update(structure="channel", latency_target=c.latency_target, cost=c.cost,
                       input_shape=tuple(train_data.images.shape[1:]), latency_batch=c.latency_batch,
                       input_dtype="float" if train_data.images.is_floating_point() else "int64")
    elif c.method != "dense":
        options.update(sparsity=c.sparsity, distribution=c.distribution, structure=c.structure,
                       dense_first=c.dense_first, dense_last=c.dense_last)
    sparsifier = methods.create(c.method, model, optimizer, total_steps=total_steps, seed=c.seed, **options)
    return Trainer(model, optimizer, sparsifier, train_data, test_data, out, config=c, pretrain=pretrain,
                   _checked=True)


def resolve_latency_ms(config: TrainConfig, out: str | os.PathLike, passes: int = 3,
                       repeats: int = 30) -> tuple[TrainConfig, dict[str, Any] | None]:
    """A budget given as a time (``latency_target_ms``) turned into what the channel methods take, a fraction of
    the dense model's cost: that time over the dense model's forward (``latency_dense_ms``) at ``latency_batch`` on
    the run's device, with the threads set now (as the latency table is measured), the median of ``passes`` medians
    of ``repeats`` runs. The table's cells and the real forward differ in scale but agree in ratios
    (``bench/latency_fidelity.py``), so a fraction, not a time, is what the table can price. Measured once: a config
    that has ``latency_dense_ms`` already, or a run folder whose checkpoint was converted from the same time, keeps
    that measurement, so a resume repeats the run (the run's recipe records the fraction). Returns the config with
    ``latency_target`` and ``latency_dense_ms`` set (a copy) and ``{"dense_ms", "fraction", "measured"}``, or
    ``(config, None)`` for a budget given as a fraction."""
    if config.latency_target_ms is None:
        return config, None
    config.validate()
    dense_ms, measured = config.latency_dense_ms, False
    path = Path(out) / CHECKPOINT
    if dense_ms is None and path.is_file():
        saved = checkpoint.read_metadata(path).get("config", {})
        if saved.get("latency_target_ms") == config.latency_target_ms:
            dense_ms = saved.get("latency_dense_ms")
    if dense_ms is None:
        from .latency_report import paired_timing

        device = resolve_device(config.device)
        data = load_dataset(config.dataset, "test", config.data_dir, synthetic_size=config.synthetic_size,
                            seed=config.seed)
        torch.manual_seed(config.seed)
        meta = model_metadata(config.model, config.dataset, "dense", data)
        dense = build_model(meta).to(device).eval()  # timed as regrow bench-latency times the dense model
        x = example_inputs(meta, samples=config.latency_batch, seed=config.seed).to(device)
        dense_ms, measured = paired_timing({"dense": dense}, x, passes=passes, repeats=repeats)["dense"]["ms"], True
    fraction = config.latency_target_ms / dense_ms
    if not fraction < 1:
        raise ConfigError(f"the dense {config.model} runs in {dense_ms:.3g} ms at batch {config.latency_batch} on "
                          f"this device, within the {config.latency_target_ms:g} ms asked for: nothing to prune")
    resolved = dataclasses.replace(config, latency_target=fraction, latency_dense_ms=dense_ms)
    return resolved, {"dense_ms": dense_ms, "fraction": fraction, "measured": measured}


def _load_pretrained(model: nn.Module, path: str, name: str) -> dict[str, Any]:
    """Start from a dense trained model; its training cost is kept for the summary (HALP's cost includes it)."""
    pretrained, _ = load_model(path, expect_model=name)
    if masking.masked_layers(pretrained):
        raise CheckpointError(f"{path} holds a sparse model; --init-from takes a dense one "
                              "(regrow train --method dense)")
    model.load_state_dict(pretrained.state_dict())
    summary_path = Path(path).with_name(SUMMARY)
    cost = {"path": str(path), "train_flops": None, "wall_seconds": None}
    if summary_path.is_file():
        source = json.loads(summary_path.read_text())
        cost.update(train_flops=source.get("train_flops"), wall_seconds=source.get("wall_seconds"),
                    test_accuracy=source.get("test_accuracy"))
    return cost


class Trainer:
    """One training run into ``out``, handed its pieces; :meth:`run` trains (or resumes) and returns the summary.

    ``config`` holds the loop's settings (batch size, epochs or max_steps, seed, learning rate, augmentation,
    logging, checkpoints, device options) and is what the run records; its ``model`` and ``dataset`` must name
    the model and data handed in (a registry name or ``package.module:factory``), so that the saved model can
    be rebuilt: a model of another architecture than ``config.model`` builds is refused. ``loss_fn(logits,
    labels)`` defaults to cross-entropy with ``config.label_smoothing``; ``lr_schedule(step)`` to the cosine
    schedule from ``config.lr`` with ``config.warmup_epochs`` of warm-up. With a ``teacher`` (a module, left in
    the mode it is given in and never trained) the run distils: every step also runs the teacher on the batch,
    without gradients, and calls ``loss_fn(logits, labels, teacher_logits, epoch)``; its forward counts in the
    training FLOPs (dense). :func:`build_trainer` builds every piece from a config."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: methods.BaseSparsifier,
                 train_data: Dataset, test_data: Dataset, out: str | os.PathLike, *, config: TrainConfig,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 lr_schedule: Callable[[int], float] | None = None, pretrain: dict[str, Any] | None = None,
                 teacher: nn.Module | None = None, _checked: bool = False):
        if not _checked:
            config.validate()
            _check_architecture(model, config, train_data)
            _check_sparsifier(sparsifier, config)
        self.config = c = config
        self.out = Path(out)
        self.model, self.optimizer, self.sparsifier = model, optimizer, sparsifier
        self.method_defaults = method_defaults(type(sparsifier))  # what the recipe and every checkpoint record
        self.train_data, self.test_data, self.pretrain = train_data, test_data, pretrain
        if teacher is not None and loss_fn is None:
            raise ConfigError("a teacher needs a loss_fn(logits, labels, teacher_logits, epoch) to distil with")
        self.teacher = teacher
        self.device = next(model.parameters()).device
        _set_up_device(self.device)
        self.rank, self.world = distributed.world()
        if self.world > 1:
            _check_data_parallel(c, len(train_data), self.world)
        # Training steps may run a compiled wrapper; everything else (evaluation, checkpoints) uses the model itself.
        # Static shapes: a recompile (masks' gradient capture switching on and off) must not turn on dynamic
        # shapes, with which inductor failed to lower a strided conv's backward (torch 2.13, RigL on ResNet-8).
        # Several processes: DDP averages the parameters' gradients over the ranks' slices of each batch (the
        # sparsifier averages the dense gradients it scores with, and checks that the masks stay equal).
        self.forward = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # A channels_last model's gradients are copied into DDP's contiguous buckets: a cost, not an error.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.forward, dynamic=False) if c.compile else self.forward
        self.steps_per_epoch, self.total_steps = run_length(c, len(train_data))
        warmup = int(round(c.warmup_epochs * self.steps_per_epoch))
        self.lr_schedule = lr_schedule or (lambda step: cosine_lr(step, self.total_steps, c.lr, warmup=warmup))
        self.loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, label_smoothing=c.label_smoothing))
        images = self.train_data.images
        tokens = None if images.is_floating_point() else images.dtype  # ids: the MACs are measured on zeros
        self.macs = layer_macs(self.model, tuple(images.shape[1:]), tokens)
        check_logits(self.model, self.train_data.images[:2].to(self.device), self.train_data.num_classes)
        self.dense_forward = forward_flops(self.macs)
        self.state: dict[str, Any] = {"step": 0, "train_flops": 0.0, "dense_train_flops": 0.0,
                                      "wall_seconds": 0.0, "loss_sum": 0.0, "loss_count": 0,
                                      "explore_loss_sum": 0.0, "explore_loss_count": 0, "evaluations": []}

    # ----- persistence ------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        c = self.config
        return {**model_metadata(c.model, c.dataset, c.method, self.train_data), "kind": "training",
                "config": self.config.fingerprint(), "method_defaults": self.method_defaults,
                "step": self.state["step"], "threads": torch.get_num_threads(), "device": self.device.type,
                "processes": self.world}

    def save_checkpoint(self) -> None:
        """Write the resumable state (rank 0 only: every rank holds the same model, masks and optimizer)."""
        if self.rank != 0:
            return
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise TrainingDivergedError(f"parameter {name} is not finite at step {self.state['step']}; "
                                            "the previous checkpoint is kept")
        sections = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "sparsifier": self.sparsifier.state_dict(), "trainer": self.state,
                    "rng": torch.get_rng_state()}
        if self.device.type == "cuda":  # the model's own randomness (dropout) on the GPU
            sections["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        checkpoint.save(self.out / CHECKPOINT, sections, self._metadata())

    def restore(self) -> None:
        path = self.out / CHECKPOINT
        sections, meta = checkpoint.load(path)
        if meta.get("kind") != "training":
            raise CheckpointError(f"{path} is not a training checkpoint")
        saved, current = dict(meta.get("config", {})), self.config.fingerprint()
        defaults = TrainConfig().fingerprint()  # options added since the checkpoint was written count as defaults
        # The method runs with its options as given over its defaults; compare those, so that a default changed since
        # the checkpoint was written is caught (and can be given back with --opt), while giving a default's value
        # explicitly is no change. Options a checkpoint does not record (added since, or a checkpoint from before
        # defaults were recorded) count at today's defaults.
        given, asked = saved.pop("method_options", {}), current.pop("method_options")
        # an option added since (with a new default) ran as runs did before it, unless the checkpoint records it
        ran = {**self.method_defaults, **type(self.sparsifier).added_options, **meta.get("method_defaults", {}),
               **given}
        runs = {**self.method_defaults, **asked}
        if "method_defaults" not in meta:
            for key, value in UNRECORDED_DEFAULTS.get(type(self.sparsifier), {}).items():
                if key in given:
                    continue
                if value is UNRECORDED and key not in asked:
                    raise CheckpointError(f"cannot resume {path}: it was saved before checkpoints recorded the "
                                          f"method's defaults, and the default of {key} has changed since; give the "
                                          f"value it ran with (--opt {key}=...)")
                ran[key] = runs[key] if value is UNRECORDED else value
        diff = sorted(k for k in set(saved) | set(current)
                      if saved.get(k, defaults.get(k)) != current.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
            raise CheckpointError(f"cannot resume {path}: the configuration differs ({details})")
        diff = sorted(k for k in set(ran) | set(runs) if ran.get(k) != runs.get(k))
        if diff:
            details = ", ".join(f"{k}: {ran.get(k)!r} -> {runs.get(k)!r}" for k in diff[:5])
            raise CheckpointError(f"cannot resume {path}: the method's options differ ({details}); a default that "
                                  "changed since it was saved can be given back with --opt key=value")
        for what, then, now in (("threads", meta.get("threads"), torch.get_num_threads()),
                                ("device", meta.get("device"), self.device.type),
                                ("processes", meta.get("processes", 1), self.world)):
            if then is not None and then != now:  # other kernels or summation orders: close, but not the same bits
                warnings.warn(f"resuming {path} with {what} {now}; it was saved with {then}: the run goes on, but "
                              "will not be bit-identical to one that was never interrupted", stacklevel=2)
        masking.load_state_dict(self.model, sections["model"])
        self.optimizer.load_state_dict(sections["optimizer"])
        self.sparsifier.load_state_dict(sections["sparsifier"])
        self.state = sections["trainer"]
        self.state.setdefault("explore_loss_sum", 0.0)  # checkpoints written before exploration was logged apart
        self.state.setdefault("explore_loss_count", 0)
        torch.set_rng_state(sections["rng"])
        if self.device.type == "cuda" and "cuda_rng" in sections:
            torch.cuda.set_rng_state(sections["cuda_rng"], self.device)
        if self.rank == 0:
            self._truncate_metrics(self.state["step"])

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / METRICS
        if not path.exists():
            return
        kept, dropped = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and isinstance(record.get("step"), int)
            except ValueError:
                ok = False
            if ok and record["step"] <= step:
                kept.append(line)
            elif line.strip() and not ok:
                dropped += 1  # a line cut short by a crash, or an edit: the checkpoint is what counts
        if dropped:
            warnings.warn(f"{path}: {dropped} damaged line(s) dropped on resume", stacklevel=3)
        checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in kept)))

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----- the loop ---------------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, bool]:
        """One optimizer step and the sparsifier's step; returns the loss and whether it was an exploration step
        (IEE's exploration runs a denser network than the sparse one, so its loss is logged apart)."""
        c = self.config
        epoch, index = divmod(step, self.steps_per_epoch)
        # Batches are made on the CPU from seeded generators, the same on every device, then moved.
        x, y = get_batch(self.train_data, c.batch_size, c.seed, epoch, index, train_augment=c.augment)
        global_batch = x.shape[0]
        if self.world > 1:  # this rank's slice of the batch every rank drew alike
            x, y = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if c.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = self.lr_schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        densities = self.sparsifier.forward_densities()
        exploring = self.sparsifier.exploring
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.amp == "bf16"):
            if self.teacher is None:
                loss = self.loss_fn(self.forward(x), y)
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                loss = self.loss_fn(self.forward(x), y, teacher_logits, epoch)
        if self.world > 1:
            # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the batch makes
            # that average the gradient of the whole batch's mean loss, slices of unequal size included.
            loss = loss * (x.shape[0] * self.world / global_batch)
            logged = distributed.average(loss.detach())
        else:
            logged = loss.detach()
        if not torch.isfinite(logged):
            raise TrainingDivergedError(
                f"loss is {logged.item()} at step {step + 1} (epoch {epoch}); training stopped and the last "
                f"checkpoint (step {self._last_saved}) was left as it was. Try a smaller --lr.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sparsifier.step()
        batch = global_batch  # the FLOPs of all ranks together: the same count as one process
        self.state["train_flops"] += 3 * forward_flops(self.macs, densities) * batch \
            + self.sparsifier.extra_flops(self.macs, batch)
        if self.teacher is not None:
            self.state["train_flops"] += self.dense_forward * batch
        self.state["dense_train_flops"] += 3 * self.dense_forward * batch
        return logged.item(), exploring

    def run(self, resume: bool = False, stop_after: int | None = None,
            overwrite: bool = False) -> dict[str, Any] | None:
        """Train to the end (or, for tests, stop after checkpointing at step ``stop_after``).

        The output folder is locked for the whole run (a second writer is refused). A folder that already holds a
        run is refused unless ``resume`` (continue it from its checkpoint) or ``overwrite`` (replace it).

        Under data parallelism every rank calls this; rank 0 alone writes the folder and returns the summary, the
        others return ``None`` once it is written."""
        with RunFolder(self.out) if self.rank == 0 else nullcontext():
            result = self._run(resume, stop_after, overwrite)
        distributed.barrier()  # the folder is complete before any rank returns
        return result

    def _run(self, resume: bool, stop_after: int | None, overwrite: bool) -> dict[str, Any] | None:
        existing = [name for name in RESULT_FILES if (self.out / name).exists()]
        distributed.barrier()  # every rank has looked before rank 0 writes the recipe (else it sees a finished run)
        if resume:
            if overwrite:
                raise ConfigError("--resume continues a run and --overwrite replaces it: choose one")
            self.restore()
        elif existing and not overwrite:
            what = ("a run to resume (pass --resume)" if CHECKPOINT in existing else "a finished run"
                    if SUMMARY in existing else "an unfinished run without a checkpoint (nothing to resume)")
            raise CheckpointError(f"{self.out} already holds {what}: {', '.join(existing)}; pass --overwrite to "
                                  "replace it, or choose another --out")
        elif self.rank == 0:
            for name in existing:
                (self.out / name).unlink()
        if self.teacher is None and self.rank == 0:  # a recipe cannot name a teacher: its caller repeats the run
            write_recipe(self.out / RECIPE, self.config, self.method_defaults)
        distributed.barrier()  # rank 0 has cleared the folder before any rank goes on
        self._last_saved = self.state["step"]
        c = self.config
        self.sparsifier.before_training(progress=c.progress)  # e.g. a latency table, measured before any step
        start_time = time.perf_counter()
        bar = _progress(self.total_steps, self.state["step"], enabled=c.progress, desc=f"{c.method} {c.model}")
        try:
            for step in range(self.state["step"], self.total_steps):
                loss, exploring = self.train_step(step)
                self.state["step"] = step + 1
                prefix = "explore_loss" if exploring else "loss"
                self.state[f"{prefix}_sum"] += loss
                self.state[f"{prefix}_count"] += 1
                bar.update(1)
                if (step + 1) % c.log_every == 0:
                    record = {"step": step + 1, "epoch": step // self.steps_per_epoch, "loss": None,
                              "lr": self.optimizer.param_groups[0]["lr"],
                              "sparsity": self.sparsifier.actual_sparsity()}
                    for key in ("loss", "explore_loss"):  # means over this log interval's steps of each kind
                        if self.state[f"{key}_count"]:
                            record[key] = self.state[f"{key}_sum"] / self.state[f"{key}_count"]
                        self.state[f"{key}_sum"], self.state[f"{key}_count"] = 0.0, 0
                    self._log(record)
                    if record["loss"] is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}")
                epoch_end = (step + 1) % self.steps_per_epoch == 0 or step + 1 == self.total_steps
                evaluated = step + 1 == self.total_steps or (
                    epoch_end and (step // self.steps_per_epoch + 1) % c.eval_every == 0)
                if evaluated and self.rank == 0:  # the same model on every rank: rank 0 evaluates it
                    with self.sparsifier.sparse_view():
                        accuracy, test_loss = evaluate(self.model, self.test_data)
                    record = {"step": step + 1, "epoch": step // self.steps_per_epoch,
                              "test_accuracy": accuracy, "test_loss": test_loss,
                              "sparsity": self.sparsifier.actual_sparsity()}
                    self.state["evaluations"].append(record)
                    self._log(record)
                    bar.set_postfix(acc=f"{accuracy:.4f}")
                if epoch_end or (c.checkpoint_every and (step + 1) % c.checkpoint_every == 0):
                    self.state["wall_seconds"] += time.perf_counter() - start_time
                    start_time = time.perf_counter()
                    self.save_checkpoint()
                    self._last_saved = step + 1
                if stop_after is not None and step + 1 >= stop_after and self._last_saved == step + 1:
                    return None
        finally:
            bar.close()
        return self.finish() if self.rank == 0 else None

    def finish(self) -> dict[str, Any]:
        c, s = self.config, self.state
        final = s["evaluations"][-1]
        layers = layer_table(self.model, self.macs)
        params_total = sum(p.numel() for p in self.model.parameters())
        pruned = sum(int((m.weight_mask == 0).sum()) for m in masking.masked_layers(self.model).values())
        weights = masking.weight_sparsity(self.model, self.sparsifier.skipped)
        summary = {
            "method": c.method, "model": c.model, "dataset": c.dataset,
            "sparsity_target": 0.0 if c.method == "dense" else c.sparsity,
            # over every weight matrix of the model; sparsity_masked: over the layers the method sparsified
            "sparsity_actual": weights["sparsity"], "sparsity_masked": self.sparsifier.actual_sparsity(),
            "left_dense": {} if c.method == "dense" else weights["left_dense"],
            "distribution": c.distribution, "structure": c.structure,
            "test_accuracy": final["test_accuracy"], "test_loss": final["test_loss"],
            "test_accuracy_per_epoch": [e["test_accuracy"] for e in s["evaluations"]],
            "evaluated_epochs": [e["epoch"] for e in s["evaluations"]],  # all of them unless eval_every > 1
            "train_flops": s["train_flops"], "dense_train_flops": s["dense_train_flops"],
            "train_flops_ratio": s["train_flops"] / s["dense_train_flops"],
            "wall_seconds": s["wall_seconds"], "steps": s["step"], "epochs": c.epochs, "seed": c.seed,
            "params_total": params_total, "params_nonzero": params_total - pruned,
            "macs_dense": sum(self.macs.values()),
            "macs_sparse": sparse_macs(self.macs, {layer["name"]: layer["density"] for layer in layers}),
            "layers": layers, "skipped_layers": self.sparsifier.skipped,
            "mask_updates": len(self.sparsifier.history), "mask_metrics": self.sparsifier.tracker.summary(),
            "config": dataclasses.asdict(c), "environment": {**environment(self.device), "processes": self.world},
            # what the method ran with: the options given over its defaults (config holds only the given ones)
            "method_options": {**self.method_defaults, **c.method_options},
        }
        summary.update(self.sparsifier.summary_fields())
        if self.pretrain is not None:
            summary["pretrain"] = self.pretrain
            if self.pretrain["train_flops"] is not None:
                total = self.pretrain["train_flops"] + s["train_flops"]
                summary["total_train_flops"] = total
                summary["total_train_flops_ratio"] = total / s["dense_train_flops"]
        meta = {**model_metadata(c.model, c.dataset, c.method, self.train_data),
                "sparsity_actual": summary["sparsity_actual"], "test_accuracy": summary["test_accuracy"]}
        checkpoint.save(self.out / MODEL, {"model": self.model.state_dict()}, meta)
        checkpoint.write_json(self.out / SUMMARY, summary)
        return summary


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", leave=False,
                dynamic_ncols=True)


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Train ``config`` into ``out`` and return the summary (also written to ``out/summary.json``)."""
    return build_trainer(config, out).run(resume=resume, overwrite=overwrite)


def train_parallel(config: TrainConfig, out: str | os.PathLike, nproc: int, resume: bool = False,
                   overwrite: bool = False) -> dict[str, Any]:
    """Train ``config`` with ``nproc`` data-parallel processes on this machine (one GPU each with a CUDA device,
    Gloo on the CPU): each process takes its slice of every batch, so ``config.batch_size`` is the global batch and
    the run computes what one process would (up to float rounding; BatchNorm statistics are each rank's own, as in
    plain DDP). Returns the summary rank 0 wrote."""
    if nproc == 1:
        return train(config, out, resume=resume, overwrite=overwrite)
    config.validate()
    # What several processes cannot do is refused here, before any process starts.
    train_data = load_dataset(config.dataset, "train", config.data_dir, synthetic_size=config.synthetic_size,
                              seed=config.seed)
    _check_data_parallel(config, min(len(train_data), config.train_subset or len(train_data)), nproc)
    distributed.launch(train, nproc, (config, out, resume, overwrite), device=config.device)
    return json.loads((Path(out) / SUMMARY).read_text())


def _check_data_parallel(config: TrainConfig, samples: int, world: int) -> None:
    """What several processes cannot do (yet), refused before any step."""
    last = samples % config.batch_size or config.batch_size
    if min(config.batch_size, last) < world:
        raise ConfigError(f"a batch of {min(config.batch_size, last)} samples cannot be split over {world} "
                          "processes: use a larger batch size or fewer processes")
    if config.structure == "channel" and config.cost == "latency":
        raise ConfigError("channel structure with a measured latency table is single-process for now (each "
                          "process would time its own table and choose other channels): use --cost macs, or one "
                          "process")


def _check_sparsifier(sparsifier: methods.BaseSparsifier, config: TrainConfig) -> None:
    """The summary records the config's method and target: refuse a sparsifier that is something else."""
    cls = methods.resolve(config.method, config.structure)
    if type(sparsifier) is not cls:
        raise ConfigError(f"config.method {config.method!r} is {cls.__name__}, but the sparsifier given is a "
                          f"{type(sparsifier).__name__}: the run would be recorded as another method")
    if cls is methods.Dense or config.structure == "channel":
        return
    given = (sparsifier.sparsity, sparsifier.distribution, sparsifier.structure.name)
    recorded = (config.sparsity, config.distribution, config.structure)
    if given != recorded:
        raise ConfigError(f"the sparsifier has sparsity, distribution, structure {given}, the config records "
                          f"{recorded}: make them the same")


def _check_architecture(model: nn.Module, config: TrainConfig, data: Dataset) -> None:
    """A model file records ``config.model`` to rebuild the model from: refuse a model it would not rebuild."""
    meta = model_metadata(config.model, config.dataset, config.method, data)
    with torch.random.fork_rng(devices=[]):  # building the reference must not move the run's random stream
        reference = build_model(meta)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_mask")}
    if want != have:
        differ = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise ConfigError(f"config.model {config.model!r} builds another architecture than the model given "
                          f"(first difference: {differ[0]}); name the model's own factory (package.module:name) "
                          "so that its saved file can be rebuilt")
