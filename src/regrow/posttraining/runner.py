"""Post-training sparsity, end to end: a dense trained model and a small calibration set in, a sparse model and a
``summary.json`` out (``regrow pts CHECKPOINT --method unipts|pot|wanda|magnitude``).

The pieces live in :mod:`regrow.posttraining.pieces`; this module composes them into the four methods:

- ``magnitude``: per-layer magnitude masks at the target (uniform), then BatchNorm recalibration;
- ``pot``: the same masks, then every layer's kept weights (and bias) refitted to the dense layer's output on the
  dense model's inputs (per-layer least squares);
- ``wanda``: |W_ij|·‖X_j‖₂ per output row, no weight update;
- ``unipts``: the reducing-regrowing search of per-layer sparsity (genetic, fitness = calibration top-1 after
  magnitude masks and BatchNorm recalibration), then dynamic sparse training against the dense teacher with the
  base-decayed KL objective and SR-STE.

Every prunable layer (all convs and Linear layers, the first and the classifier included, as UniPTS does) is
sparse. N:M keeps N of every M weights along the input dimension in every layer that can be split so; the
per-layer density is then fixed by the structure and UniPTS skips its search.

Choices where the specification is silent (each an option of ``unipts``, see :data:`UNIPTS_DEFAULTS`):
the recipe's 100 epochs are passes over the calibration set, so the number of steps scales with its size
(⌈N / batch⌉ per epoch, batch min(64, N), one warm-up pass); ``tau=constant`` (an ablation) is τ = 1, plain
KL; ``distribution=unconstrained`` (the overfitting check) hands the whole kept budget out by the genes
(margin 1 − P: any layer may reach any sparsity) instead of capping every layer at P + 0.05; the fitness adds
noise of standard deviation 1e-6 to the calibration images for the BatchNorm recalibration.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint, masking
from ..artifacts import MODEL, MODEL_KEYS, SUMMARY, build_model, check_data_fits, load_model, model_metadata
from ..data import Dataset, batches_per_epoch, get_batch, load_dataset
from ..env import environment
from ..errors import CheckpointError, ConfigError, TrainingDivergedError, check_sparsity, unknown
from ..flops import forward_flops, layer_macs
from ..runfolder import RunFolder, check_writable
from ..schedules import cosine_lr
from ..structures import NM, get_structure
from ..training import evaluate, layer_table
from . import pieces as pts

PTS_METHODS = ("magnitude", "pot", "wanda", "unipts")
PTS_DISTRIBUTIONS = ("search", "uniform", "unconstrained")

UNIPTS_DEFAULTS: dict[str, Any] = {
    # dynamic sparse training (the recipe: SGD, cosine per step, one warm-up pass)
    "epochs": 100, "batch_size": 64, "lr": None,  # None: 0.05 for MobileNetV2, else 0.01
    "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 1, "augment": True, "srste": 5e-5,
    # the objective
    "loss": "kl", "temperature": 4.0, "tau": "decay", "tau_start": 8.0, "tau_decay": 0.99, "teacher_mode": "train",
    # per-layer sparsity and masks
    "distribution": "search", "mask": "dynamic", "margin": 0.05,
    # the genetic search
    "population": 25, "generations": 25, "parents": 10, "children": 12, "mutants": 12, "mutation_p": 0.1,
    "fitness_noise": 1e-6,
    "search_from": "",  # a UniPTS run (folder or summary.json) whose searched distribution to reuse
}
BASELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "magnitude": {"recalibrate_bn": True},
    "pot": {"recalibrate_bn": False, "ridge": 1e-4},
    "wanda": {"recalibrate_bn": False},
}
_CHOICES = {"loss": ("kl", "mse"), "tau": ("decay", "constant"), "teacher_mode": ("train", "eval"),
            "distribution": PTS_DISTRIBUTIONS, "mask": ("dynamic", "static")}


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
    if method not in PTS_METHODS:
        raise unknown("post-training method", method, PTS_METHODS)
    return dict(UNIPTS_DEFAULTS if method == "unipts" else BASELINE_DEFAULTS[method])


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

    def resolved_options(self) -> dict[str, Any]:
        """The method's options: its defaults, overridden by ``options`` (unknown keys and bad values fail)."""
        defaults = method_defaults(self.method)
        unknown_keys = sorted(set(self.options) - set(defaults))
        if unknown_keys:
            raise ConfigError(f"unknown option(s) {', '.join(unknown_keys)} for pts method {self.method}; "
                              f"known: {', '.join(sorted(defaults))}")
        merged = {**defaults, **self.options}
        for key, allowed in _CHOICES.items():
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
        if self.method == "unipts" and not 0 < merged["margin"] <= 1:
            raise ConfigError(f"option margin must be in (0, 1], got {merged['margin']}")
        return merged

    def validate(self) -> tuple[pts.Unstructured | NM, float, dict[str, Any]]:
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
        if self.method == "unipts" and options["distribution"] == "search" and not isinstance(structure, NM) \
                and target + options["margin"] > 1:
            raise ConfigError(f"UniPTS's search caps every layer at P + margin = {target + options['margin']:g} > 1; "
                              f"lower the sparsity or --opt margin (at most {1 - target:g})")
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

    def __init__(self, config: PTSConfig, checkpoint_path: str | Path, out: str | Path, overwrite: bool = False):
        self.config = config
        self.structure, self.target, self.options = config.validate()
        self.out = Path(out)
        self.overwrite = overwrite
        self._check_out()
        self.dense, self.meta, self.checkpoint_path, self.train_data = _load_dense(checkpoint_path, config)
        dataset = config.dataset or self.meta["dataset"]
        self.test_data = _split(config, dataset, "test")
        check_data_fits(self.meta, self.train_data, str(self.checkpoint_path))
        self.dataset = dataset
        self.calibration = pts.calibration_set(self.train_data, config.calibration_size, seed=config.seed,
                                               balanced=config.balanced)
        self.shape = tuple(self.train_data.images.shape[1:])
        if len(self.shape) == 3:  # NHWC: about 25 % faster convolutions on CPU for the search and the training
            self.dense = self.dense.to(memory_format=torch.channels_last)
            self.calibration.images = self.calibration.images.contiguous(memory_format=torch.channels_last)
        self.macs = layer_macs(self.dense, self.shape)
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

    def fitness_model(self, layers: dict[str, nn.Module]):
        """UniPTS's fitness: magnitude masks at the candidate sparsities on the pretrained weights, BatchNorm reset
        and re-estimated on the (noised) calibration images, top-1 on the calibration set."""
        candidate = copy.deepcopy(self.dense)
        cand_layers = masking.prunable_layers(candidate)
        weights = {n: masking.raw(m).detach().clone() for n, m in layers.items()}
        order = {n: torch.argsort(w.abs().flatten(), descending=True, stable=True) for n, w in weights.items()}
        images, labels = self.calibration.images, self.calibration.labels
        noise = self.options.get("fitness_noise", 0.0)

        def apply(sparsities: dict[str, float]) -> dict[str, float]:
            densities = {}
            with torch.no_grad():
                for n, m in cand_layers.items():
                    keep = pts.keep_count(weights[n], sparsities[n], self.structure)
                    mask = torch.zeros(weights[n].numel(), dtype=torch.bool)
                    mask[order[n][:keep]] = True
                    masking.raw(m).copy_(weights[n] * mask.view_as(weights[n]))
                    densities[n] = keep / weights[n].numel()
            pts.recalibrate_batchnorm(candidate, images, noise_std=noise, seed=self.config.seed)
            self.cost.forward(2 * len(images), densities)  # recalibration + scoring
            return densities

        def fitness(sparsity_list: list[float]) -> float:
            apply(dict(zip(layers, sparsity_list)))
            candidate.eval()
            with torch.no_grad():
                correct = sum(int((candidate(x).argmax(1) == labels[i:i + len(x)]).sum())
                              for i, x in zip(range(0, len(images), 256), images.split(256)))
            return correct / len(images)

        return candidate, apply, fitness

    def search(self, layers: dict[str, nn.Module]) -> dict[str, float]:
        o = self.options
        margin = o["margin"] if o["distribution"] == "search" else 1 - self.target
        candidate, apply, fitness = self.fitness_model(layers)
        sizes = [m.weight.numel() for m in layers.values()]
        search = pts.SparsitySearch(sizes, self.target, fitness, margin=margin, population=o["population"],
                                    generations=o["generations"], parents=o["parents"], children=o["children"],
                                    mutants=o["mutants"], mutation_p=o["mutation_p"], seed=self.config.seed,
                                    progress=self.config.progress)
        best, achieved, best_fitness = search.run()
        sparsities = dict(zip(layers, best))
        apply(sparsities)  # the overfitting check: the searched distribution on held-out data
        heldout, _ = evaluate(candidate, self.test_data)
        self.extra["search"] = {"distribution": o["distribution"], "margin": margin, "achieved_sparsity": achieved,
                                "calibration_accuracy": best_fitness, "heldout_accuracy": heldout,
                                "fitness_evaluations": len(search.scores), "history": search.history}
        return sparsities

    def reuse_search(self, source: str, layers: dict[str, nn.Module]) -> dict[str, float]:
        """The per-layer sparsities an earlier UniPTS run searched (its summary.json or its folder): search once,
        train many. The earlier search's cost is not counted again."""
        path = Path(source)
        path = path / SUMMARY if path.is_dir() else path
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"search_from: cannot read a run summary at {path} ({e})") from None
        found = earlier.get("layer_sparsities")
        if "search" not in earlier or not isinstance(found, dict):
            raise CheckpointError(f"search_from: {path} is not the summary of a UniPTS run with a search")
        if earlier.get("model") != self.meta["model"] or set(found) != set(layers) \
                or abs(earlier.get("sparsity_target", -1) - self.target) > 1e-9:
            raise CheckpointError(f"search_from: {path} searched {earlier.get('model')} at sparsity "
                                  f"{earlier.get('sparsity_target')}, not {self.meta['model']} at {self.target}")
        self.extra["search"] = {**earlier["search"], "reused_from": str(path)}
        return {n: float(found[n]) for n in layers}

    # ----- the methods -------------------------------------------------------------------------------------
    def _timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start
        return result

    def run_baseline(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        method, o = self.config.method, self.options
        sparsities = self.extra["layer_sparsities"] = self.uniform_sparsities(layers)
        images = self.calibration.images
        if method == "wanda":
            masks = pts.wanda_masks(model, layers, images, self.target, self.structure)
            self.cost.forward(len(images))
        else:
            masks = pts.magnitude_masks(layers, sparsities, self.structure)
        if method == "pot":
            inputs = pts.layer_inputs(model, layers, images)  # dense inputs, taken before any refit
            self.cost.forward(len(images))
            for name, m in layers.items():
                pts.pot_refit(m, masks[name], inputs[name], ridge=o["ridge"])
            del inputs
        pts.apply_masks(layers, masks)
        if o["recalibrate_bn"]:
            pts.recalibrate_batchnorm(model, images, seed=self.config.seed)
            self.cost.forward(len(images), {n: float(masks[n].float().mean()) for n in masks})
        return masks

    def run_unipts(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        o, c = self.options, self.config
        if isinstance(self.structure, NM) or o["distribution"] == "uniform":
            sparsities = self.uniform_sparsities(layers)
        elif o["search_from"]:
            sparsities = self.reuse_search(o["search_from"], layers)
        else:
            sparsities = self._timed("search", self.search, layers)
        self.extra["layer_sparsities"] = sparsities
        teacher = copy.deepcopy(self.dense)
        teacher.train(o["teacher_mode"] == "train")
        for p in teacher.parameters():
            p.requires_grad_(False)
        dst = pts.DynamicSparsity(layers, sparsities, srste=o["srste"], structure=self.structure,
                                  static=o["mask"] == "static")
        lr = o["lr"] if o["lr"] is not None else (0.05 if self.meta["model"] == "mobilenetv2" else 0.01)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"])
        data = self.calibration
        batch = min(o["batch_size"], len(data))
        per_epoch = batches_per_epoch(len(data), batch)
        total = o["epochs"] * per_epoch
        densities = {n: dst.keep[n] / m.weight.numel() for n, m in layers.items()}
        student_factor = 3.0 if o["mask"] == "static" else None
        from tqdm.auto import tqdm

        model.train()
        losses = []
        start = time.perf_counter()
        for step in tqdm(range(total), disable=not c.progress, desc="unipts: sparse training", leave=False):
            epoch, index = divmod(step, per_epoch)
            x, _ = get_batch(data, batch, c.seed, epoch, index, train_augment=o["augment"])
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup=o["warmup_epochs"] * per_epoch)
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = model(x)
            if o["loss"] == "mse":
                loss = F.mse_loss(logits, teacher_logits)
            else:
                tau = pts.tau_at(epoch / o["epochs"], o["tau_start"], o["tau_decay"]) if o["tau"] == "decay" else 1.0
                loss = pts.base_decayed_kl(logits, teacher_logits, tau, o["temperature"])
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"UniPTS's loss is {loss.item()} at step {step + 1}; nothing was saved. "
                                            "Try a smaller --opt lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dst.add_srste()
            optimizer.step()
            losses.append(loss.item())
            self.cost.forward(len(x))  # the teacher, dense
            if student_factor:
                self.cost.forward(len(x), densities, factor=student_factor)
            else:  # forward and input gradient at the layers' densities, weight gradient dense
                self.cost.forward(len(x), densities, factor=2.0)
                self.cost.forward(len(x))
            self.cost.samples += len(x)
        self.stages["sparse_training"] = time.perf_counter() - start
        self.extra["training"] = {"steps": total, "epochs": o["epochs"], "batch_size": batch, "lr": lr,
                                  "loss_first": losses[0] if losses else None,
                                  "loss_last": losses[-1] if losses else None,
                                  "loss_per_epoch": [sum(losses[e * per_epoch:(e + 1) * per_epoch]) / per_epoch
                                                     for e in range(o["epochs"])]}
        masks = dst.current_masks()
        dst.remove()
        pts.apply_masks(layers, masks)
        return masks

    def run(self) -> dict[str, Any]:
        c = self.config
        torch.manual_seed(c.seed)
        # regrow train records the dense model's final test accuracy in its metadata: no need to measure it again
        dense_accuracy = self.meta.get("test_accuracy") if c.dataset in (None, self.meta["dataset"]) else None
        if dense_accuracy is None:
            dense_accuracy, _ = evaluate(self.dense, self.test_data)
        start = time.perf_counter()
        model = copy.deepcopy(self.dense)
        layers = masking.prunable_layers(model)
        if c.method == "unipts":
            masks = self.run_unipts(model, layers)
        else:
            masks = self._timed(c.method, self.run_baseline, model, layers)
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
            "macs_sparse": sum(layer["macs"] * layer["density"] for layer in layers),
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
