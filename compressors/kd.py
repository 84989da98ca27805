"""Knowledge distillation with soft targets.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (NIPS DL workshop 2015,
arXiv 1503.02531), §2: the student matches the teacher's class probabilities softened at
temperature T, mixed with the usual cross-entropy on the true labels:

    L = (1 − α) · CE(s, y) + α · T² · KL(softmax(t/T) ‖ softmax(s/T))

The paper uses a "considerably lower weight" on the hard term; α = 0.9 and T = 4 are the common
defaults (e.g. Tian et al.'s RepDistiller; Cho & Hariharan 2019). The teacher comes from
``compressor.teacher`` (effml.teachers): trained in this run's first stage, a finished run, a
checkpoint or an HF classifier. KD composes with pruning: ``compose: {kd: ...}`` beside magnitude
or IMP adds this loss to theirs while they prune the student.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from effml.compressors._distill import DistillConfig, Distiller, soft_kl
from effml.compressors.base import Smoke
from effml.errors import EffmlError
from effml.registry import COMPRESSORS


@dataclass
class KDConfig(DistillConfig):
    """Knowledge distillation (Hinton et al. 2015): soft targets at T=4, α=0.9; set compressor.teacher."""

    name: str = "kd"
    alpha: float = 0.9  # weight of the soft (teacher) term; the hard term gets 1 − α

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise EffmlError(f"compressor.alpha must be in [0, 1]; got {self.alpha}")


@COMPRESSORS.register("kd", KDConfig)
class KnowledgeDistillation(Distiller):
    """Soft-target knowledge distillation (Hinton et al. 2015): (1 − α)·CE + α·T²·KL(teacher ‖ student)."""

    smoke = Smoke(("mlp", "resnet", "vit"), ("teacher.model={name:lenet_300_100,hidden:[256,128]}",))

    @property
    def hard_loss_weight(self) -> float:
        return 1 - self.cfg.alpha if self.distilling else 1.0

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not self.distilling:
            return None
        return self.cfg.alpha * soft_kl(logits, self.teacher_logits(batch), self.cfg.temperature)
