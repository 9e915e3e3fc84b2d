"""Channel sparsity under a latency (or MACs) budget: HALP, and IEE over coupled channel groups.

Both are compositions of the same pieces: coupled channel groups and soft channel masks
(:mod:`regrow.channels.groups`), HALP's Taylor-BN importance accumulated over an interval, a cost model (a latency table
measured on this device, or MACs; :mod:`regrow.channels.costs`) and the prefix knapsack (:mod:`regrow.channels.budget`).
They differ in the schedule: HALP only prunes, towards the target along an exponential path, from a pretrained
model; channel IEE prunes a fraction Ω_t of the budget, lets every pruned channel explore with the active ones
frozen, and grows back by the same importance until the budget is full again (the knapsack with the active
channels forced in).

Latency figures are *predicted* by the table (the sum of the layers' measured latencies at their current
widths); the exported model's real latency is measured separately (``regrow bench-latency``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .. import masking
from ..channels.budget import ChannelBudget
from ..channels.costs import COSTS, make_cost_model
from ..channels.groups import ChannelMasks, channel_groups
from ..criteria import channel_taylor
from ..errors import CheckpointError, ConfigError, unknown
from ..schedules import check_schedule, exponential_path
from .base import BaseSparsifier
from .iee import IEECycle


class ChannelSparsifier(BaseSparsifier):
    """Channel masks over the coupled groups of ``model``, a cost model and a budget.

    Args:
        latency_target: the budget as a fraction of the dense model's cost, in (0, 1).
        cost: ``latency`` (a table measured on the model's device, cached on disk) or ``macs``.
        group_size: G, channels per knapsack item (HALP: 32-128 on ResNet-50; 4 suits the small nets here).
        input_shape: one sample's shape (channels, height, width), for tracing and the cost model (required: the
            trainer passes its data's).
        input_dtype: ``float`` (default) or ``int64``: a model that takes token ids is traced on ids (all 1: a real
            token, not padding).
        prune_first: allow pruning the first conv's output channels (HALP never does; default False).
        exclude_groups: groups to leave whole, by root layer name (a list, or names separated by commas).
            Groups regrow cannot prune exactly (a grouped conv, a LayerNorm or unknown layer in them) are left
            whole too, with a warning; ``skipped`` lists every group left whole and why.
        latency_batch: batch size the latency table is measured at (stated with every latency figure).
        latency_epilogues: time each layer's cells with the BatchNorm and activation modules that run on its output
            (default True: in ``bench/latency_fidelity.py`` the largest errors of predicted speed-ups fell on
            ResNet-20 and MobileNetV2, the mean stayed about the same); False times the bare layers.
        cache_dir: where the latency table is cached (default ``$REGROW_CACHE_DIR`` or ``~/.cache/regrow``).
        resolution: grid steps of the knapsack's budget.
        min_width: every group keeps at least this fraction of its channels (in whole chunks of G; default 0: one
            chunk), whatever the importance says; see :class:`regrow.channels.budget.ChannelBudget`.
        cost_model: a ready cost model (a callable ``(layer, c_in, c_out) -> cost``), e.g. a shared table.
    """

    name = "channel"
    family = "channel"  # channel groups under a cost budget (see methods.registry)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 latency_target: float = 0.5, cost: str = "latency", group_size: int = 4,
                 input_shape: tuple[int, ...] | list[int] | None = None, input_dtype: str = "float",
                 prune_first: bool = False,
                 exclude_groups: list[str] | str = (), latency_batch: int = 64, latency_epilogues: bool = True,
                 cache_dir: str | None = None,
                 resolution: int = 2000, min_width: float = 0.0, total_steps: int | None = None, seed: int = 0,
                 cost_model=None):
        if not isinstance(latency_target, (int, float)) or not 0.0 < latency_target < 1.0:
            raise ConfigError("latency_target is a fraction of the dense model's cost in (0, 1), "
                              f"got {latency_target!r}")
        if cost not in COSTS:
            raise unknown("cost model", cost, COSTS)
        if not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"group_size must be a positive integer, got {group_size!r}")
        super().__init__(model, optimizer, total_steps=total_steps, seed=seed)
        self.latency_target, self.group_size = float(latency_target), group_size
        if input_shape is None:
            raise ConfigError("channel methods trace the model: pass input_shape, one sample's shape such as "
                              "(3, 32, 32)")
        if input_dtype not in ("float", "int64"):
            raise unknown("input_dtype", input_dtype, ("float", "int64"))
        param = next(model.parameters())
        example = (torch.ones(1, *input_shape, device=param.device, dtype=torch.long) if input_dtype == "int64"
                   else torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
        convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        ignored = [] if prune_first or not convs else [convs[0]]
        every_group = channel_groups(model, example, ignored=ignored)
        if isinstance(exclude_groups, str):
            exclude_groups = [n for n in exclude_groups.split(",") if n]
        roots = {g.root for g in every_group}
        unknown_roots = sorted(set(exclude_groups) - roots)
        if unknown_roots:
            raise ConfigError(f"exclude_groups: no channel group with root {', '.join(map(repr, unknown_roots))}; "
                              f"groups: {', '.join(sorted(roots))}")
        self.skipped.update({n: "first conv (HALP never prunes it)" for n in ignored})
        for g in every_group:
            if g.root in exclude_groups:
                self.skipped[g.root] = "group left whole: exclude_groups"
            elif g.excluded:
                self.skipped[g.root] = f"group left whole: {g.excluded}"
        cannot = [g for g in every_group if g.excluded and g.root not in exclude_groups]
        if cannot:
            warnings.warn(f"{len(cannot)} channel group(s) left whole: " + "; ".join(
                f"{g.root} ({g.excluded})" for g in cannot), stacklevel=2)
        self.groups = [g for g in every_group if not g.excluded and g.root not in exclude_groups]
        if not self.groups:
            raise ConfigError("the model has no prunable channel group"
                              + (f" ({len(every_group)} left whole: see the warning)" if every_group else ""))
        if not isinstance(latency_epilogues, bool):
            raise ConfigError(f"latency_epilogues must be true or false, got {latency_epilogues!r}")
        # what prices the budget, for resume: cells with or without epilogues when this sparsifier built its table
        self.latency_epilogues = latency_epilogues if cost == "latency" and cost_model is None else None
        self.cost_model = cost_model or make_cost_model(
            cost, model, example, epilogues=latency_epilogues,
            **({"device": param.device, "batch_size": latency_batch, "cache_dir": cache_dir}
               if cost == "latency" else {}))
        modules = dict(model.named_modules())
        self.check_trainable({n: modules[n] for g in self.groups for n, _, _ in g.members
                              if isinstance(modules[n], masking.PRUNABLE_TYPES)})  # before any mask is added
        self.channels = ChannelMasks(model, self.groups)
        self.layers = {n: m for n, m in self.channels.modules.items() if isinstance(m, masking.PRUNABLE_TYPES)}
        self.guard = masking.OptimizerGuard(optimizer, self.channels.modules.values()) if optimizer else None
        self.allocator = ChannelBudget(model, self.groups, self.cost_model, group_size, resolution, min_width)
        self.importance = [torch.zeros(g.size) for g in self.groups]
        self.importance_steps = 0
        self._first_conv_kept = bool(ignored)
        self._set_budget()
        self.initialize()

    def _set_budget(self) -> None:
        """The dense cost and the budget it gives, refused below what the model reaches with the fewest channels."""
        self.dense_cost = self.allocator.cost_of([g.size for g in self.groups])
        self.budget = self.latency_target * self.dense_cost
        floor = self.allocator.cost_of([self.allocator.fewest(i) for i in range(len(self.groups))])
        if self.budget < floor:
            min_width = self.allocator.min_width
            fewest = (f"{min_width:g} of every group's channels" if min_width else
                      f"one group of {self.group_size} channels per layer")
            raise ConfigError(f"latency_target={self.latency_target:g} ({self.budget:.4g} {self.cost_model.unit}) is "
                              f"below what this model reaches with {fewest} "
                              f"({floor:.4g} {self.cost_model.unit} = {floor / self.dense_cost:.3f} of dense)"
                              + ("; the first conv's channels are kept (prune_first=false), which in a CIFAR-style "
                                 "ResNet keeps the whole first stage: try prune_first=true"
                                 if self._first_conv_kept else ""))

    # ----- costs ------------------------------------------------------------------------------------------
    def precompute_costs(self, progress: bool = False) -> int:
        """Measure every cost the allocator can ask for now, not in the middle of training (see
        :meth:`regrow.channels.budget.ChannelBudget.precompute`); returns the number of cells. A build re-times the
        dense network's cells at its end, so the dense cost and the budget are read again after it."""
        cells = self.allocator.precompute(progress=progress)
        self._set_budget()
        return cells

    def before_training(self, progress: bool = False) -> None:
        if self.cost_model.name == "latency":  # measured now, not in the middle of training
            self.precompute_costs(progress=progress)

    def summary_fields(self) -> dict[str, Any]:
        return {"sparsity_target": None, "channels": self.budget_report()}

    def kept_counts(self) -> list[int]:
        return [int(k.sum()) for k in self.active_keep()]

    def predicted_cost(self) -> float:
        """The cost model's figure for the sparse network now (Θ_K, even mid-exploration)."""
        return self.allocator.cost_of(self.kept_counts())

    def active_keep(self) -> list[torch.Tensor]:
        return [k.clone() for k in self.channels.keep]

    # ----- importance -------------------------------------------------------------------------------------
    def accumulate_importance(self) -> None:
        """Add this step's HALP importance (from the current gradients) to every group's running sum."""
        for i in range(len(self.groups)):
            self.importance[i] += channel_taylor(self.channels, i)
        self.importance_steps += 1

    def take_importance(self) -> list[torch.Tensor]:
        """The importance averaged over the steps since the last call (then reset)."""
        steps = max(self.importance_steps, 1)
        scores = [s / steps for s in self.importance]
        self.importance = [torch.zeros(g.size) for g in self.groups]
        self.importance_steps = 0
        return scores

    def install(self, keeps: list[torch.Tensor]) -> dict[str, int]:
        """Set every group's kept channels; entries that change get fresh optimizer state."""
        before = {(n, p): masking.mask_of(m, p) for n, m in self.channels.modules.items()
                  for p in masking.masked_params(m)}
        dropped = sum(int((self.channels.keep[i] & ~k).sum()) for i, k in enumerate(keeps))
        grown = sum(int((k & ~self.channels.keep[i]).sum()) for i, k in enumerate(keeps))
        for i, keep in enumerate(keeps):
            if not torch.equal(keep, self.channels.keep[i]):
                self.channels.set_keep(i, keep)
        for (name, param), old in before.items():
            module = self.channels.modules[name]
            changed = old ^ masking.mask_of(module, param)
            if changed.any():
                masking.reset_optimizer_state(self.optimizer, masking.raw(module, param), changed)
        return {"dropped_channels": dropped, "grown_channels": grown}

    # ----- lifecycle --------------------------------------------------------------------------------------
    def finalize(self) -> nn.Module:
        """Bake the channel masks into every member of every group (convs, linears *and* norms) and remove them."""
        if self.guard is not None:
            self.guard.remove()
        for module in self.channels.modules.values():
            masking.remove_mask(module, bake=True)
        return self.model

    def budget_report(self) -> dict[str, Any]:
        return {"cost_model": self.cost_model.name, "unit": self.cost_model.unit, "dense_cost": self.dense_cost,
                "budget": self.budget, "predicted_cost": self.predicted_cost(),
                "predicted_fraction": self.predicted_cost() / self.dense_cost,
                "kept_channels": dict(zip([g.root for g in self.groups], self.kept_counts())),
                "group_channels": {g.root: g.size for g in self.groups},
                "head_groups": [g.root for g in self.groups if g.unit == "head"],  # their counts are whole heads
                # every mask update's kept channels per group (the order of group_channels): how the widths moved
                "widths_history": [{"step": h.get("grow_step", h["step"]), "kept_channels": h["kept_channels"]}
                                   for h in self.history if "kept_channels" in h],
                "cost_table": self.cost_model.fingerprint() if hasattr(self.cost_model, "fingerprint") else None}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(keep=self.channels.state_dict(), importance=list(self.importance),
                     importance_steps=self.importance_steps, latency_epilogues=self.latency_epilogues)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A run's budget is priced by one kind of latency cell from start to end; state saved before the option
        # existed was priced by bare layers.
        saved = state.get("latency_epilogues", False if self.latency_epilogues is not None else None)
        if self.latency_epilogues is not None and saved is not None and saved != self.latency_epilogues:
            raise CheckpointError(f"this run's latency cells were {'with' if saved else 'without'} the BatchNorm and "
                                  "activation of each layer; resume it with latency_epilogues="
                                  f"{str(saved).lower()} (--opt latency_epilogues={str(saved).lower()})")
        super().load_state_dict(state)
        self.channels.load_state_dict(state["keep"])
        self.importance = [t.clone() for t in state["importance"]]
        self.importance_steps = int(state["importance_steps"])
        self.after_load(state)
        self.prepare()

    def after_load(self, state: dict[str, Any]) -> None:
        """Method-specific state (IEE: the exploration in progress)."""

    def save_cost_cache(self) -> None:
        self.allocator.save_costs()


class HALP(ChannelSparsifier):
    """HALP (Shen et al., NeurIPS 2022): from a pretrained model, every ``prune_every`` steps for ``prune_steps``
    prunings, keep the most important channels that fit the latency target of that moment,
    L_k = exp(α·log L_target + (1 − α)·log L_dense) with α = k / prune_steps; then the mask is fixed (fine-tuning).
    Importance: Taylor-BN averaged over the steps since the previous pruning. Channels never come back.
    """

    name = "halp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 prune_every: int = 40, prune_steps: int = 30, start_step: int = 0, **base: Any):
        for option, value in (("prune_every", prune_every), ("prune_steps", prune_steps)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{option} must be a positive integer, got {value!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ConfigError(f"start_step must be an integer >= 0, got {start_step!r}")
        self.prune_every, self.prune_steps, self.start_step = prune_every, prune_steps, start_step
        super().__init__(model, optimizer, **base)
        end = start_step + prune_every * prune_steps
        if self.total_steps is not None and end > self.total_steps:
            raise ConfigError(f"HALP's {prune_steps} prunings every {prune_every} steps end at step {end}, after "
                              f"training ({self.total_steps} steps); lower prune_steps/prune_every or train longer")

    def target_at(self, k: int) -> float:
        return exponential_path(k, self.prune_steps, self.dense_cost, self.budget)

    def update(self, step: int) -> None:
        since = step - self.start_step
        if since <= 0 or since > self.prune_every * self.prune_steps:
            return
        self.accumulate_importance()
        if since % self.prune_every == 0:
            k = since // self.prune_every
            target = self.target_at(k)
            keeps = self.allocator.select(self.take_importance(), target, allowed=self.active_keep())
            counts = self.install(keeps)
            cost = self.predicted_cost()
            self.history.append({"step": step, "pruning": k, "target": target, "predicted_cost": cost, **counts,
                                 "kept_channels": self.kept_counts()})
            masks = self.masks()
            self.tracker.record(step, getattr(self, "_last_masks", masks), masks)
            self._last_masks = masks
            self.save_cost_cache()


REGROW_MODES = ("knapsack", "within_groups")  # channel IEE's growth: re-allocate the budget, or keep every width
EXPLORE_FROM = ("remembered", "zero")  # what an explored channel starts its exploration from
# Two departures from the paper's cycle, taken together as for weights (README, "Channels"): explored channels start
# with zero weight in their consumers, and the active ones train on while they explore. In one-epoch pilots (3 seeds,
# H = J = Q = 10) they gained 3.73 ± 0.46 points on ResNet-20 and 3.05 ± 0.46 on MobileNetV2-small over the paper's
# cycle, which CHANNEL_PAPER_CYCLE gives back (and was the default before).
DEFAULT_EXPLORE_FROM = "zero"
DEFAULT_CHANNEL_FREEZE_ACTIVE = False
CHANNEL_PAPER_CYCLE = {"freeze_active": True, "explore_from": "remembered"}
# The first cut ramped down HALP's path over 5 cycles instead of straight to the budget: from the pretrained model
# ahead at the tightest target on all three networks of bench/channels.py's grids (ResNet-20 +1.27 ± 0.14,
# MLP +0.28 ± 0.03, MobileNetV2-small +2.38 ± 0.76 points), from scratch ahead in all six measurements though
# clearly in none, for 2-28 % more training FLOPs. IEE cannot tell its start, so the ramp is every start's default.
DEFAULT_RAMP_CYCLES = 5


class ChannelIEE(IEECycle, ChannelSparsifier):
    """IEE over channel groups (``--method iee --structure channel``).

    Each cycle: accumulate importance over H steps; prune the lowest-importance channels until the cost falls
    to (1 − Ω_t)·budget (the first cycles' budgets ramped down from the dense cost by default, ``ramp_cycles``;
    the paper's first prune lands at the budget directly); train J steps;
    reactivate every pruned channel for Q steps, the explored ones at ``explore_lr_scale`` times the learning rate,
    accumulating their importance; grow back by the same importance with the knapsack, active channels forced in,
    until the budget is full. By default the explored channels start with zero weight in their consumers
    (``explore_from=zero``) and the active ones train on at the normal rate (``freeze_active=False``); the paper's
    cycle (:data:`CHANNEL_PAPER_CYCLE`) reactivates them with their remembered values and freezes the active
    channels' weights, BatchNorm affine and statistics bit for bit.
    Ablations: ``explore=False`` grows by each channel's importance from when it was last active;
    ``improve_steps=0``.
    ``ramp_cycles=R`` ramps the budget down instead of cutting straight to it: cycle c works under HALP's
    exponential path from the dense cost to the budget, reached at cycle R. The default (``None``) ramps over
    :data:`DEFAULT_RAMP_CYCLES` cycles, or over every cycle when fewer fit; ``ramp_cycles=0`` is the paper's straight
    first cut (what runs did before the ramp became the default, README "Channels under a measured latency budget").
    ``regrow`` (where the budget goes back, the project's design choice): ``knapsack`` (default) re-solves the
    allocation every cycle, so widths can move between groups; ``within_groups`` gives each group back exactly the
    channels this cycle pruned from it (its most important explored ones), so the widths stay those of the cut
    that reached the budget and the cycles only exchange channels inside each group. Cycles that cut towards the
    budget (the first, or a ramp's) always grow by the knapsack.
    ``max_cycles=N`` stops after N cycles (default: every cycle that fits before ``t_end``), the mask fixed from then
    on; Ω_t keeps its schedule to ``t_end``, so the N cycles cut exactly as the first N of the full run do (a
    shorter ``t_end`` would shrink the first cut too), under the same ramp when it is given; the default ramp is
    shortened to the N cycles, so that the last of them still reaches the budget.
    ``explore_from`` (the project's option): ``zero`` (default) zeroes the weights that carry every explored channel
    onward (its consumers' input columns), so the network that explores is at first exactly the pruned one and moves
    only by what the exploration learns: the channel counterpart of the weight IEE's zeros, and what lets Θ_K train
    on (nearly) its own network while the rest explores; ``remembered`` (the paper's MRU) explores each pruned
    channel from the values it last had.
    """

    name = "iee-channel"
    # what every run did before each option came or got its present default: the remembered values, the straight cut
    added_options = {"explore_from": "remembered", "ramp_cycles": 0}

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 estimate_steps: int = 50, improve_steps: int = 50, explore_steps: int = 50, alpha: float = 0.3,
                 schedule: str = "cosine", t_end: int | float = 0.75, explore: bool = True,
                 freeze_active: bool = DEFAULT_CHANNEL_FREEZE_ACTIVE, explore_lr_scale: float = 0.1,
                 ramp_cycles: int | None = None, regrow: str = "knapsack", max_cycles: int | None = None,
                 explore_from: str = DEFAULT_EXPLORE_FROM,
                 **base: Any):
        check_schedule(schedule)
        if regrow not in REGROW_MODES:
            raise unknown("regrow", regrow, REGROW_MODES)
        if explore_from not in EXPLORE_FROM:
            raise unknown("explore_from", explore_from, EXPLORE_FROM)
        self.regrow, self.explore_from = regrow, explore_from
        if ramp_cycles is not None and (not isinstance(ramp_cycles, int) or isinstance(ramp_cycles, bool)
                                        or ramp_cycles < 0):
            raise ConfigError(f"ramp_cycles must be a number of cycles >= 0, got {ramp_cycles!r}")
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"alpha (initial update fraction) must be in (0, 1), got {alpha}")
        self.alpha, self.schedule, self.explore, self.freeze_active = alpha, schedule, explore, freeze_active
        self.active: list[torch.Tensor] | None = None  # Θ_K while exploring (every channel is in the forward)
        self._active_masks: dict[tuple[str, str], torch.Tensor] = {}
        self.pruned: dict[str, torch.Tensor] = {}  # weights this cycle's prune took (for the mask metrics)
        super().__init__(model, optimizer, **base)
        self.last_importance = [torch.zeros(g.size) for g in self.groups]  # stale scores for explore=False
        self._setup_cycle(optimizer, estimate_steps, improve_steps, explore_steps, t_end, explore_lr_scale,
                          max_cycles)
        if ramp_cycles is None:  # the default ramp, shortened to the run's cycles (max_cycles=1: a straight cut)
            ramp_cycles = min(DEFAULT_RAMP_CYCLES, self.cycles)
        elif ramp_cycles > self.cycles:
            raise ConfigError(f"ramp_cycles={ramp_cycles} is more than the {self.cycles} IEE cycles that fit before "
                              "t_end")
        self.ramp_cycles = ramp_cycles
        self._last_masks = self.masks()
        self._cycle_record: dict[str, Any] = {}
        self.prepare()

    # ----- the five stages --------------------------------------------------------------------------------
    def estimate_importance(self) -> None:
        """Stage 1 (each of the H steps): HALP importance of the active channels."""
        self.accumulate_importance()

    def budget_at(self, step: int) -> float:
        """The budget of the cycle that ``step`` belongs to: the target, or its point on the ramp."""
        if self.ramp_cycles == 0:
            return self.budget
        cycle = (step - 1) // self.cycle_length + 1
        return exponential_path(cycle, self.ramp_cycles, self.dense_cost, self.budget)

    def prune(self, step: int) -> None:
        """Stage 2: keep the most important active channels within (1 − Ω_t)·budget."""
        fraction = self.update_fraction(step)
        budget = self.budget_at(step)
        scores = self.take_importance()
        active = self.active_keep()
        for i, keep in enumerate(active):
            self.last_importance[i][keep] = scores[i][keep]
        before = self.masks()
        cutting = self.predicted_cost() > budget * (1 + 1e-9)  # the first cut (or a ramp's): over the budget
        keeps = self.allocator.select(scores, (1 - fraction) * budget, allowed=active, best_effort=True)
        counts = self.install(keeps)
        after = self.masks()
        self.pruned = {n: before[n] & ~after[n] for n in before}
        self._cycle_record = {"step": step, "fraction": fraction, "pruned_channels": counts["dropped_channels"],
                              "cost_after_prune": self.predicted_cost(), "cutting": cutting,
                              "pruned_per_group": [int((a & ~k).sum()) for a, k in zip(active, keeps)]}
        if self.ramp_cycles:
            self._cycle_record["budget"] = budget

    def reactivate_and_explore(self) -> None:
        """Stage 4 (start): every pruned channel rejoins the forward with its last values; Θ_K is frozen."""
        self._open_exploration(reset_state=True)

    def _open_exploration(self, reset_state: bool) -> None:
        """All channels in the forward; only the ones outside Θ_K (the current keep vectors) may train.
        ``reset_state`` gives explored entries fresh (zero) momentum; a resumed run keeps its loaded state."""
        self.active = self.active_keep()
        self._active_masks = {(n, p): masking.mask_of(m, p) for n, m in self.channels.modules.items()
                              for p in masking.masked_params(m)}
        # explore_from=zero: the masks are still Θ_K's, so what is off now is what explores. Its consumers' columns go
        # to zero; its own rows and BatchNorm keep their values (zero γ and β, with a ReLU after, pass no gradient).
        if reset_state and self.explore_from == "zero":
            self.channels.zero_masked_inputs()
        for i, group in enumerate(self.groups):
            self.channels.set_keep(i, torch.ones(group.size, dtype=torch.bool))
        for (name, param), active in self._active_masks.items():
            module = self.channels.modules[name]
            explored = ~active
            if reset_state:
                masking.reset_optimizer_state(self.optimizer, masking.raw(module, param), explored)
            masking.set_trainable(module, explored if self.freeze_active else torch.ones_like(explored), param)
            masking.set_step_scale(module, explored if explored.any() else None, self.explore_lr_scale, param)
            if param == "weight" and isinstance(module, masking.NORM_TYPES) and self.freeze_active:
                masking.hold_statistics(module, active)
        if self.freeze_active:  # parameters outside every group (first conv, its BN) belong to Θ_K
            masked = {id(masking.raw(m, p)) for m in self.channels.modules.values() for p in masking.masked_params(m)}
            frozen = [p for p in self.model.parameters() if id(p) not in masked]
            for module in self.model.modules():
                if isinstance(module, masking.NORM_TYPES) and module not in self.channels.modules.values():
                    frozen += [b for b in module.buffers(recurse=False) if b is not None]
            self.guard.freeze(frozen)

    def accumulate_exploration(self) -> None:
        """Stage 4 (each of the Q steps): importance of the explored channels."""
        self.accumulate_importance()

    def grow(self, step: int) -> None:
        """Stage 5: by the same importance, fill the budget again with the active channels forced in."""
        if self.exploring:
            scores = self.take_importance()
            active = self.active
            self._end_exploration()
        else:
            self.take_importance()
            active = self.active_keep()
            scores = [s.clone() for s in self.last_importance]
        if self.regrow == "within_groups" and not self._cycle_record.get("cutting", True):
            keeps = [self._grow_within(score, keep, count) for score, keep, count
                     in zip(scores, active, self._cycle_record["pruned_per_group"])]
        else:
            everything = [torch.ones(g.size, dtype=torch.bool) for g in self.groups]
            keeps = self.allocator.select(scores, self._cycle_record.get("budget", self.budget), allowed=everything,
                                          forced=active)
        counts = self.install(keeps)
        masks = self.masks()
        record = {k: v for k, v in self._cycle_record.items() if k != "pruned_per_group"}
        self.history.append({**record, "grow_step": step, "grown_channels": counts["grown_channels"],
                             "cost_after_grow": self.predicted_cost(), "kept_channels": self.kept_counts()})
        self.tracker.record(step, self._last_masks, masks, pruned=self.pruned or None)
        self._last_masks = masks
        self.pruned = {}
        self.save_cost_cache()

    @staticmethod
    def _grow_within(score: torch.Tensor, active: torch.Tensor, count: int) -> torch.Tensor:
        """``active`` plus the ``count`` most important channels outside it (ties: the lower index)."""
        candidates = torch.nonzero(~active).flatten()
        best = candidates[torch.argsort(score[candidates], descending=True, stable=True)[:count]]
        keep = active.clone()
        keep[best] = True
        return keep

    def _end_exploration(self) -> None:
        for i, keep in enumerate(self.active):
            self.channels.set_keep(i, keep)
        for (name, param) in self._active_masks:
            module = self.channels.modules[name]
            masking.set_trainable(module, None, param)
            masking.set_step_scale(module, None, param=param)
            if isinstance(module, masking.NORM_TYPES):
                masking.hold_statistics(module, None)
        self.guard.unfreeze()
        self.active, self._active_masks = None, {}

    # ----- bookkeeping ------------------------------------------------------------------------------------
    def active_keep(self) -> list[torch.Tensor]:
        return [k.clone() for k in self.active] if self.active is not None else super().active_keep()

    def masks(self) -> dict[str, torch.Tensor]:
        if self.active is None:
            return super().masks()
        return {n: self._active_masks[(n, "weight")].clone() for n in self.layers}

    @contextmanager
    def sparse_view(self) -> Iterator[None]:
        if not self.exploring:
            yield
            return
        for i, keep in enumerate(self.active):
            self.channels.set_keep(i, keep)
        try:
            yield
        finally:
            for i, group in enumerate(self.groups):
                self.channels.set_keep(i, torch.ones(group.size, dtype=torch.bool))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.active is not None:
            state["keep"] = {g.root: k.tolist() for g, k in zip(self.groups, self.active)}
        state.update(exploring=self.active is not None, last_importance=list(self.last_importance),
                     last_masks=dict(self._last_masks), cycle_record=dict(self._cycle_record),
                     pruned=dict(self.pruned))
        return state

    def after_load(self, state: dict[str, Any]) -> None:
        self.last_importance = [t.clone() for t in state["last_importance"]]
        self._last_masks = {k: v.bool() for k, v in state["last_masks"].items()}
        self.pruned = {k: v.bool() for k, v in state.get("pruned", {}).items()}
        self._cycle_record = dict(state["cycle_record"])
        self.guard.unfreeze()
        self.active, self._active_masks = None, {}
        if state["exploring"]:  # the keep vectors loaded are Θ_K: reopen the exploration on top of them
            self._open_exploration(reset_state=False)

    def finalize(self) -> nn.Module:
        if self.exploring:
            self._end_exploration()
        return super().finalize()
