"""Mask history for the IEE paper's metrics, for any method that changes masks during training.

After every mask update the tracker keeps the whole mask (all layers, bit-packed) and the set of units that
entered it since the previous update. From those it computes

* IoU between consecutive updates (how fast the architecture settles) and against the final mask;
* survival of grown units: the fraction of the units grown at update i still active ``k`` updates later,
  and at the end of training.
"""

from __future__ import annotations

from typing import Any

import torch

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    return (flat * _BITS).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed[:, None] & _BITS) > 0).reshape(-1)[:n]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


class MaskTracker:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self._masks: list[torch.Tensor] = []
        self._grown: list[torch.Tensor] = []
        self.size = 0

    def record(self, step: int, masks: dict[str, torch.Tensor], previous: dict[str, torch.Tensor]) -> None:
        """Record the masks right after an update at ``step``; ``previous`` are those right after the last one."""
        now = torch.cat([m.reshape(-1) for m in masks.values()])
        before = torch.cat([m.reshape(-1) for m in previous.values()])
        self.size = now.numel()
        self.steps.append(step)
        self._masks.append(pack(now))
        self._grown.append(pack(now & ~before))

    def mask(self, i: int) -> torch.Tensor:
        return unpack(self._masks[i], self.size)

    def grown(self, i: int) -> torch.Tensor:
        return unpack(self._grown[i], self.size)

    def iou_consecutive(self) -> list[float]:
        return [iou(self.mask(i - 1), self.mask(i)) for i in range(1, len(self.steps))]

    def iou_to_final(self, final: torch.Tensor | None = None) -> list[float]:
        last = self.mask(len(self.steps) - 1) if final is None else final.reshape(-1)
        return [iou(self.mask(i), last) for i in range(len(self.steps))]

    def survival(self, later: int) -> list[float | None]:
        """Per update i: fraction of the units grown at i still active at update i + ``later`` (None if too late)."""
        out: list[float | None] = []
        for i in range(len(self.steps)):
            grown = self.grown(i)
            if i + later >= len(self.steps) or not grown.any():
                out.append(None)
            else:
                out.append(int((grown & self.mask(i + later)).sum()) / int(grown.sum()))
        return out

    def survival_to_end(self, final: torch.Tensor | None = None) -> list[float | None]:
        last = self.mask(len(self.steps) - 1) if final is None else final.reshape(-1)
        return [int((g & last).sum()) / int(g.sum()) if g.any() else None
                for g in (self.grown(i) for i in range(len(self.steps)))]

    def summary(self) -> dict[str, Any]:
        if not self.steps:
            return {"updates": 0}
        return {"updates": len(self.steps), "steps": list(self.steps), "iou_consecutive": self.iou_consecutive(),
                "iou_to_final": self.iou_to_final(), "survival_next": self.survival(1),
                "survival_to_end": self.survival_to_end()}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "size": self.size, "masks": list(self._masks),
                "grown": list(self._grown)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.size = int(state["size"])
        self._masks, self._grown = list(state["masks"]), list(state["grown"])
