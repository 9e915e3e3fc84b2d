"""Mask history for the IEE paper's metrics, for any method that changes masks during training.

Every mask update (an IEE cycle's prune-and-grow, a RigL/SET drop-and-grow, a HALP pruning) is recorded as the
units it *pruned* and the units it *grew*, counting every one of them: a unit pruned and grown back in the same
update appears in both (it is *re-admitted*). Net-new units alone would hide what an exploration does. From the
start mask and those two sets per update the tracker rebuilds every mask after an update and computes

* ``iou_previous``: IoU of the mask after update i with the mask after update i − 1 (the start mask for i = 0);
  how fast the architecture settles;
* ``iou_to_final``: IoU of the mask after update i with the final mask;
* ``readmitted``: per update, the share of pruned units grown back in the same update;
* ``first_time``: per update, the share of grown units that had never been active before (not in the start mask
  nor after any earlier update);
* ``survival``: per update, the share of its grown units (all of them, re-admitted ones included) still active
  ``k`` updates later (``survival_next``: k = 1) and at the end of training (``survival_to_end``).

The ``*_share`` totals pool the units of all updates (Σ numerators / Σ denominators).
Units are indexed over all tracked layers concatenated in order; pruned and grown sets are stored as index lists,
which at high sparsity are far smaller than masks.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointError, ConfigError

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
SURVIVAL_LAGS = (1, 2, 5, 10)  # k for the pooled "still active k updates later" shares in the summary


def pack(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    return (flat * _BITS).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed[:, None] & _BITS) > 0).reshape(-1)[:n]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _flat(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.reshape(-1).bool().cpu() for m in masks.values()])


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class MaskTracker:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self._pruned: list[torch.Tensor] = []  # int64 unit indices per update
        self._grown: list[torch.Tensor] = []
        self._start: torch.Tensor | None = None  # packed mask before the first update
        self.size = 0

    def record(self, step: int, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
               pruned: dict[str, torch.Tensor] | None = None) -> None:
        """Record an update at ``step`` that turned the masks ``before`` into ``after``.

        ``pruned`` are the units the update dropped, including any it grew back (default: ``before & ~after``,
        which cannot see re-admissions). Grown units are those of ``after`` that were not active between the prune
        and the grow: ``after & ~(before & ~pruned)``.
        """
        old, new = _flat(before), _flat(after)
        dropped = old & ~new if pruned is None else _flat(pruned)
        if (dropped & ~old).any():
            raise ConfigError("mask tracker: a pruned unit was not active before the update")
        kept = old & ~dropped
        grown = new & ~kept
        if (kept & ~new).any():
            raise ConfigError("mask tracker: a unit that was neither pruned nor grown changed")
        if self._start is None:
            self._start, self.size = pack(old), old.numel()
        elif old.numel() != self.size:
            raise ConfigError(f"mask tracker: the tracked masks changed size ({self.size} -> {old.numel()} units)")
        self.steps.append(step)
        self._pruned.append(torch.nonzero(dropped).flatten())
        self._grown.append(torch.nonzero(grown).flatten())

    def _set(self, indices: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=torch.bool)
        out[indices] = True
        return out

    def start_mask(self) -> torch.Tensor:
        return unpack(self._start, self.size)

    def masks(self) -> list[torch.Tensor]:
        """The flat mask after every update, rebuilt from the start mask and the pruned / grown sets."""
        mask, out = self.start_mask(), []
        for pruned, grown in zip(self._pruned, self._grown):
            mask = mask.clone()
            mask[pruned] = False
            mask[grown] = True
            out.append(mask)
        return out

    def mask(self, i: int) -> torch.Tensor:
        return self.masks()[i]

    def pruned(self, i: int) -> torch.Tensor:
        return self._set(self._pruned[i])

    def grown(self, i: int) -> torch.Tensor:
        return self._set(self._grown[i])

    def metrics(self) -> dict[str, Any]:
        """Per-update lists and pooled shares (see the module docstring)."""
        if not self.steps:
            return {"updates": 0}
        masks = self.masks()
        final = masks[-1]
        n = len(masks)
        ever = self.start_mask().clone()
        previous = ever.clone()
        per: dict[str, list] = {k: [] for k in ("pruned", "grown", "readmitted", "first_time", "iou_previous",
                                                "iou_to_final", "survival_next", "survival_to_end")}
        totals = {"pruned": 0, "grown": 0, "readmitted": 0, "first_time": 0, "to_end": 0}
        lagged = {k: [0, 0] for k in SURVIVAL_LAGS}  # k -> [survived, grown] over updates with i + k < n
        for i, mask in enumerate(masks):
            pruned, grown = self.pruned(i), self.grown(i)
            n_pruned, n_grown = int(pruned.sum()), int(grown.sum())
            back = int((pruned & grown).sum())
            new = int((grown & ~ever).sum())
            to_end = int((grown & final).sum())
            per["pruned"].append(n_pruned)
            per["grown"].append(n_grown)
            per["readmitted"].append(_share(back, n_pruned))
            per["first_time"].append(_share(new, n_grown))
            per["iou_previous"].append(iou(previous, mask))
            per["iou_to_final"].append(iou(mask, final))
            per["survival_next"].append(_share(int((grown & masks[i + 1]).sum()), n_grown) if i + 1 < n else None)
            per["survival_to_end"].append(_share(to_end, n_grown))
            for k in SURVIVAL_LAGS:
                if i + k < n:
                    lagged[k][0] += int((grown & masks[i + k]).sum())
                    lagged[k][1] += n_grown
            totals["pruned"] += n_pruned
            totals["grown"] += n_grown
            totals["readmitted"] += back
            totals["first_time"] += new
            totals["to_end"] += to_end
            ever |= mask
            previous = mask
        return {
            "updates": n, "steps": list(self.steps), **per,
            "pruned_total": totals["pruned"], "grown_total": totals["grown"],
            "readmitted_share": _share(totals["readmitted"], totals["pruned"]),
            "first_time_share": _share(totals["first_time"], totals["grown"]),
            "survival_to_end_share": _share(totals["to_end"], totals["grown"]),
            "survival_share": {str(k): _share(*lagged[k]) for k in SURVIVAL_LAGS},
            "ever_active_share": float(ever.float().mean()),
        }

    def summary(self) -> dict[str, Any]:
        return self.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "size": self.size, "start": self._start,
                "pruned": list(self._pruned), "grown": list(self._grown)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.size = int(state["size"])
        if "start" not in state:  # checkpoints of the earlier format kept whole masks, not the changed units
            raise CheckpointError("this checkpoint's mask history predates the pruned/grown format of the mask "
                                  "tracker; resume it with the regrow version that wrote it")
        self._start = state["start"]
        self._pruned = [t.long() for t in state["pruned"]]
        self._grown = [t.long() for t in state["grown"]]
