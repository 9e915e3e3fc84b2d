"""IEE — Iterative Exploitation–Exploration (WACV 2025), for unstructured and N:M sparsity.

One criterion both prunes and grows. A cycle is H + J + Q optimizer steps; cycles repeat until ``t_end``,
then the mask is fixed. :meth:`IEE.update` dispatches the five stages:

    1. estimate_importance  (every step of the first H): score the active set Θ_K
    2. prune                (after step H): move Ω_t lowest-scored active units to Θ_P (values kept)
    3. improve accuracy     (next J steps): ordinary training of the smaller Θ_K
    4. reactivate_and_explore (after step H + J): unmask all of Θ_P, train it for Q steps (Θ_K frozen in the paper)
    5. grow                 (after the last step): move the Ω_t best units of Θ_P back by the same criterion

Ω_t per layer is ⌊f(t) · active count⌋ with RigL's cosine fraction f (or exponential), so pruned = grown and
per-layer density is constant (``ranking="global"`` ranks all layers together instead, keeping the total).
A layer the allocation makes dense (ERK does this to small layers) has no Θ_P: IEE leaves it alone, as RigL does.
Exploration starts every unit of Θ_P from its most recent value (MRU) with zero optimizer state (pruned entries
never keep any) and runs the full network forward (counted dense in training FLOPs). A unit that was never active
holds its initial random value (``never_active="init"``, as in a masked-dense implementation where only the mask
is applied) or 0 (``"zero"``: the sparse start is W ⊙ M); between the two, ``never_active_scale`` shrinks the
initial values of the never-active units by a factor (how far the exploring network departs from the sparse one
is what separates the two choices; measured: README, "IEE"). The explored units move at ``explore_lr_scale``
times the current learning rate (a per-entry step scale in the optimizer guard, so the rest of the network keeps
the full rate). By default Θ_K, BatchNorm and every other parameter go on training at the normal rate while Θ_P
explores (``freeze_active=False``), and the first update fraction α is 0.1: both depart from the paper, whose
exploration freezes everything that is not an explored unit (BatchNorm included: it belongs to Θ_K) and which takes
RigL's α = 0.3; ``freeze_active=True, alpha=0.3`` is the paper's cycle. The defaults of ``never_active``,
``explore_lr_scale``, ``freeze_active`` and ``alpha`` were chosen by measurement (README, "IEE").

Ablation switches: ``explore=False`` (the Q steps train Θ_K as usual, growth ranks the stale |w| of Θ_P, which
with ``never_active="init"`` includes units that were never active), ``improve_steps=0`` (no J stage),
``grow_init="zero"`` (grown weights start at 0 instead of their explored value).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .. import masking
from ..criteria import NEEDS_GRADIENT, ScoreAccumulator, get_criterion, magnitude
from ..errors import ConfigError, unknown
from ..schedules import check_schedule, update_fraction
from ..structures import NM
from .base import Sparsifier

RANKINGS = ("layer", "global")
GROW_INITS = ("mru", "zero")
GROWN_STATES = ("fresh", "explored")  # a grown unit's optimizer state: zero, or what its exploration built
NEVER_ACTIVE = ("init", "zero")  # what a never-active unit holds: its initial random value, or 0
# Defaults of the open choices that decide how much exploration explores, chosen by measurement (README, "IEE").
DEFAULT_NEVER_ACTIVE = "zero"  # +0.8 to +1.6 points on ResNet-8 at 90-98 %, -0.1 to -0.3 on the MLP (README)
DEFAULT_EXPLORE_LR_SCALE = 0.1
# Two departures from the paper's cycle, taken together: Θ_K (and BatchNorm) train on while Θ_P explores, and the
# first update fraction is 0.1 instead of RigL's 0.3. Together they cut the re-admission share from 56-76 % to
# 14-37 % and beat RigL by more than the s.e. on the MLP and ResNet-8 at 90, 95 and 98 % (README, "IEE");
# PAPER_CYCLE gives the paper's cycle back (and was the default before).
DEFAULT_FREEZE_ACTIVE = False
DEFAULT_ALPHA = 0.1
PAPER_CYCLE = {"freeze_active": True, "alpha": 0.3}  # Θ_K frozen while Θ_P explores, RigL's update fraction


def split_global(scores: dict[str, torch.Tensor], eligible: dict[str, torch.Tensor], k: int,
                 largest: bool) -> dict[str, int]:
    """How many of the ``k`` globally best (or worst) eligible units fall in each layer."""
    names = list(scores)
    fill = float("-inf") if largest else float("inf")
    flat = torch.cat([scores[n].float().masked_fill(~eligible[n], fill).reshape(-1) for n in names])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, k, largest=largest).indices] = True
    counts, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        counts[n] = int(chosen[offset: offset + size].sum())
        offset += size
    return counts


class IEECycle:
    """The IEE cycle as a schedule: H + J + Q steps repeated until ``t_end``, the five stages dispatched as five
    calls. Shared by weight IEE (:class:`IEE`) and channel IEE (:class:`regrow.methods.channel.ChannelIEE`), which
    supply the stages themselves and scale the explored entries' steps by ``explore_lr_scale``
    (:func:`regrow.masking.set_step_scale`)."""

    grows = True

    def _setup_cycle(self, optimizer, estimate_steps: int, improve_steps: int, explore_steps: int,
                     t_end: int | float, explore_lr_scale: float, max_cycles: int | None = None) -> None:
        for option, value in (("estimate_steps", estimate_steps), ("explore_steps", explore_steps)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{option} must be a positive number of steps, got {value!r}")
        if not isinstance(improve_steps, int) or improve_steps < 0:
            raise ConfigError(f"improve_steps must be a number of steps >= 0, got {improve_steps!r}")
        if not explore_lr_scale > 0:
            raise ConfigError(f"explore_lr_scale must be > 0, got {explore_lr_scale}")
        if optimizer is None:
            raise ConfigError("IEE needs the optimizer: exploration freezes the active weights through it")
        self.H, self.J, self.Q = estimate_steps, improve_steps, explore_steps
        self.explore_lr_scale = explore_lr_scale
        self.t_end = self.steps(t_end, "t_end")
        self.update_fraction = update_fraction(self.schedule, self.alpha, self.t_end)
        if max_cycles is not None and (not isinstance(max_cycles, int) or isinstance(max_cycles, bool)
                                       or max_cycles < 1):
            raise ConfigError(f"max_cycles must be a number of cycles >= 1, got {max_cycles!r}")
        # Ω_t keeps its schedule to t_end either way: a run stopped early cuts as the full run does until it stops
        self.cycles = min(self.t_end // self.cycle_length, max_cycles or self.t_end)
        if self.cycles == 0:
            raise ConfigError(f"no IEE cycle of {self.cycle_length} steps (H + J + Q) fits before t_end = "
                              f"{self.t_end} steps; shorten H, J, Q or train longer")

    @property
    def cycle_length(self) -> int:
        return self.H + self.J + self.Q

    # ----- where in the cycle are we ----------------------------------------------------------------------
    def position(self, step: int) -> int | None:
        """1-based position of optimizer step ``step`` in its cycle, or None once the cycles are over."""
        if step < 1 or step > self.cycles * self.cycle_length:
            return None
        return (step - 1) % self.cycle_length + 1

    def stage(self, step: int) -> str:
        pos = self.position(step)
        if pos is None:
            return "fixed"
        if pos <= self.H:
            return "estimate"
        if pos <= self.H + self.J:
            return "improve"
        return "explore" if self.explore else "improve"

    @property
    def exploring(self) -> bool:
        return self.active is not None

    # ----- the cycle --------------------------------------------------------------------------------------
    def update(self, step: int) -> None:
        pos = self.position(step)
        if pos is not None:
            if pos <= self.H:
                self.estimate_importance()
            if pos == self.H:
                self.prune(step)
            if pos > self.H + self.J and self.exploring:
                self.accumulate_exploration()
            if pos == self.H + self.J and self.explore:
                self.reactivate_and_explore()
            if pos == self.cycle_length:
                self.grow(step)
        self.prepare()


class IEE(IEECycle, Sparsifier):
    """Iterative Exploitation–Exploration. See the module docstring for the cycle and the switches.

    Args (beyond :class:`Sparsifier`'s):
        estimate_steps, improve_steps, explore_steps: H, J and Q (default 50 each: Fashion-MNIST scale).
        criterion: ``magnitude`` (default), ``taylor`` or ``gradient``; gradient criteria accumulate over the
            H steps (active units) and the Q steps (explored units).
        alpha, schedule, t_end: Ω_t = ⌊f(t)·active⌋, f the ``cosine`` or ``exponential`` fraction from alpha
            (default 0.1; the paper takes RigL's 0.3), no cycle may end after ``t_end`` (default 75 % of training).
        ranking: ``layer`` (keeps each layer's density, default) or ``global``.
        start: ``random`` (default) or ``magnitude`` start mask at the allocation's densities.
        never_active: ``zero`` (sparse start W ⊙ M, the default) or ``init`` (never-active units keep their
            initial values).
        never_active_scale: with ``init``, the never-active units' initial values times this factor in (0, 1]
            (1: unchanged). Active units keep their initial values.
        explore_lr_scale: learning-rate factor of the explored units.
        freeze_active: freeze Θ_K during exploration, as the paper does (default False: Θ_K trains on).
        explore, freeze_bn, grow_init: exploration switches and ablations; ``freeze_bn`` (BatchNorm frozen during
            exploration) defaults to ``freeze_active``.
        grown_state: a grown unit's optimizer state (momentum, Adam's moments): ``fresh`` (zero, default, as
            RigL's grown weights) or ``explored`` (what its Q exploration steps built).
        max_cycles: stop after this many cycles, the mask fixed from then on (default: every cycle that fits
            before ``t_end``); Ω_t keeps its schedule to ``t_end``, so the cycles run cut as the full run's first
            ones do (a shorter ``t_end`` would shrink every cut).
    """

    name = "iee"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 estimate_steps: int = 50, improve_steps: int = 50, explore_steps: int = 50,
                 criterion: str = "magnitude", alpha: float = DEFAULT_ALPHA, schedule: str = "cosine",
                 t_end: int | float = 0.75, ranking: str = "layer", start: str = "random",
                 never_active: str = DEFAULT_NEVER_ACTIVE, never_active_scale: float = 1.0,
                 explore_lr_scale: float = DEFAULT_EXPLORE_LR_SCALE,
                 explore: bool = True, freeze_active: bool = DEFAULT_FREEZE_ACTIVE, freeze_bn: bool | None = None,
                 grow_init: str = "mru", grown_state: str = "fresh", max_cycles: int | None = None, **base: Any):
        get_criterion(criterion)
        check_schedule(schedule)
        if ranking not in RANKINGS:
            raise unknown("ranking", ranking, RANKINGS)
        if start not in ("random", "magnitude"):
            raise unknown("start mask", start, ["random", "magnitude"])
        if grow_init not in GROW_INITS:
            raise unknown("grow_init", grow_init, GROW_INITS)
        if grown_state not in GROWN_STATES:
            raise unknown("grown_state", grown_state, GROWN_STATES)
        if never_active not in NEVER_ACTIVE:
            raise unknown("never_active", never_active, NEVER_ACTIVE)
        if not 0.0 < never_active_scale <= 1.0:
            raise ConfigError(f"never_active_scale must be in (0, 1], got {never_active_scale}")
        if never_active == "zero" and never_active_scale != 1.0:
            raise ConfigError("never_active_scale scales the initial values of never_active=init; with "
                              "never_active=zero (the default) there are none to scale: pass never_active=init too")
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"alpha (initial update fraction) must be in (0, 1), got {alpha}")
        if optimizer is None:
            raise ConfigError("IEE needs the optimizer: exploration freezes the active weights through it")
        self.criterion, self.alpha, self.schedule, self.ranking, self.start = criterion, alpha, schedule, ranking, start
        self.never_active, self.never_active_scale = never_active, never_active_scale
        self.explore, self.freeze_active = explore, freeze_active
        self.freeze_bn = freeze_active if freeze_bn is None else freeze_bn
        self.grow_init, self.grown_state = grow_init, grown_state
        self.active: dict[str, torch.Tensor] | None = None  # Θ_K while exploring (the layer masks are all ones)
        self.omega: dict[str, int] = {}  # units pruned this cycle, per layer (grown back at its end)
        self.pruned: dict[str, torch.Tensor] = {}  # which units this cycle's prune took (for the mask metrics)
        self.accumulators: dict[str, ScoreAccumulator] = {}
        self._cycle_record: dict[str, Any] = {}  # what this cycle's prune did, completed by its grow
        super().__init__(model, optimizer, **base)
        if ranking == "global" and isinstance(self.structure, NM):
            raise ConfigError("global ranking cannot keep N:M groups full; use ranking=layer")
        self._setup_cycle(optimizer, estimate_steps, improve_steps, explore_steps, t_end, explore_lr_scale,
                          max_cycles)
        self.prepare()

    def initialize(self) -> None:
        counts = self.target_counts()
        # Layers the allocation keeps dense have nothing to explore: no prune, no grow (as RigL leaves them).
        self.cycled = [n for n, m in self.layers.items() if counts[n] < m.weight.numel()]
        zero = self.never_active == "zero"
        if self.start == "random":
            self.random_masks(counts, zero_inactive=zero)
        else:
            self.select_masks({n: magnitude(masking.raw(m)) for n, m in self.layers.items()}, counts,
                              zero_inactive=zero)
        if self.never_active_scale != 1.0:
            with torch.no_grad():
                for module in self.layers.values():
                    weight, mask = masking.raw(module), masking.mask_of(module)
                    weight.copy_(torch.where(mask, weight, weight * self.never_active_scale))
        self._last_masks = self.masks()

    # ----- the five stages ---------------------------------------------------------------------------------
    def estimate_importance(self) -> None:
        """Stage 1 (each of the H steps): accumulate a gradient criterion over the active units."""
        if self.criterion in NEEDS_GRADIENT:
            self._accumulate()

    def _accumulate(self) -> None:
        for name, module in self.layers.items():
            grad = masking.dense_grad(module)
            if grad is None:
                raise ConfigError(f"IEE's {self.criterion} criterion found no gradient for {name!r} at step "
                                  f"{self.step_count}: either sp.step() did not follow that step's loss.backward() "
                                  "and optimizer.step(), or the layer's weight took no part in the forward "
                                  "(exclude it)")
            self.accumulators.setdefault(name, ScoreAccumulator(self.criterion)).add(masking.raw(module), grad)
            masking.clear_dense_grad(module)  # consumed: the next step records its own gradient

    def scores(self) -> dict[str, torch.Tensor]:
        """The criterion's current scores per layer (|w|, or the accumulated gradient criterion)."""
        if self.criterion in NEEDS_GRADIENT:
            out = {n: acc.score() for n, acc in self.accumulators.items()}
            self.accumulators = {}
            return out
        return {n: magnitude(masking.raw(m)) for n, m in self.layers.items()}  # the values Θ_P holds too

    def prune(self, step: int) -> None:
        """Stage 2: move Ω_t lowest-scored active units of every cycled layer to Θ_P; their values stay in memory."""
        fraction = self.update_fraction(step)
        scores, masks = self.scores(), self.masks()
        if self.ranking == "global":
            total = int(fraction * sum(int(masks[n].sum()) for n in self.cycled))
            self.omega = split_global({n: scores[n] for n in self.cycled}, {n: masks[n] for n in self.cycled},
                                      total, largest=False)
        else:
            self.omega = {n: int(fraction * int(masks[n].sum())) for n in self.cycled}
        for name in self.cycled:
            self.set_layer_mask(name, self.structure.prune(masks[name], scores[name], self.omega[name]))
        after = self.masks()
        self.pruned = {n: masks[n] & ~after[n] for n in self.layers}
        self._cycle_record = {"step": step, "fraction": fraction, "pruned": sum(self.omega.values())}

    def reactivate_and_explore(self) -> None:
        """Stage 4 (start): every unit of Θ_P joins the forward with its most recent value (Θ_K frozen with
        ``freeze_active``)."""
        self.active = self.masks()
        for name, module in self.layers.items():
            masking.reset_optimizer_state(self.optimizer, masking.raw(module), ~self.active[name])  # zero momentum
        self._open_exploration()

    def _open_exploration(self) -> None:
        """All units in the forward; the explored ones train at the exploration rate, the rest as the switches say.
        (Also re-opens an exploration after loading a checkpoint taken in the middle of one.)"""
        for name, module in self.layers.items():
            explored = ~self.active[name]
            masking.set_mask(module, torch.ones_like(explored))
            masking.set_trainable(module, explored if self.freeze_active else torch.ones_like(explored))
            masking.set_step_scale(module, explored if explored.any() else None, self.explore_lr_scale)
        masked_weights = {id(masking.raw(m)) for m in self.layers.values()}
        frozen: list[torch.Tensor] = []
        for module in self.model.modules():
            is_bn = isinstance(module, nn.modules.batchnorm._NormBase)
            if not (self.freeze_bn if is_bn else self.freeze_active):
                continue
            frozen += [p for p in module.parameters(recurse=False) if id(p) not in masked_weights]
            if is_bn:
                frozen += [b for b in module.buffers(recurse=False) if b is not None]
        self.guard.freeze(frozen)

    def accumulate_exploration(self) -> None:
        """Stage 4 (each of the Q steps): gradient criteria accumulate over the explored units too."""
        if self.criterion in NEEDS_GRADIENT:
            self._accumulate()

    def grow(self, step: int) -> None:
        """Stage 5: the Ω_t best units of Θ_P by the same criterion rejoin Θ_K; the rest are masked again."""
        explored = self.exploring
        if explored:
            scores = self.scores()
            active = self.active
            self._end_exploration(active)
        else:  # ablation: no exploration, rank Θ_P by the magnitudes it holds
            self.accumulators = {}
            scores = {n: magnitude(masking.raw(m)) for n, m in self.layers.items()}
            active = self.masks()
        if self.ranking == "global":
            counts = split_global({n: scores[n] for n in self.cycled}, {n: ~active[n] for n in self.cycled},
                                  sum(self.omega.values()), largest=True)
        else:
            counts = self.omega
        for name in self.cycled:
            module = self.layers[name]
            new_mask = self.structure.grow(active[name], scores[name], counts[name])
            if self.grow_init == "zero":
                with torch.no_grad():
                    masking.raw(module).masked_fill_(new_mask & ~active[name], 0.0)
            # Only an explored unit has state to keep (the explore=false ablation trains none of Θ_P).
            self.set_layer_mask(name, new_mask, keep_grown_state=explored and self.grown_state == "explored")
        masks = self.masks()
        record = {**self._cycle_record, "grow_step": step, "grown": sum(counts.values())}
        self.history.append(record)
        self.tracker.record(step, self._last_masks, masks, pruned=self.pruned)
        self._last_masks = masks
        self.omega, self.pruned = {}, {}

    def _end_exploration(self, active: dict[str, torch.Tensor]) -> None:
        for name, module in self.layers.items():
            masking.set_mask(module, active[name])
            masking.set_trainable(module, None)
            masking.set_step_scale(module, None)
        self.guard.unfreeze()
        self.active = None

    # ----- bookkeeping ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        wanted = self.criterion in NEEDS_GRADIENT and self.stage(self.step_count + 1) in ("estimate", "explore")
        for module in self.layers.values():
            masking.capture_dense_grad(module, wanted)

    def masks(self) -> dict[str, torch.Tensor]:
        """Θ_K per layer (during exploration the layers' own masks are all ones)."""
        if self.active is not None:
            return {n: a.clone() for n, a in self.active.items()}
        return super().masks()

    @contextmanager
    def sparse_view(self) -> Iterator[None]:
        """Evaluate the sparse network Θ_K even in the middle of an exploration stage."""
        if not self.exploring:
            yield
            return
        for name, module in self.layers.items():
            masking.set_mask(module, self.active[name])
        try:
            yield
        finally:
            for module in self.layers.values():
                masking.set_mask(module, torch.ones_like(module.weight_mask, dtype=torch.bool))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(omega=dict(self.omega), active=None if self.active is None else dict(self.active),
                     pruned=dict(self.pruned), last_masks=dict(self._last_masks),
                     cycle_record=dict(self._cycle_record),
                     accumulators={n: {"total": a.total, "count": a.count} for n, a in self.accumulators.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = next(iter(self.layers.values())).weight.device
        self.omega = {k: int(v) for k, v in state["omega"].items()}
        self.pruned = {k: v.bool().to(device) for k, v in state.get("pruned", {}).items()}
        self._last_masks = {k: v.bool().to(device) for k, v in state["last_masks"].items()}
        self._cycle_record = dict(state["cycle_record"])
        self.accumulators = {}
        for name, acc in state["accumulators"].items():
            self.accumulators[name] = ScoreAccumulator(self.criterion)
            self.accumulators[name].total = acc["total"].to(device) if torch.is_tensor(acc["total"]) else acc["total"]
            self.accumulators[name].count = int(acc["count"])
        self.guard.unfreeze()
        self.active = None
        if state["active"] is not None:  # resume in the middle of an exploration stage
            self.active = {k: v.bool().to(device) for k, v in state["active"].items()}
            self._open_exploration()
        self.prepare()

    def finalize(self) -> nn.Module:
        if self.exploring:
            self._end_exploration(self.active)
        return super().finalize()
