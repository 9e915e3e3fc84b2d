"""Post-training sparsity, end to end: a dense trained model and a small calibration set in, a sparse model and a
``summary.json`` out (``regrow pts CHECKPOINT --method unipts|pot|wanda|magnitude|package.module:Class``).

:class:`PostTraining` loads the dense model and the data, checks the options against the method's defaults, draws
the calibration set, hands the method (:mod:`regrow.posttraining.methods`) a copy of the dense model to sparsify,
and writes the run: the methods themselves live in ``methods`` (magnitude), ``pot``, ``wanda`` and ``unipts``.

Every prunable layer (all convs and Linear layers, the first and the classifier included, as UniPTS does) is
sparse. N:M keeps N of every M weights along the input dimension in every layer that can be split so; the
per-layer density is then fixed by the structure and UniPTS skips its search.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint, masking
from ..artifacts import MODEL, MODEL_KEYS, SUMMARY, build_model, check_data_fits, load_model, model_metadata
from ..data import Dataset, load_dataset
from ..env import environment
from ..errors import CheckpointError, ConfigError, TrainingDivergedError, check_sparsity
from ..flops import forward_flops, layer_macs, sparse_macs
from ..runfolder import RunFolder, check_writable
from ..structures import NM, Unstructured, get_structure
from ..training import evaluate, layer_table
from .calibration import calibration_set
from .methods import resolve_pts

_COUNTS = ("epochs", "batch_size", "population", "generations", "parents", "children", "mutants")


def _check_option_type(key: str, value: Any, default: Any) -> None:
    """An option has its default's kind: a finite number where the default is a number (``lr``'s None default
    takes a number too), a boolean where it is a boolean, text where it is text."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "true or false"
    elif isinstance(default, (int, float)) or key == "lr":
        ok = value is None and key == "lr" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                and math.isfinite(value))
        kind = "a finite number"
        if key in _COUNTS:
            ok, kind = ok and isinstance(value, int), "an integer"
    else:
        ok, kind = isinstance(value, str), "text"
    if not ok:
        raise ConfigError(f"option {key} must be {kind}, got {value!r}")


def method_defaults(method: str) -> dict[str, Any]:
    """The options of post-training method ``method`` with their defaults."""
    return dict(resolve_pts(method).defaults)


@dataclass
class PTSConfig:
    method: str = "unipts"
    sparsity: float | None = 0.9  # None under N:M: the structure decides
    structure: str = "unstructured"
    calibration_size: int = 1024
    balanced: bool = True  # class-balanced calibration set
    seed: int = 0
    dataset: str | None = None  # default: the dataset the checkpoint was trained on
    data_dir: str | None = None
    synthetic_size: int = 512
    options: dict[str, Any] = field(default_factory=dict)
    expect_model: str | None = None  # fail unless the checkpoint is of this architecture
    progress: bool = True
    exclude: tuple[str, ...] = ()  # layers left dense (listed), e.g. one that never runs as a module

    def resolved_options(self) -> dict[str, Any]:
        """The method's options: its defaults, overridden by ``options`` (unknown keys and bad values fail)."""
        cls = resolve_pts(self.method)
        defaults = dict(cls.defaults)
        unknown_keys = sorted(set(self.options) - set(defaults))
        if unknown_keys:
            raise ConfigError(f"unknown option(s) {', '.join(unknown_keys)} for pts method {self.method}; "
                              f"known: {', '.join(sorted(defaults))}")
        merged = {**defaults, **self.options}
        for key, allowed in cls.choices.items():
            if key in merged and merged[key] not in allowed:
                raise ConfigError(f"option {key} must be one of {', '.join(allowed)}, got {merged[key]!r}")
        for key, value in merged.items():
            _check_option_type(key, value, defaults[key])
        for key in ("epochs", "batch_size", "population", "generations", "parents"):
            if key in merged and (not isinstance(merged[key], int) or merged[key] < 1):
                raise ConfigError(f"option {key} must be a positive integer, got {merged[key]!r}")
        for key in ("children", "mutants", "warmup_epochs"):
            if key in merged and merged[key] < 0:
                raise ConfigError(f"option {key} must be >= 0, got {merged[key]!r}")
        for key in ("lr", "temperature", "tau_start", "ridge"):
            if merged.get(key) is not None and not merged[key] > 0:
                raise ConfigError(f"option {key} must be > 0, got {merged[key]!r}")
        for key in ("weight_decay", "srste", "fitness_noise"):
            if key in merged and merged[key] < 0:
                raise ConfigError(f"option {key} must be >= 0, got {merged[key]!r}")
        for key in ("momentum", "mutation_p", "tau_decay"):
            if key in merged and not 0 <= merged[key] <= 1:
                raise ConfigError(f"option {key} must be in [0, 1], got {merged[key]!r}")
        return merged

    def validate(self) -> tuple[Unstructured | NM, float, dict[str, Any]]:
        """Check the request; return the structure, the global target sparsity and the method's options."""
        structure = get_structure(self.structure)
        if isinstance(structure, NM):
            implied = 1 - structure.density
            if self.sparsity is not None and abs(float(self.sparsity) - implied) > 1e-9:
                raise ConfigError(f"{structure.name} sparsity keeps {structure.n} of every {structure.m} weights, "
                                  f"a sparsity of {implied:g}; it cannot express {self.sparsity} (omit --sparsity "
                                  f"or pass {implied:g})")
            target = implied
        else:
            if self.sparsity is None:
                raise ConfigError("unstructured post-training sparsity needs --sparsity")
            target = check_sparsity(self.sparsity)
        if not isinstance(self.calibration_size, int) or self.calibration_size <= 0:
            raise ConfigError(f"calibration size must be a positive integer, got {self.calibration_size!r}")
        options = self.resolved_options()
        resolve_pts(self.method).check(options, target, structure)
        return structure, target, options


def _split(config: PTSConfig, dataset: str, split: str) -> Dataset:
    # (the synthetic set is its seed-0 draw: the templates a model trained with --seed 0 has learnt)
    return load_dataset(dataset, split, config.data_dir, synthetic_size=config.synthetic_size)


def _load_dense(path: str | Path, config: PTSConfig) -> tuple[nn.Module, dict[str, Any], Path, Dataset]:
    """The dense model at ``path`` (a regrow model file, or a plain safetensors state dict of
    ``config.expect_model`` trained on ``config.dataset``), its metadata, the file, and the training split."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL
    if not path.is_file():
        raise CheckpointError(f"no model at {path}: pass a model.safetensors or the --out folder of regrow train")
    plain = checkpoint.load_plain(path)
    if plain is not None:  # a user's own state dict: the architecture and the data must be named
        if config.expect_model is None or config.dataset is None:
            raise ConfigError(f"{path} is a plain safetensors state dict: name its architecture with --model "
                              "(a registry name or package.module:factory) and its data with --dataset")
        train = _split(config, config.dataset, "train")
        meta = model_metadata(config.expect_model, config.dataset, "dense", train)
        model = build_model(meta)
        masking.load_state_dict(model, plain)  # a state dict of another architecture: an error naming the keys
        if masking.masked_layers(model):
            raise CheckpointError(f"{path} holds masks; post-training sparsity starts from a dense model")
        return model, meta, path, train
    model, meta = load_model(path, expect_model=config.expect_model)
    if masking.masked_layers(model):
        raise CheckpointError(f"{path} holds a sparse model; post-training sparsity starts from a dense one "
                              "(regrow train --method dense)")
    return model, meta, path, _split(config, config.dataset or meta["dataset"], "train")


def _sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1 - sum(int(m.sum()) for m in masks.values()) / total


class _Cost:
    """Training FLOPs of a post-training run: 2 × MACs per sample of every forward as it ran (a forward at the
    layers' densities; a backward is 2 forwards, its weight gradient dense under the straight-through estimator)."""

    def __init__(self, macs: dict[str, int]):
        self.macs, self.flops, self.samples = macs, 0.0, 0

    def forward(self, samples: int, densities: dict[str, float] | None = None, factor: float = 1.0) -> None:
        self.flops += factor * forward_flops(self.macs, densities) * samples


class PostTraining:
    """One post-training run; :meth:`run` returns the summary (also written to ``out/summary.json``)."""

    labelled = True  # the calibration set is a labelled subset of the training data

    def __init__(self, config: PTSConfig, checkpoint_path: str | Path, out: str | Path, overwrite: bool = False):
        self.config = config
        self.structure, self.target, self.options = config.validate()
        self.method = resolve_pts(config.method)(self.options)
        self.out = Path(out)
        self.overwrite = overwrite
        self._check_out()
        self.dense, self.meta, self.checkpoint_path, self.train_data = _load_dense(checkpoint_path, config)
        dataset = config.dataset or self.meta["dataset"]
        self.test_data = _split(config, dataset, "test")
        check_data_fits(self.meta, self.train_data, str(self.checkpoint_path))
        self.dataset = dataset
        self.calibration = calibration_set(self.train_data, config.calibration_size, seed=config.seed,
                                           balanced=config.balanced)
        self.shape = tuple(self.train_data.images.shape[1:])
        if len(self.shape) == 3:  # NHWC: about 25 % faster convolutions on CPU for the search and the training
            self.dense = self.dense.to(memory_format=torch.channels_last)
            self.calibration.images = self.calibration.images.contiguous(memory_format=torch.channels_last)
        # Token ids (a language model): the MACs are traced on ids, the fitness adds no noise to them, the sparse
        # training does not crop or flip them.
        self.tokens = None if self.train_data.images.is_floating_point() else self.train_data.images.dtype
        self.macs = layer_macs(self.dense, self.shape, self.tokens)
        masking.prunable_layers(self.dense, exclude=config.exclude)  # unknown names fail here, before any work
        self.cost = _Cost(self.macs)
        self.stages: dict[str, float] = {}
        self.extra: dict[str, Any] = {}

    def _check_out(self) -> None:
        """Before any work: the folder can be written and holds no result (unless ``overwrite``)."""
        check_writable(self.out)
        existing = [name for name in (MODEL, SUMMARY) if (self.out / name).exists()]
        if existing and not self.overwrite:
            raise CheckpointError(f"{self.out} already holds a result ({', '.join(existing)}); pass --overwrite "
                                  "to replace it, or choose another --out")

    # ----- per-layer sparsity ------------------------------------------------------------------------------
    def uniform_sparsities(self, layers: dict[str, nn.Module]) -> dict[str, float]:
        if isinstance(self.structure, NM):
            return {n: (1 - self.structure.density) if self.structure.supports(m.weight.shape) else 0.0
                    for n, m in layers.items()}
        return dict.fromkeys(layers, self.target)

    # ----- the methods -------------------------------------------------------------------------------------
    def timed(self, stage: str, fn, *args):
        """``fn(*args)``, its wall time added to the stage ``stage`` of the summary."""
        start = time.perf_counter()
        result = fn(*args)
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start
        return result

    def run(self) -> dict[str, Any]:
        c = self.config
        torch.manual_seed(c.seed)
        # regrow train records the dense model's final test accuracy in its metadata: no need to measure it again
        dense_accuracy = self.meta.get("test_accuracy") if c.dataset in (None, self.meta["dataset"]) else None
        if dense_accuracy is None:
            dense_accuracy, _ = evaluate(self.dense, self.test_data)
        start = time.perf_counter()
        model = copy.deepcopy(self.dense)
        layers = masking.prunable_layers(model, exclude=self.config.exclude)
        masks = self.method.sparsify(self, model, layers)
        wall = time.perf_counter() - start
        accuracy, loss = evaluate(model, self.test_data)
        if not math.isfinite(loss) or any(not torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDivergedError(f"the {c.method} model has non-finite weights or loss; nothing was saved")
        return self.finish(model, masks, accuracy, loss, dense_accuracy, wall)

    def finish(self, model, masks, accuracy, loss, dense_accuracy, wall) -> dict[str, Any]:
        c = self.config
        layers = layer_table(model, self.macs)
        params_total = sum(p.numel() for p in model.parameters())
        pruned = sum(int((~m).sum()) for m in masks.values())
        dense_epoch = 3 * forward_flops(self.macs) * len(self.train_data)
        dense_same = 3 * forward_flops(self.macs) * max(self.cost.samples, len(self.calibration))
        skipped = {n: f"{self.structure.name} cannot split its input dimension {m.weight.shape[1]}"
                   for n, m in masking.masked_layers(model).items()
                   if isinstance(self.structure, NM) and not self.structure.supports(m.weight.shape)}
        skipped.update({n: "excluded (--exclude)" for n in c.exclude})
        sparsities = self.extra.pop("layer_sparsities")
        weights = masking.weight_sparsity(model, skipped)
        summary = {
            "method": c.method, "model": self.meta["model"], "dataset": self.dataset,
            # over every weight matrix of the model, as regrow train reports it; sparsity_masked: the masked layers
            "sparsity_target": self.target, "sparsity_actual": weights["sparsity"],
            "sparsity_masked": _sparsity_of(masks), "left_dense": weights["left_dense"],
            "distribution": self.options.get("distribution", "uniform"), "structure": self.structure.name,
            "test_accuracy": accuracy, "test_loss": loss, "test_accuracy_per_epoch": [accuracy],
            "dense_test_accuracy": dense_accuracy,
            "train_flops": self.cost.flops, "dense_train_flops": dense_same,
            "train_flops_ratio": self.cost.flops / dense_same, "cost_dense_epochs": self.cost.flops / dense_epoch,
            "wall_seconds": wall, "stage_seconds": self.stages,
            "steps": self.extra.get("training", {}).get("steps", 0),
            "epochs": self.extra.get("training", {}).get("epochs", 0), "seed": c.seed,
            "params_total": params_total, "params_nonzero": params_total - pruned,
            "macs_dense": sum(self.macs.values()),
            "macs_sparse": sparse_macs(self.macs, {layer["name"]: layer["density"] for layer in layers}),
            "layers": layers, "layer_sparsities": sparsities, "skipped_layers": skipped,
            "mask_updates": 0, "mask_metrics": {},
            "calibration": {"size": len(self.calibration), "seed": c.seed, "balanced": c.balanced,
                            "source": f"{self.dataset} train split"},
            "checkpoint": str(self.checkpoint_path), "options": self.options,
            **self.extra,
            "config": dataclasses.asdict(c), "environment": environment(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        meta = {**{k: self.meta[k] for k in MODEL_KEYS if k in self.meta and k != "method"},
                "kind": "model", "method": c.method, "sparsity_actual": summary["sparsity_actual"],
                "test_accuracy": accuracy, "regrow_version": self.meta.get("regrow_version")}
        checkpoint.save(self.out / MODEL, {"model": model.state_dict()}, meta)
        checkpoint.write_json(self.out / SUMMARY, summary)
        return summary


def run_pts(config: PTSConfig, checkpoint_path: str | Path, out: str | Path, overwrite: bool = False
            ) -> dict[str, Any]:
    """Sparsify the dense model at ``checkpoint_path`` after training; write ``out/model.safetensors`` and
    ``out/summary.json`` and return the summary. The folder is locked while the run writes to it."""
    run = PostTraining(config, checkpoint_path, out, overwrite=overwrite)  # options and folder checked first
    with RunFolder(out):
        run._check_out()  # again, under the lock: another process may have finished a run there meanwhile
        return run.run()


class InMemoryRun:
    """What a post-training method reads from a run, for a model and calibration inputs held in memory: no
    checkpoint, no dataset, no labels, no files (a one-pass :class:`MaskingMethod`, or UniPTS with a label-free
    fitness)."""

    labelled = False  # the calibration labels are placeholders
    out = test_data = None  # no folder to write, no held-out data to evaluate

    def __init__(self, model: nn.Module, inputs: torch.Tensor, target: float, structure: Unstructured | NM,
                 seed: int = 0, progress: bool = False):
        self.calibration = Dataset(inputs, torch.zeros(len(inputs), dtype=torch.int64), num_classes=1)
        self.target, self.structure = target, structure
        self.config = PTSConfig(seed=seed, progress=progress)
        self.meta: dict[str, Any] = {}
        self.dense = model  # read before the method changes it (UniPTS copies it first: its teacher)
        self.stages: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self.tokens = None if inputs.is_floating_point() else inputs.dtype  # as PostTraining.tokens
        self.cost = _Cost(layer_macs(model, tuple(inputs.shape[1:]), self.tokens))

    uniform_sparsities = PostTraining.uniform_sparsities
    timed = PostTraining.timed


def sparsify_model(model: nn.Module, inputs: torch.Tensor, method: str = "wanda", sparsity: float | None = 0.5,
                   structure: str = "unstructured", layers: dict[str, nn.Module] | None = None,
                   options: dict[str, Any] | None = None, seed: int = 0, details: dict[str, Any] | None = None,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """Sparsify ``model`` in place with a post-training method on calibration ``inputs`` (a tensor the model takes
    batch by batch: images, or token ids for a model of your own that reads them); return the masks, which are on
    the model's ``layers`` (default: every Linear/Conv layer). For any model, a Hugging Face one wrapped to return a
    tensor included; :func:`run_pts` is the end-to-end run with a dataset and a summary.

    The inputs carry no labels: the one-pass methods need none; UniPTS needs ``fitness=agreement`` or
    ``fitness=cosine`` for its search (and for an encoder ``loss=cosine``), and trains in place. ``details``, when
    given, receives what the method records (UniPTS: its search, training and stage times)."""
    from .methods import MaskingMethod

    config = PTSConfig(method=method, sparsity=sparsity, structure=structure, options=dict(options or {}),
                       seed=seed)
    structure_obj, target, resolved = config.validate()
    cls = resolve_pts(method)
    if not cls.in_memory:
        raise ConfigError(f"{method} needs a dataset and a run folder: run it with regrow pts / run_pts")
    layers = masking.prunable_layers(model) if layers is None else layers
    run = InMemoryRun(model, inputs, target, structure_obj, seed=seed, progress=progress)
    if not issubclass(cls, MaskingMethod):
        run.dense = copy.deepcopy(model)  # the dense teacher and the search's starting point, kept apart
    masks = cls(resolved).sparsify(run, model, layers)
    if details is not None:
        details.update(run.extra, stages=dict(run.stages), flops=run.cost.flops)
    return masks
