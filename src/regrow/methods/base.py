"""The sparsifier lifecycle, shaped like ``torch.optim``.

    sp = regrow.RigL(model, optimizer, sparsity=0.9, total_steps=10_000)
    for x, y in data:
        loss = criterion(model(x), y); optimizer.zero_grad(); loss.backward()
        optimizer.step()
        sp.step()                      # mask updates happen here, on the method's schedule
    sp.finalize()                      # bake the masks into the weights and remove them

Masks live in the model (``<layer>.weight_mask`` buffers in its ``state_dict``); the sparsifier's own
``state_dict()`` holds only its schedule position, random generator and update history, like an optimizer's.
Options given as a float in (0, 1] where a step count is expected (``t_end=0.75``) are fractions of
``total_steps``; integers are absolute step counts.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .. import distributed, masking
from ..allocation import DISTRIBUTIONS, keep_counts
from ..criteria import magnitude
from ..errors import ConfigError, check_sparsity, unknown
from ..mask_history import MaskTracker
from ..structures import NM, get_structure


def option_steps(value: int | float, total_steps: int | None, option: str) -> int:
    """An option in steps: a float in (0, 1] is a fraction of ``total_steps``, an int is absolute (what a
    sparsifier makes of ``t_end``, ``prune_at``, ...; a planner of runs can ask the same without building one)."""
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{option}={value} as a fraction of training must be in (0, 1]")
        if total_steps is None:
            raise ConfigError(f"{option}={value} is a fraction of training: pass total_steps")
        return max(1, int(round(value * total_steps)))
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"{option} must be a step count (int >= 0) or a fraction (float), got {value!r}")
    return value


class BaseSparsifier:
    """The lifecycle every sparsifier shares, whatever it masks: the model, the optimizer, the optimizer guard, a
    seeded generator, the step counter, the update history and the mask history, and ``state_dict``.

    Subclasses decide *what* is masked: :class:`Sparsifier` masks weight entries (unstructured, N:M),
    :class:`regrow.methods.channel.ChannelSparsifier` masks coupled channel groups under a cost budget. Each sets
    ``layers`` (the masked layers, name -> module), ``guard`` and ``skipped`` and implements :meth:`update`.

    Args:
        model: the network.
        optimizer: the optimizer that trains ``model`` (``None`` for mask-only use).
        total_steps: length of training, needed for options given as fractions.
        seed: seeds the sparsifier's own generator (random masks, random growth).
    """

    name = "base"
    family = "weight"  # what the registry files it under: weight masks (channel methods: "channel")
    grows = False  # brings pruned units back to train them (RigL, SET, IEE): every masked weight must be trainable
    # Options added with a default other than what runs before them did: a checkpoint or a regrow-written recipe
    # that does not record one ran with the value given here (resumes and repeats are checked against it).
    added_options: dict[str, Any] = {}

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 total_steps: int | None = None, seed: int = 0):
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= 0):
            raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.model, self.optimizer, self.total_steps = model, optimizer, total_steps
        self.layers: dict[str, nn.Module] = {}
        self.guard: masking.OptimizerGuard | None = None
        self.skipped: dict[str, str] = {}  # layers (or groups) left dense, and why
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self.tracker = MaskTracker()  # masks after every update, for IoU and survival metrics

    def check_trainable(self, layers: dict[str, nn.Module]) -> None:
        """A method that grows units trains what it grows: a masked weight that is frozen or outside the optimizer
        would get its grown units at 0 (or at stale values) for good, and RigL would find no gradient to rank by."""
        if not self.grows:
            return
        frozen = [n for n, m in layers.items() if not masking.raw(m).requires_grad]
        optimized = {id(p) for g in self.optimizer.param_groups for p in g["params"]} if self.optimizer else None
        outside = [n for n, m in layers.items() if optimized is not None and id(masking.raw(m)) not in optimized
                   and n not in frozen]
        for label, names in (("frozen (requires_grad=False)", frozen), ("not in the optimizer", outside)):
            if names:
                raise ConfigError(f"{self.name} trains the units it grows, but the weight of "
                                  f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''} is {label}: unfreeze "
                                  "it and give it to the optimizer, or leave it out (exclude; for channels, "
                                  "exclude_groups)")

    # ----- schedule helpers -------------------------------------------------------------------------------
    def steps(self, value: int | float, option: str) -> int:
        """An option in steps: a float in (0, 1] is a fraction of ``total_steps``, an int is absolute."""
        return option_steps(value, self.total_steps, option)

    def masks(self) -> dict[str, torch.Tensor]:
        """The sparse network's mask of every masked layer's weight."""
        return {n: masking.mask_of(m) for n, m in self.layers.items()}

    # ----- lifecycle --------------------------------------------------------------------------------------
    def initialize(self) -> None:
        """Set the starting masks (all ones by default)."""

    @property
    def exploring(self) -> bool:
        """True while the forward pass runs more than the sparse network (IEE's exploration stage)."""
        return False

    def step(self) -> None:
        """Call once after every ``optimizer.step()``.

        Under data parallelism the masks are compared across ranks at the first step and after every update (see
        :mod:`regrow.distributed`): ranks that disagree raise :class:`regrow.errors.DistributedError`."""
        self.step_count += 1
        updates = len(self.history)
        self.update(self.step_count)
        if distributed.active() and (self.step_count == 1 or len(self.history) != updates):
            distributed.check_same_masks(self.masks(), self.step_count)

    def update(self, step: int) -> None:
        """Change masks if the schedule says so at ``step`` (1-based: the number of optimizer steps taken)."""

    def densities(self) -> dict[str, float]:
        """Density of the sparse network per layer (from :meth:`masks`)."""
        return {n: float(m.sum()) / m.numel() for n, m in self.masks().items()}

    def forward_densities(self) -> dict[str, float]:
        """Densities as the forward pass runs now, for FLOPs accounting (IEE's exploration runs dense)."""
        return {n: masking.density(m) for n, m in self.layers.items()}

    def extra_flops(self, macs: dict[str, int], batch_size: int) -> float:
        """FLOPs this step spent beyond 3 × the forward (e.g. RigL's dense gradient at an update step)."""
        return 0.0

    def before_training(self, progress: bool = False) -> None:
        """Called once by a trainer before the first step (a channel method measures its latency table here)."""

    def summary_fields(self) -> dict[str, Any]:
        """Fields a method adds to (or overrides in) the run summary."""
        return {}

    def actual_sparsity(self) -> float:
        """Fraction of zeros of the sparse network over the masked layers (0 when there are none)."""
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "step_count": self.step_count, "generator": self.generator.get_state(),
                "history": [dict(h) for h in self.history], "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ConfigError(f"sparsifier state is for {state.get('method')!r}, not {self.name!r}")
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        self.history = [dict(h) for h in state["history"]]
        self.tracker.load_state_dict(state["tracker"])
        self.prepare()

    def prepare(self) -> None:
        """Set up what the next step needs (e.g. gradient capture); runs after every step and after loading."""

    @contextmanager
    def sparse_view(self) -> Iterator[None]:
        """Within this block the model runs as the sparse network (IEE overrides it during exploration)."""
        yield

    def finalize(self) -> nn.Module:
        """Bake masks into the weights, remove them and the optimizer guard; return the plain model."""
        if self.guard is not None:
            self.guard.remove()
        for module in self.layers.values():
            masking.remove_mask(module, bake=True)
        return self.model


class Sparsifier(BaseSparsifier):
    """Masks on the weight entries of the prunable layers of ``model``: unstructured or N:M.

    Args:
        model: the network; its Linear/Conv layers (or ``include`` minus ``exclude``) get masks.
        optimizer: the optimizer that trains ``model``; pruned and frozen entries are kept exact through its
            steps (see :class:`regrow.masking.OptimizerGuard`). ``None`` for mask-only use.
        sparsity: global target fraction of zeros over the masked layers, in [0, 1).
        distribution: ``uniform``, ``global``, ``er`` or ``erk`` (per-layer allocation).
        structure: ``unstructured`` or ``"N:M"``; N:M fixes every supported layer at N/M density, so
            ``sparsity`` must be 1 - N/M, and layers whose input dimension is not a multiple of M stay dense.
        total_steps: length of training, needed for options given as fractions.
        dense_first, dense_last: keep the first / last masked layer dense (any distribution).
        seed: seeds the sparsifier's own generator (random masks, random growth).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 sparsity: float = 0.9, distribution: str = "erk", structure: str = "unstructured",
                 total_steps: int | None = None, include: list[str] | None = None, exclude: list[str] = (),
                 dense_first: bool = False, dense_last: bool = False, seed: int = 0):
        super().__init__(model, optimizer, total_steps=total_steps, seed=seed)
        self.sparsity = check_sparsity(sparsity)
        if distribution not in DISTRIBUTIONS:
            raise unknown("distribution", distribution, DISTRIBUTIONS)
        self.distribution = distribution
        self.structure = get_structure(structure)
        self.dense_first, self.dense_last = dense_first, dense_last
        layers = masking.prunable_layers(model, include, exclude)
        if isinstance(self.structure, NM):
            if abs(self.sparsity - (1 - self.structure.density)) > 1e-9:
                raise ConfigError(f"{self.structure.name} sparsity is {1 - self.structure.density:g} by definition; "
                                  f"got sparsity={self.sparsity:g}")
            for name in [n for n, m in layers.items() if not self.structure.supports(m.weight.shape)]:
                self.skipped[name] = f"input dimension not a multiple of {self.structure.m}"
                del layers[name]
        if not layers:
            raise ConfigError("no prunable layer left to sparsify")
        self.check_trainable(layers)
        self.layers = layers
        for module in layers.values():
            masking.add_mask(module)
        self.guard = masking.OptimizerGuard(optimizer, layers.values()) if optimizer is not None else None
        self.initialize()

    # ----- masks ------------------------------------------------------------------------------------------
    def target_counts(self, sparsity: float | None = None) -> dict[str, int]:
        """Keep counts per layer at ``sparsity`` (default: the target) under this distribution and structure."""
        sparsity = self.sparsity if sparsity is None else sparsity
        shapes = {n: m.weight.shape for n, m in self.layers.items()}
        if isinstance(self.structure, NM):
            return {n: self.structure.keep_count(s, self.structure.density) for n, s in shapes.items()}
        scores = None
        if self.distribution == "global":
            scores = {n: magnitude(m.weight) for n, m in self.layers.items()}  # the masked values
        return keep_counts(shapes, sparsity, self.distribution, dense_first=self.dense_first,
                           dense_last=self.dense_last, scores=scores)

    def set_layer_mask(self, name: str, new_mask: torch.Tensor, zero_grown: bool = False,
                       keep_grown_state: bool = False) -> dict[str, int]:
        """Install ``new_mask`` on layer ``name``; changed entries get fresh optimizer state.

        ``zero_grown`` sets newly activated weights to 0 (RigL, SET); otherwise they come back with their
        most recent value (IEE's MRU). ``keep_grown_state`` lets grown entries keep the optimizer state they hold
        (IEE's ``grown_state="explored"``: what their exploration built). Returns counts of dropped and grown
        entries.
        """
        module = self.layers[name]
        old = masking.mask_of(module)
        grown, dropped = new_mask & ~old, old & ~new_mask
        with torch.no_grad():
            if zero_grown:
                masking.raw(module).masked_fill_(grown, 0.0)
            masking.set_mask(module, new_mask)
        changed = dropped if keep_grown_state else grown | dropped
        masking.reset_optimizer_state(self.optimizer, masking.raw(module), changed)
        return {"dropped": int(dropped.sum()), "grown": int(grown.sum())}

    def select_masks(self, scores: dict[str, torch.Tensor], counts: dict[str, int],
                     zero_inactive: bool = False) -> None:
        """Every layer keeps its ``counts[name]`` highest-scored units.

        ``zero_inactive`` is for a sparse *start*: the network then is W ⊙ M, so a unit that was never active has
        no value to remember but 0 (IEE's explorations start from it; RigL and SET grow at 0 anyway).
        """
        for name, module in self.layers.items():
            mask = self.structure.select(scores[name], counts[name])
            self.set_layer_mask(name, mask)
            if zero_inactive:
                with torch.no_grad():
                    masking.raw(module).masked_fill_(~mask, 0.0)

    def random_masks(self, counts: dict[str, int], zero_inactive: bool = True) -> None:
        """A sparse start: random masks at the given counts (sparsifier's generator); inactive weights zero unless
        ``zero_inactive`` is False (they then keep their initial values, as in a masked-dense implementation)."""
        scores = {n: self.random_scores(m) for n, m in self.layers.items()}
        self.select_masks(scores, counts, zero_inactive=zero_inactive)

    def random_scores(self, module: nn.Module) -> torch.Tensor:
        """Uniform scores for ``module``'s weight from the sparsifier's generator, drawn on the CPU and moved to the
        weight's device: the same seed gives the same masks on every device."""
        return torch.rand(module.weight.shape, generator=self.generator).to(module.weight.device)


def method_options(cls: type) -> dict[str, Any]:
    """Keyword options of a sparsifier class and its bases, with defaults (for help texts and validation)."""
    options: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and issubclass(klass, BaseSparsifier):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY:
                    options[p.name] = p.default
    return options
