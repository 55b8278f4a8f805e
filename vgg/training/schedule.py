"""The paper's learning-rate schedule (Sec. 3.1): "decreased by a factor of 10 when the
validation set accuracy stopped improving"; 3 times in all.

torch's `ReduceLROnPlateau` does the work; this class only sets it up the paper's way
and records after which epochs the lr was divided (for the history and the plots).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from vgg.config import NetPlan, TrainConfig


class PlateauSchedule:
    """lr * factor when the validation accuracy has not improved by more than `threshold`
    for `patience` epochs in a row, at most `max_drops` times. An improvement resets the
    count; a drop resets it too (the new lr gets `patience` epochs of its own)."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float = 0.1, patience: int = 2,
                 threshold: float = 1e-3, max_drops: int = 3):
        floor = optimizer.param_groups[0]["lr"]
        for _ in range(max_drops):  # the lr after max_drops drops, bit for bit as torch computes it
            floor *= factor
        # torch divides after `patience` + 1 bad epochs (num_bad_epochs > patience); eps=0:
        # once at the floor, no further drop changes the lr.
        self.torch = ReduceLROnPlateau(optimizer, mode="max", factor=factor, patience=patience - 1,
                                       threshold=threshold, threshold_mode="abs", min_lr=floor, eps=0.0)
        self.optimizer = optimizer
        self.drops: list[int] = []  # epochs after which the lr was divided

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def patience(self) -> int:
        return self.torch.patience + 1

    @property
    def threshold(self) -> float:
        return self.torch.threshold

    def step(self, accuracy: float, epoch: int) -> bool:
        """Record one epoch's validation accuracy; True if the lr was divided after it."""
        before = self.lr
        self.torch.step(accuracy)
        if self.lr < before:
            self.drops.append(epoch)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"torch": self.torch.state_dict(), "drops": list(self.drops)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.torch.load_state_dict(state["torch"])
        self.drops = list(state["drops"])


def schedule_of(optimizer: torch.optim.Optimizer, t: TrainConfig, net: NetPlan) -> PlateauSchedule:
    """The plateau schedule of one net: the recipe's, with the net's own patience."""
    patience = t.lr_patience if net.lr_patience is None else net.lr_patience
    return PlateauSchedule(optimizer, t.lr_factor, patience, t.lr_threshold, t.max_lr_drops)
