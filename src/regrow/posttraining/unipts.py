"""UniPTS (Xie et al., CVPR 2024): the reducing-regrowing search of per-layer sparsity, then dynamic sparse
training of the sparse student against the dense teacher with the base-decayed KL objective and SR-STE.

Choices where the specification is silent (each an option, see :data:`UNIPTS_DEFAULTS`): the recipe's 100 epochs
are passes over the calibration set, so the number of steps scales with its size (⌈N / batch⌉ per epoch, batch
min(64, N), one warm-up pass); ``tau=constant`` (an ablation) is τ = 1, plain KL; ``distribution=unconstrained``
(the overfitting check) hands the whole kept budget out by the genes (margin 1 − P: any layer may reach any
sparsity) instead of capping every layer at P + 0.05; the fitness adds noise of standard deviation 1e-6 to the
calibration images for the BatchNorm recalibration.
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
from ..artifacts import SUMMARY
from ..data import batches_per_epoch, get_batch
from ..errors import CheckpointError, ConfigError, TrainingDivergedError
from ..schedules import cosine_lr
from ..structures import NM, Unstructured
from ..training import evaluate
from .calibration import apply_masks, keep_count, recalibrate_batchnorm, select_mask
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
class _StraightThrough(torch.autograd.Function):
    """Forward W ⊙ M; backward: the dense gradient to every weight, pruned ones included."""

    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class DynamicSparsity:
    """Every layer keeps its top |w| at its sparsity (or N of every M), recomputed at every forward; backward
    gives every weight the dense gradient, and :meth:`add_srste` adds λ·(1 − M) ⊙ W (SR-STE, λ = 5e-5) to pull
    pruned ones to 0. ``static=True`` (an ablation) fixes the masks of the first weights instead: the forward is
    the plain product W ⊙ M, so pruned weights get no gradient and never come back.

    Implemented with forward pre-hooks that swap in the masked weight for the duration of the call, so the model
    keeps its own classes and parameters."""

    def __init__(self, layers: dict[str, nn.Module], sparsities: dict[str, float], srste: float = 5e-5,
                 structure: Unstructured | NM | None = None, static: bool = False):
        masked = [name for name, m in layers.items() if masking.is_masked(m)]
        if masked:
            raise ConfigError(f"UniPTS's sparse training keeps its own masks; {', '.join(masked)} already carry regrow "
                              "masks (finalize them first)")
        self.layers, self.srste, self.static = layers, srste, static
        self.structure = structure or Unstructured()
        self.sparsities = dict(sparsities)
        self.keep = {n: keep_count(masking.raw(m), sparsities[n], self.structure) for n, m in layers.items()}
        self.masks: dict[str, torch.Tensor] = {}
        if static:
            self.masks = {n: self._select(n, masking.raw(m)) for n, m in layers.items()}
        self._handles = []
        for name, module in layers.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post))

    def _select(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return select_mask(weight.detach().abs(), self.sparsities[name], self.structure)

    def _pre(self, name):
        def hook(module, inputs):
            dense = module._parameters["weight"]
            if self.static:
                sparse = dense * self.masks[name]
            else:
                self.masks[name] = self._select(name, dense)
                sparse = _StraightThrough.apply(dense, self.masks[name].to(dense.dtype))
            module._regrow_dense_weight = dense
            del module._parameters["weight"]
            module.weight = sparse  # a plain attribute for this call only
        return hook

    @staticmethod
    def _post(module, inputs, output):
        del module.weight
        module._parameters["weight"] = module._regrow_dense_weight
        del module._regrow_dense_weight

    def add_srste(self) -> None:
        """Call after ``loss.backward()``: grad += λ·(1 − M) ⊙ W for every layer (masks of the last forward)."""
        if self.static:
            return
        with torch.no_grad():
            for name, module in self.layers.items():
                weight = masking.raw(module)
                if weight.grad is not None and name in self.masks:
                    weight.grad.add_(self.srste * (~self.masks[name]) * weight)

    def current_masks(self) -> dict[str, torch.Tensor]:
        """The masks the next forward would use."""
        if self.static:
            return dict(self.masks)
        return {n: self._select(n, masking.raw(m)) for n, m in self.layers.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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


class UniPTS(PostTrainingMethod):
    """The search (or a uniform / reused distribution), then dynamic sparse training against the dense teacher."""

    name = "unipts"
    defaults = UNIPTS_DEFAULTS
    choices = {"loss": ("kl", "mse"), "tau": ("decay", "constant"), "teacher_mode": ("train", "eval"),
               "distribution": PTS_DISTRIBUTIONS, "mask": ("dynamic", "static")}

    @classmethod
    def check(cls, options, target, structure):
        if not 0 < options["margin"] <= 1:
            raise ConfigError(f"option margin must be in (0, 1], got {options['margin']}")
        if options["distribution"] == "search" and not isinstance(structure, NM) and target + options["margin"] > 1:
            raise ConfigError(f"UniPTS's search caps every layer at P + margin = {target + options['margin']:g} > 1; "
                              f"lower the sparsity or --opt margin (at most {1 - target:g})")

    def fitness_model(self, run: Run, layers: dict[str, nn.Module]):
        """UniPTS's fitness: magnitude masks at the candidate sparsities on the pretrained weights, BatchNorm reset
        and re-estimated on the (noised) calibration images, top-1 on the calibration set."""
        candidate = copy.deepcopy(run.dense)
        cand_layers = masking.prunable_layers(candidate)
        weights = {n: masking.raw(m).detach().clone() for n, m in layers.items()}
        order = {n: torch.argsort(w.abs().flatten(), descending=True, stable=True) for n, w in weights.items()}
        images, labels = run.calibration.images, run.calibration.labels
        noise = self.options.get("fitness_noise", 0.0)

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
            candidate.eval()
            with torch.no_grad():
                correct = sum(int((candidate(x).argmax(1) == labels[i:i + len(x)]).sum())
                              for i, x in zip(range(0, len(images), 256), images.split(256)))
            return correct / len(images)

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
        apply(sparsities)  # the overfitting check: the searched distribution on held-out data
        heldout, _ = evaluate(candidate, run.test_data)
        run.extra["search"] = {"distribution": o["distribution"], "margin": margin, "achieved_sparsity": achieved,
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
        if earlier.get("model") != run.meta["model"] or set(found) != set(layers) \
                or abs(earlier.get("sparsity_target", -1) - run.target) > 1e-9:
            raise CheckpointError(f"search_from: {path} searched {earlier.get('model')} at sparsity "
                                  f"{earlier.get('sparsity_target')}, not {run.meta['model']} at {run.target}")
        run.extra["search"] = {**earlier["search"], "reused_from": str(path)}
        return {n: float(found[n]) for n in layers}

    def sparsify(self, run: Run, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        o, c = self.options, run.config
        if isinstance(run.structure, NM) or o["distribution"] == "uniform":
            sparsities = run.uniform_sparsities(layers)
        elif o["search_from"]:
            sparsities = self.reuse_search(run, o["search_from"], layers)
        else:
            sparsities = run.timed("search", self.search, run, layers)
        run.extra["layer_sparsities"] = sparsities
        teacher = copy.deepcopy(run.dense)
        teacher.train(o["teacher_mode"] == "train")
        for p in teacher.parameters():
            p.requires_grad_(False)
        dst = DynamicSparsity(layers, sparsities, srste=o["srste"], structure=run.structure,
                                  static=o["mask"] == "static")
        lr = o["lr"] if o["lr"] is not None else (0.05 if run.meta["model"] == "mobilenetv2" else 0.01)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"])
        data = run.calibration
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
                tau = tau_at(epoch / o["epochs"], o["tau_start"], o["tau_decay"]) if o["tau"] == "decay" else 1.0
                loss = base_decayed_kl(logits, teacher_logits, tau, o["temperature"])
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"UniPTS's loss is {loss.item()} at step {step + 1}; nothing was saved. "
                                            "Try a smaller --opt lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dst.add_srste()
            optimizer.step()
            losses.append(loss.item())
            run.cost.forward(len(x))  # the teacher, dense
            if student_factor:
                run.cost.forward(len(x), densities, factor=student_factor)
            else:  # forward and input gradient at the layers' densities, weight gradient dense
                run.cost.forward(len(x), densities, factor=2.0)
                run.cost.forward(len(x))
            run.cost.samples += len(x)
        run.stages["sparse_training"] = time.perf_counter() - start
        run.extra["training"] = {"steps": total, "epochs": o["epochs"], "batch_size": batch, "lr": lr,
                                  "loss_first": losses[0] if losses else None,
                                  "loss_last": losses[-1] if losses else None,
                                  "loss_per_epoch": [sum(losses[e * per_epoch:(e + 1) * per_epoch]) / per_epoch
                                                     for e in range(o["epochs"])]}
        masks = dst.current_masks()
        dst.remove()
        apply_masks(layers, masks)
        return masks
