"""UniPTS (Xie et al., CVPR 2024): the reducing-regrowing search of per-layer sparsity, then dynamic sparse
training of the sparse student against the dense teacher with the base-decayed KL objective and SR-STE.

Choices where the specification is silent (each an option, see :data:`UNIPTS_DEFAULTS`): the recipe's 100 epochs
are passes over the calibration set, so the number of steps scales with its size (⌈N / batch⌉ per epoch, batch
min(64, N), one warm-up pass); ``tau=constant`` (an ablation) is τ = 1, plain KL; ``distribution=unconstrained``
(the overfitting check) hands the whole kept budget out by the genes (margin 1 − P: any layer may reach any
sparsity) instead of capping every layer at P + 0.05; the fitness adds noise of standard deviation 1e-6 to the
calibration images for the BatchNorm recalibration.

Without labels (a model and calibration inputs in memory, :func:`regrow.posttraining.sparsify_model`) the paper's
fitness, top-1 on the labelled calibration set, cannot be computed: ``fitness=agreement`` scores a candidate by
its top-1 agreement with the dense model (a classifier), ``fitness=cosine`` by the mean cosine similarity of its
outputs to the dense model's (an encoder, whose outputs are embeddings); ``loss=cosine`` trains the student
towards the teacher's outputs by 1 − cosine, for outputs that are not logits (a KL over the dimensions of an
embedding has no meaning). The sparse training then runs as a plain loop over the calibration inputs (no
evaluation: there are no labels), the same steps, schedule and objective as the trainer's.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import masking
from ..artifacts import CHECKPOINT, METRICS, MODEL, SUMMARY
from ..data import batches_per_epoch
from ..errors import CheckpointError, ConfigError, TrainingDivergedError
from ..methods.base import BaseSparsifier
from ..schedules import cosine_lr
from ..structures import NM, Unstructured
from ..training import TrainConfig, Trainer, evaluate
from .calibration import keep_count, recalibrate_batchnorm, select_mask
from .methods import PostTrainingMethod

# ``run`` below: the PostTraining run (regrow.posttraining.runner, which imports this module).
Run = Any


def tau_at(progress: float, start: float = 8.0, decay: float = 0.99, epochs: int = 100) -> float:
    """UniPTS's base-decay temperature: τ = 8·0.99^(100·progress) (τ_e = 8·0.99^e for a 100-epoch run)."""
    if not 0.0 <= progress <= 1.0:
        raise ConfigError(f"progress must be in [0, 1], got {progress}")
    return start * decay ** (epochs * progress)


def base_decayed_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
                    temperature: float = 4.0) -> torch.Tensor:
    """(T²/B)·Σ_b Σ_j p_t·(log p_t − log_softmax(z_s)/τ), p_t = softmax(z_t/T).

    As written in the UniPTS specification: the student's log-probabilities are taken at temperature 1 and
    divided by τ (a logarithm of base e^τ), which scales the gradient by T²/τ.
    """
    if not math.isfinite(tau) or tau <= 0:
        raise ConfigError(f"tau must be a positive number, got {tau}")
    p_t = F.softmax(teacher_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_s = F.log_softmax(student_logits, dim=-1) / tau
    return temperature ** 2 * (p_t * (log_p_t - log_s)).sum() / student_logits.shape[0]


# ----- UniPTS: the reducing-regrowing search of per-layer sparsity --------------------------------------------
def regrow_sparsities(genes: torch.Tensor, sizes: list[int], target: float, margin: float = 0.05
                      ) -> tuple[list[float], float]:
    """Reduce every layer to ``target + margin``, then hand back A = margin·N weights by shares softmax(genes):
    s_k = max(0, P + margin − A·softmax(g)_k / n_k). Returns the sparsities and the achieved global sparsity
    (the target exactly, or slightly above where a small layer clips at 0)."""
    if not 0 <= target < 1 or target + margin > 1:
        raise ConfigError(f"sparsity {target} with margin {margin} leaves no valid layer sparsity")
    n = torch.tensor(sizes, dtype=torch.float64)
    handed_back = margin * float(n.sum())
    shares = torch.softmax(genes.double(), 0)
    sparsities = (target + margin - handed_back * shares / n).clamp(min=0.0)
    achieved = float((sparsities * n).sum() / n.sum())
    return sparsities.tolist(), achieved


class SparsitySearch:
    """UniPTS's genetic search over the genes of :func:`regrow_sparsities`.

    Each generation scores ``population`` candidates with ``fitness(sparsities) -> float``; the ``parents`` best
    of everything scored so far breed the next generation: the constant vector (equal shares) first, then
    uniform-crossover children up to ``children``, ``mutants`` mutants (each gene with probability
    ``mutation_p`` multiplied by 1 + N(0, 1)), and fresh random candidates if the population is not full.
    Scores are cached, so a candidate seen before costs nothing. Seeded; ``history`` keeps the best per generation.
    """

    def __init__(self, sizes: list[int], target: float, fitness, *, margin: float = 0.05, population: int = 25,
                 generations: int = 25, parents: int = 10, children: int = 12, mutants: int = 12,
                 mutation_p: float = 0.1, seed: int = 0, progress: bool = False):
        for name, value in (("population", population), ("generations", generations), ("parents", parents)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.sizes, self.target, self.fitness, self.margin = sizes, target, fitness, margin
        self.population, self.generations, self.parents = population, generations, parents
        self.children, self.mutants, self.mutation_p = children, mutants, mutation_p
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress
        self.scores: dict[tuple[float, ...], float] = {}
        self.history: list[dict] = []

    def _random(self) -> torch.Tensor:
        return torch.randn(len(self.sizes), generator=self.generator, dtype=torch.float64)

    def score(self, genes: torch.Tensor) -> float:
        key = tuple(round(v, 12) for v in genes.tolist())
        if key not in self.scores:
            sparsities, _ = regrow_sparsities(genes, self.sizes, self.target, self.margin)
            self.scores[key] = float(self.fitness(sparsities))
        return self.scores[key]

    def _breed(self, ranked: list[torch.Tensor]) -> list[torch.Tensor]:
        parents = ranked[: self.parents]
        nxt = [torch.zeros(len(self.sizes), dtype=torch.float64)]  # equal shares
        while len(nxt) < self.children:
            a, b = (parents[int(i)] for i in torch.randint(len(parents), (2,), generator=self.generator))
            pick = torch.rand(len(self.sizes), generator=self.generator) < 0.5
            nxt.append(torch.where(pick, a, b))
        for _ in range(self.mutants):
            parent = parents[int(torch.randint(len(parents), (1,), generator=self.generator))]
            hit = torch.rand(len(self.sizes), generator=self.generator) < self.mutation_p
            factor = 1 + torch.randn(len(self.sizes), generator=self.generator, dtype=torch.float64)
            nxt.append(torch.where(hit, parent * factor, parent))
        while len(nxt) < self.population:
            nxt.append(self._random())
        return nxt[: self.population]

    def run(self) -> tuple[list[float], float, float]:
        """Returns (per-layer sparsities, achieved global sparsity, best fitness)."""
        from tqdm.auto import tqdm

        candidates = [torch.zeros(len(self.sizes), dtype=torch.float64)] + \
            [self._random() for _ in range(self.population - 1)]
        pool: dict[tuple[float, ...], torch.Tensor] = {}
        for generation in tqdm(range(self.generations), disable=not self.progress, desc="sparsity search",
                               leave=False):
            for genes in candidates:
                self.score(genes)
                pool[tuple(round(v, 12) for v in genes.tolist())] = genes
            ranked = sorted(pool.values(), key=lambda g: -self.scores[tuple(round(v, 12) for v in g.tolist())])
            best = ranked[0]
            self.history.append({"generation": generation, "best_fitness": self.score(best),
                                 "evaluated": len(self.scores)})
            candidates = self._breed(ranked)
        sparsities, achieved = regrow_sparsities(best, self.sizes, self.target, self.margin)
        return sparsities, achieved, self.score(best)


# ----- UniPTS: dynamic sparse training ----------------------------------------------------------------------
class DynamicSparsity(BaseSparsifier):
    """UniPTS's dynamic sparsity as a sparsifier on the masking core.

    Every layer named in ``sparsities`` keeps its top |w| at its sparsity (or N of every M), recomputed after every
    optimizer step (:meth:`step`), so every forward runs the masks of the current weights. The backward gives the
    pruned weights the dense gradient plus SR-STE's λ·(1 − M) ⊙ W (:func:`regrow.masking.set_straight_through`):
    they keep learning and come back when they outgrow a kept one. There is no optimizer guard, since every weight
    trains. ``static=True`` (an ablation) fixes the masks of the first weights instead: the forward is the plain
    product W ⊙ M, so pruned weights get no gradient and never come back.
    """

    name = "unipts-dst"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 sparsities: dict[str, float], srste: float = 5e-5, structure: Unstructured | NM | None = None,
                 static: bool = False, total_steps: int | None = None, seed: int = 0):
        super().__init__(model, optimizer, total_steps=total_steps, seed=seed)
        modules = dict(model.named_modules())
        missing = [n for n in sparsities if not isinstance(modules.get(n), masking.PRUNABLE_TYPES)]
        if missing:
            raise ConfigError(f"no prunable Linear/Conv layer named {', '.join(map(repr, missing))}")
        masked = [n for n in sparsities if masking.is_masked(modules[n])]
        if masked:
            raise ConfigError(f"UniPTS's sparse training keeps its own masks; {', '.join(masked)} already carry "
                              "regrow masks (finalize them first)")
        self.layers = {n: modules[n] for n in sparsities}
        self.srste, self.static = srste, static
        self.structure = structure or Unstructured()
        self.sparsities = dict(sparsities)
        self.keep = {n: keep_count(masking.raw(m), self.sparsities[n], self.structure) for n, m in self.layers.items()}
        for name, module in self.layers.items():
            masking.add_mask(module)
            masking.set_mask(module, self._select(name))
            if not static:
                masking.set_straight_through(module, srste)

    def _select(self, name: str) -> torch.Tensor:
        return select_mask(masking.raw(self.layers[name]).detach().abs(), self.sparsities[name], self.structure)

    def update(self, step: int) -> None:
        if not self.static:  # the masks follow the weights the optimizer step just changed
            for name, module in self.layers.items():
                masking.set_mask(module, self._select(name))

    def extra_flops(self, macs: dict[str, int], batch_size: int) -> float:
        """The weight gradient is dense under the straight-through estimator: the backward's second half counts
        every weight (3 × the sparse forward already counts it at the layers' densities)."""
        if self.static:
            return 0.0
        pruned = {n: 1 - self.keep[n] / masking.raw(m).numel() for n, m in self.layers.items()}  # fixed counts
        return float(sum(2 * m * pruned.get(n, 0.0) for n, m in macs.items())) * batch_size

    def release(self) -> nn.Module:
        """End the sparse training: the straight-through gradients go, the masks stay on the model."""
        for module in self.layers.values():
            masking.set_straight_through(module, None)
        return self.model

    def finalize(self) -> nn.Module:
        self.release()
        return super().finalize()


class Distillation:
    """UniPTS's objective as a trainer loss: ``(logits, labels, teacher_logits, epoch)`` -> the base-decayed KL
    (τ from the epoch), plain KL at τ = 1 (``tau="constant"``), MSE of the logits (``loss="mse"``), or 1 − the
    cosine similarity of each sample's outputs (``loss="cosine"``: embeddings, not logits)."""

    def __init__(self, epochs: int, loss: str = "kl", temperature: float = 4.0, tau: str = "decay",
                 tau_start: float = 8.0, tau_decay: float = 0.99):
        self.epochs, self.loss, self.temperature = epochs, loss, temperature
        self.tau, self.tau_start, self.tau_decay = tau, tau_start, tau_decay

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                 epoch: int) -> torch.Tensor:
        if self.loss == "mse":
            return F.mse_loss(logits, teacher_logits)
        if self.loss == "cosine":
            return 1 - F.cosine_similarity(logits.flatten(1), teacher_logits.flatten(1), dim=1).mean()
        tau = tau_at(epoch / self.epochs, self.tau_start, self.tau_decay) if self.tau == "decay" else 1.0
        return base_decayed_kl(logits, teacher_logits, tau, self.temperature)


SPARSE_TRAINING = "sparse-training"  # the sparse training's folder inside the run's
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
    "fitness": "accuracy",  # accuracy (labelled calibration data, the paper), agreement or cosine (no labels)
    "search_from": "",  # a UniPTS run (folder or summary.json) whose searched distribution to reuse
}


class UniPTS(PostTrainingMethod):
    """The search (or a uniform / reused distribution), then dynamic sparse training against the dense teacher."""

    name = "unipts"
    defaults = UNIPTS_DEFAULTS
    choices = {"loss": ("kl", "mse", "cosine"), "tau": ("decay", "constant"), "teacher_mode": ("train", "eval"),
               "distribution": PTS_DISTRIBUTIONS, "mask": ("dynamic", "static"),
               "fitness": ("accuracy", "agreement", "cosine")}
    in_memory = True  # runs on a model and unlabelled inputs too (fitness agreement or cosine)

    @classmethod
    def check(cls, options, target, structure):
        if not 0 < options["margin"] <= 1:
            raise ConfigError(f"option margin must be in (0, 1], got {options['margin']}")
        if options["distribution"] == "search" and not isinstance(structure, NM) and target + options["margin"] > 1:
            raise ConfigError(f"UniPTS's search caps every layer at P + margin = {target + options['margin']:g} > 1; "
                              f"lower the sparsity or --opt margin (at most {1 - target:g})")

    def fitness_model(self, run: Run, layers: dict[str, nn.Module]):
        """UniPTS's fitness: magnitude masks at the candidate sparsities on the pretrained weights, BatchNorm reset
        and re-estimated on the (noised) calibration images, top-1 on the calibration set (``fitness=accuracy``;
        without labels: top-1 agreement with the dense model, or the mean cosine similarity to its outputs)."""
        candidate = copy.deepcopy(run.dense)
        modules = dict(candidate.named_modules())
        cand_layers = {n: modules[n] for n in layers}  # the layers being pruned (MiniLM: a subset of the model's)
        weights = {n: masking.raw(m).detach().clone() for n, m in layers.items()}
        order = {n: torch.argsort(w.abs().flatten(), descending=True, stable=True) for n, w in weights.items()}
        images, labels = run.calibration.images, run.calibration.labels
        noise = self.options.get("fitness_noise", 0.0)
        measure = self.options.get("fitness", "accuracy")

        def outputs(model: nn.Module) -> torch.Tensor:
            model.eval()
            with torch.no_grad():
                return torch.cat([model(x) for x in images.split(256)])

        reference = None
        if measure != "accuracy":  # the dense model's outputs, once
            reference = outputs(run.dense)
            run.cost.forward(len(images))

        def apply(sparsities: dict[str, float]) -> dict[str, float]:
            densities = {}
            with torch.no_grad():
                for n, m in cand_layers.items():
                    keep = keep_count(weights[n], sparsities[n], run.structure)
                    mask = torch.zeros(weights[n].numel(), dtype=torch.bool)
                    mask[order[n][:keep]] = True
                    masking.raw(m).copy_(weights[n] * mask.view_as(weights[n]))
                    densities[n] = keep / weights[n].numel()
            recalibrate_batchnorm(candidate, images, noise_std=noise, seed=run.config.seed)
            run.cost.forward(2 * len(images), densities)  # recalibration + scoring
            return densities

        def fitness(sparsity_list: list[float]) -> float:
            apply(dict(zip(layers, sparsity_list)))
            out = outputs(candidate)
            if measure == "cosine":
                return float(F.cosine_similarity(out.flatten(1), reference.flatten(1), dim=1).mean())
            target = labels if measure == "accuracy" else reference.argmax(1)
            return float((out.argmax(1) == target).float().mean())

        return candidate, apply, fitness

    def search(self, run: Run, layers: dict[str, nn.Module]) -> dict[str, float]:
        o = self.options
        margin = o["margin"] if o["distribution"] == "search" else 1 - run.target
        candidate, apply, fitness = self.fitness_model(run, layers)
        sizes = [m.weight.numel() for m in layers.values()]
        search = SparsitySearch(sizes, run.target, fitness, margin=margin, population=o["population"],
                                    generations=o["generations"], parents=o["parents"], children=o["children"],
                                    mutants=o["mutants"], mutation_p=o["mutation_p"], seed=run.config.seed,
                                    progress=run.config.progress)
        best, achieved, best_fitness = search.run()
        sparsities = dict(zip(layers, best))
        apply(sparsities)  # the overfitting check: the searched distribution on held-out data (when there is any)
        heldout = evaluate(candidate, run.test_data)[0] if run.test_data is not None else None
        run.extra["search"] = {"distribution": o["distribution"], "fitness": o["fitness"], "margin": margin,
                               "achieved_sparsity": achieved,
                                "calibration_accuracy": best_fitness, "heldout_accuracy": heldout,
                                "fitness_evaluations": len(search.scores), "history": search.history}
        return sparsities

    def reuse_search(self, run: Run, source: str, layers: dict[str, nn.Module]) -> dict[str, float]:
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
        if earlier.get("model") != run.meta.get("model") or set(found) != set(layers) \
                or abs(earlier.get("sparsity_target", -1) - run.target) > 1e-9:
            raise CheckpointError(f"search_from: {path} searched {earlier.get('model')} at sparsity "
                                  f"{earlier.get('sparsity_target')}, not {run.meta.get('model')} at {run.target}")
        run.extra["search"] = {**earlier["search"], "reused_from": str(path)}
        return {n: float(found[n]) for n in layers}

    def sparsify(self, run: Run, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        o, c = self.options, run.config
        if isinstance(run.structure, NM) or o["distribution"] == "uniform":
            sparsities = run.uniform_sparsities(layers)
        elif o["search_from"]:
            sparsities = self.reuse_search(run, o["search_from"], layers)
        elif o["fitness"] == "accuracy" and not run.labelled:  # refused before the search, the first work done
            raise ConfigError("UniPTS's search scores top-1 on labelled calibration data, and these inputs have no "
                              "labels: pass the option fitness=agreement (a classifier: agreement with the dense "
                              "model) or fitness=cosine (an encoder: cosine similarity to its outputs)")
        else:
            sparsities = run.timed("search", self.search, run, layers)
        run.extra["layer_sparsities"] = sparsities
        teacher = copy.deepcopy(run.dense)
        teacher.train(o["teacher_mode"] == "train")
        for p in teacher.parameters():
            p.requires_grad_(False)
        static = o["mask"] == "static"
        sparsifier = DynamicSparsity(model, sparsities={n: sparsities[n] for n in layers}, srste=o["srste"],
                                     structure=run.structure, static=static, seed=c.seed)
        lr = o["lr"] if o["lr"] is not None else (0.05 if run.meta.get("model") == "mobilenetv2" else 0.01)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"])
        data = run.calibration
        batch = min(o["batch_size"], len(data))
        per_epoch = batches_per_epoch(len(data), batch)
        total = o["epochs"] * per_epoch
        warmup = o["warmup_epochs"] * per_epoch
        loss_fn = Distillation(o["epochs"], o["loss"], o["temperature"], o["tau"], o["tau_start"], o["tau_decay"])
        if run.out is None:  # a model and inputs in memory: no labels to evaluate, no folder to write
            start = time.perf_counter()
            losses = self.train_in_memory(model, optimizer, sparsifier, teacher, data.images, loss_fn, total, batch,
                                          lambda step: cosine_lr(step, total, lr, warmup), c.seed)
            run.stages["sparse_training"] = time.perf_counter() - start
            return self.finish(run, sparsifier, losses, total, per_epoch, batch, len(data), layers, static, lr)
        # The shared trainer runs the sparse training in a folder of the run (its checkpoints, metrics, recipe):
        # evaluated once, at the end; inputs as the calibration set holds them.
        config = TrainConfig(model=run.meta["model"], dataset=run.dataset, method="unipts", sparsity=run.target,
                             distribution=o["distribution"], structure=run.structure.name, epochs=o["epochs"],
                             batch_size=batch, lr=lr, momentum=o["momentum"], nesterov=False,
                             weight_decay=o["weight_decay"], warmup_epochs=o["warmup_epochs"],
                             augment=o["augment"] and run.tokens is None, channels_last=False,
                             device=str(next(model.parameters()).device), seed=c.seed,
                             log_every=1, eval_every=o["epochs"], progress=c.progress)
        trainer = Trainer(model, optimizer, sparsifier, data, run.test_data, run.out / SPARSE_TRAINING,
                          config=config, teacher=teacher, lr_schedule=lambda step: cosine_lr(step, total, lr, warmup),
                          loss_fn=loss_fn, _checked=True)
        start = time.perf_counter()
        try:
            trainer.run(overwrite=True)  # the run folder holds no result (checked): what is there is a torn run's
        except TrainingDivergedError as e:
            raise TrainingDivergedError(f"UniPTS's sparse training diverged ({e}); no sparse model was saved. "
                                        "Try a smaller --opt lr.") from None
        run.stages["sparse_training"] = time.perf_counter() - start
        for name in (CHECKPOINT, MODEL):  # no resume for a finished run; the sparse model is the run's own file
            (run.out / SPARSE_TRAINING / name).unlink(missing_ok=True)
        losses = [r["loss"] for r in map(json.loads, (run.out / SPARSE_TRAINING / METRICS).read_text().splitlines())
                  if "lr" in r]
        return self.finish(run, sparsifier, losses, total, per_epoch, batch, len(data), layers, static, lr,
                           folder=SPARSE_TRAINING)

    def finish(self, run: Run, sparsifier: DynamicSparsity, losses: list[float], total: int, per_epoch: int,
               batch: int, samples: int, layers: dict[str, nn.Module], static: bool, lr: float,
               folder: str | None = None) -> dict[str, torch.Tensor]:
        o = self.options
        self.count_training(run, total, per_epoch, batch, samples, sparsifier.keep, layers, static)
        run.extra["training"] = {"steps": total, "epochs": o["epochs"], "batch_size": batch, "lr": lr,
                                 "loss_first": losses[0] if losses else None,
                                 "loss_last": losses[-1] if losses else None,
                                 "loss_per_epoch": [sum(losses[e * per_epoch:(e + 1) * per_epoch]) / per_epoch
                                                    for e in range(o["epochs"])],
                                 "folder": folder}
        sparsifier.release()  # the masks of the last weights stay on the model
        return sparsifier.masks()

    @staticmethod
    def train_in_memory(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: DynamicSparsity,
                        teacher: nn.Module, inputs: torch.Tensor, loss_fn: Distillation, total: int, batch: int,
                        lr_at, seed: int) -> list[float]:
        """The sparse training on inputs without labels: shuffled passes (seeded), the teacher's outputs as the
        only target, the learning rate set before every step; returns the loss of every step."""
        generator = torch.Generator().manual_seed(seed)
        per_epoch = batches_per_epoch(len(inputs), batch)
        device = next(model.parameters()).device
        losses: list[float] = []
        model.train()
        order = None
        for step in range(total):
            epoch, i = divmod(step, per_epoch)
            if i == 0:
                order = torch.randperm(len(inputs), generator=generator)
            x = inputs[order[i * batch:(i + 1) * batch]].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with torch.no_grad():
                target = teacher(x)
            loss = loss_fn(model(x), None, target, epoch)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"UniPTS's sparse training diverged at step {step + 1} (loss {loss.item()})"
                                            "; no sparse model was saved. Try a smaller --opt lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sparsifier.step()
            losses.append(loss.item())
        return losses

    @staticmethod
    def count_training(run: Run, total: int, per_epoch: int, batch: int, samples: int, keep: dict[str, int],
                       layers: dict[str, nn.Module], static: bool) -> None:
        """The sparse training's FLOPs in the post-training convention, step by step: the teacher's forward
        (dense), the student's forward and input gradient at the layers' densities, its weight gradient dense under
        the straight-through estimator (at the densities with static masks)."""
        densities = {n: keep[n] / m.weight.numel() for n, m in layers.items()}
        for step in range(total):
            n = min(batch, samples - (step % per_epoch) * batch)
            run.cost.forward(n)
            if static:
                run.cost.forward(n, densities, factor=3.0)
            else:
                run.cost.forward(n, densities, factor=2.0)
                run.cost.forward(n)
            run.cost.samples += n
