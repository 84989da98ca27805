"""The training loss of every optimizer step, and the loss spikes counted in it (docs/ARCHITECTURE.md §6).

The task logs the training loss as an epoch mean only; a spike lasts a few steps and vanishes in a
mean. So every stage keeps the loss of each step (the value ``training_step`` returned: the task's loss
with the compressors' terms) and its record says how many steps spiked. A spike, as Li, Zhang & He
count them ("The Stability-Efficiency Dilemma", NeurIPS 2022, arXiv 2108.06084, §3: the loss ratio, the
current loss over the minimum of the previous ones), is a step whose loss is more than ``SPIKE_RATIO``
times the lowest loss of the steps before it. A run that diverges counts every step it stays up there.

The list is the callback's state, saved in every ``last.ckpt``: a resumed stage reports the curve an
uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

SPIKE_RATIO = 1.5


def loss_spikes(losses: Sequence[float], ratio: float = SPIKE_RATIO) -> tuple[int, float]:
    """(steps whose loss is > ``ratio`` × the running minimum of the earlier steps, the largest such
    loss ratio seen; 1.0 when the loss never rose above an earlier minimum)."""
    spikes, worst, lowest = 0, 1.0, math.inf
    for loss in losses:
        if math.isfinite(lowest) and lowest > 0:
            worst = max(worst, loss / lowest)
            spikes += loss > ratio * lowest
        lowest = min(lowest, loss)
    return spikes, worst


class TrainingLossCurve(L.Callback):
    """Every training step's loss, and the stage record's ``train_loss_spikes``."""

    state_key = "effml/loss_curve"

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss.detach()))

    def summary(self) -> dict[str, Any]:
        spikes, worst = loss_spikes(self.losses)
        return {"train_loss_spikes": spikes, "train_loss_max_ratio": round(worst, 4),
                "train_losses": [round(x, 5) for x in self.losses]}

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = [float(x) for x in state["losses"]]
