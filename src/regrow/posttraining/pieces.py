"""Post-training sparsity from a small calibration set: the pieces the methods share, and the baselines.

- :func:`calibration_set`: N distinct training samples, seeded, class-balanced by default (never the test set).
- :func:`recalibrate_batchnorm`: reset BatchNorm statistics and re-estimate them on calibration images.
- :func:`layer_inputs`: the inputs every prunable layer sees on calibration data (dense model, for Wanda and POT).
- Baselines: magnitude masks + BatchNorm recalibration; Wanda (|W_ij|·‖X_j‖₂ per output row, convolutions via
  unfolded inputs); POT (fixed magnitude masks, then each layer's kept weights and bias refitted to the dense
  layer's output on dense inputs, least squares solved exactly per output row).
- UniPTS's base-decayed KL objective (:func:`base_decayed_kl`, :func:`tau_at`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import masking
from ..data import Dataset, subset_indices
from ..errors import ConfigError, DataError
from ..structures import NM, Unstructured


def calibration_set(train: Dataset, size: int, seed: int = 0, balanced: bool = True) -> Dataset:
    """``size`` distinct samples of the *training* split, the same for the same seed."""
    if not isinstance(size, int) or size <= 0:
        raise DataError(f"calibration size must be a positive integer, got {size!r}")
    if size > len(train):
        raise DataError(f"calibration size {size} is larger than the training set ({len(train)} samples)")
    return train.subset(subset_indices(train.labels, size, seed, balanced=balanced))


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 64, noise_std: float = 0.0,
                          seed: int = 0) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) on ``images``
    (optionally with N(0, noise_std²) added, as UniPTS's fitness does)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    was_training = model.training
    model.train()
    generator = torch.Generator().manual_seed(seed)
    try:
        for x in _batches(images, batch_size):
            if noise_std:
                x = x + noise_std * torch.randn(x.shape, generator=generator)
            model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor,
                 batch_size: int = 256) -> dict[str, list[torch.Tensor]]:
    """The input of every layer in ``layers`` on ``images`` (model in eval mode), batch by batch."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen[name].append(inp[0].detach()))
             for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in _batches(images, batch_size):
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    silent = [name for name, inputs in seen.items() if not inputs]
    if silent:
        raise ConfigError(f"{', '.join(silent)} never ran as a module on the calibration data (another module reads "
                          "its weight directly, as nn.MultiheadAttention does with out_proj), so there are no inputs "
                          "to score or refit it with: leave it out of the layers to prune")
    return seen


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows = samples (and positions), columns = the weight's input entries: X such that out = X Wᵀ per group."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(module, nn.Conv2d):
        raise ConfigError(f"post-training methods support Linear and Conv2d layers, not {type(module).__name__}")
    if isinstance(module.padding, str):
        raise ConfigError("string padding is not supported by the post-training methods")
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C·k·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_norms(module: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """‖X_j‖₂ for every weight entry's input, shaped like the weight (Wanda's activation term)."""
    total = None
    for x in inputs:
        cols = _columns(module, x)
        sq = cols.pow(2).sum(0)
        total = sq if total is None else total + sq
    norms = total.sqrt()
    weight = masking.raw(module)
    if isinstance(module, nn.Linear):
        return norms.expand_as(weight)
    per_group = weight.shape[1] * weight[0, 0].numel()  # (C_in/groups)·k·k
    groups = module.groups
    out_per_group = weight.shape[0] // groups
    grouped = norms.reshape(groups, per_group)
    return grouped.repeat_interleave(out_per_group, 0).reshape(weight.shape)


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, keep the round((1 − s)·row length) highest scores (at least one)."""
    rows = scores.reshape(scores.shape[0], -1)
    keep = max(1, int(round((1 - sparsity) * rows.shape[1])))
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, torch.topk(rows, keep, dim=1).indices, True)
    return mask.reshape(scores.shape)


def keep_count(weight: torch.Tensor, sparsity: float, structure: Unstructured | NM) -> int:
    """How many entries a layer keeps: round((1 − s)·N), at least one; N·n/m under N:M (all if unsupported)."""
    if isinstance(structure, NM):
        return structure.keep_count(weight.shape, structure.density) if structure.supports(weight.shape) \
            else weight.numel()
    return max(1, int(round((1 - sparsity) * weight.numel())))


def select_mask(scores: torch.Tensor, sparsity: float, structure: Unstructured | NM | None = None) -> torch.Tensor:
    """The mask a post-training method keeps for one layer: the top scores at ``sparsity`` (layer-wise), or the
    top N of every group of M under N:M (a layer whose input dimension N:M cannot split stays dense)."""
    structure = structure or Unstructured()
    if isinstance(structure, NM):
        if not structure.supports(scores.shape):
            return torch.ones_like(scores, dtype=torch.bool)
        return structure.select(scores)
    return structure.select(scores, keep_count(scores, sparsity, structure))


def magnitude_masks(layers: dict[str, nn.Module], sparsities: dict[str, float],
                    structure: Unstructured | NM | None = None) -> dict[str, torch.Tensor]:
    """Per layer, keep the largest |w|: round((1 − s_l)·N_l) of them, or N of every M."""
    return {name: select_mask(masking.raw(m).detach().abs(), sparsities[name], structure)
            for name, m in layers.items()}


def wanda_masks(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor,
                sparsity: float, structure: Unstructured | NM | None = None) -> dict[str, torch.Tensor]:
    """Wanda: score |W_ij|·‖X_j‖₂ on calibration inputs of the dense model; prune per output row (under N:M, per
    group of M, which lies inside a row)."""
    inputs = layer_inputs(model, layers, images)
    masks = {}
    for name, m in layers.items():
        scores = masking.raw(m).detach().abs() * input_norms(m, inputs[name])
        masks[name] = select_mask(scores, sparsity, structure) if isinstance(structure, NM) \
            else row_masks(scores, sparsity)
    return masks


@torch.no_grad()
def pot_refit(module: nn.Module, mask: torch.Tensor, inputs: list[torch.Tensor], ridge: float = 1e-4) -> None:
    """POT: refit the kept weights (and the bias) of one layer so that its output on the dense inputs matches
    the dense layer's in mean squared error: per output row, the exact least-squares solution on its kept
    inputs (Gram matrix of the unfolded inputs, a small ridge relative to its diagonal for stability).

    Grouped and depthwise convs are refitted too: an output row sees only its group's input channels, so every
    group has its own Gram matrix (a depthwise 3×3 row solves a 10×10 system: 9 taps and the bias)."""
    groups = getattr(module, "groups", 1)
    weight_param, bias_param = masking.raw(module), masking.raw(module, "bias")  # the parameters, never masked views
    has_bias = bias_param is not None
    gram, count = None, 0
    # a few samples at a time: a depthwise layer's unfolded input in float64 is 9× the activation, ×2 again
    for x in (part for batch in inputs for part in batch.split(16)):
        # unfold orders columns channel by channel, so each group owns one contiguous block of them
        cols = _columns(module, x).double()
        cols = cols.reshape(cols.shape[0], groups, -1)
        if has_bias:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], groups, 1)], 2)
        g = torch.einsum("ngi,ngj->gij", cols, cols)
        gram = g if gram is None else gram + g
        count += cols.shape[0]
    gram /= max(count, 1)  # (groups, d, d)
    weight = weight_param.reshape(weight_param.shape[0], -1).double()
    dense = torch.cat([weight, bias_param.double()[:, None]], 1) if has_bias else weight
    flat_mask = mask.reshape(mask.shape[0], -1)
    rows_per_group = dense.shape[0] // groups
    new = torch.zeros_like(dense)
    for group in range(groups):
        g_gram = gram[group]
        eye_scale = ridge * g_gram.diagonal().mean()
        rows = range(group * rows_per_group, (group + 1) * rows_per_group)
        target = dense[rows.start:rows.stop] @ g_gram  # X_allᵀ y for each row, y = X_all · dense_row
        for i, row in enumerate(rows):
            support = torch.nonzero(flat_mask[row]).flatten()
            if has_bias:
                support = torch.cat([support, torch.tensor([dense.shape[1] - 1])])
            sub = g_gram[support][:, support] + eye_scale * torch.eye(len(support), dtype=g_gram.dtype)
            new[row, support] = torch.linalg.solve(sub, target[i, support])
    if has_bias:
        bias_param.copy_(new[:, -1].to(bias_param.dtype))
        new = new[:, :-1]
    weight_param.copy_(new.reshape(weight_param.shape).to(weight_param.dtype))


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


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Attach (or replace) the masks of ``layers`` on the masking core."""
    for name, m in layers.items():
        masking.add_mask(m)
        masking.set_mask(m, masks[name])


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
