"""Nasty teacher: a teacher that keeps its accuracy but cannot be distilled.

Ma, Chen, Zhang, Shen, Wang, Wang, "Undistillable: Making A Nasty Teacher That CANNOT Teach
Students", ICLR 2021, §3.2 (self-undermining knowledge distillation), Eq. 2. The nasty teacher T is
trained from scratch to keep its own cross-entropy low while its softened outputs move as far as
possible from those of a normally trained adversarial network A (same architecture in the paper):

    L(T) = CE(σ(p_T(x)), y) − ω · τ² · KL(σ(p_T(x)/τ) ‖ σ(p_A(x)/τ))

with A frozen. The argmax stays right (the CE term), the "dark knowledge" in the wrong classes turns
into a multi-peaked, misleading distribution (the paper's Fig. 2), and a student that imitates it at
temperature τ learns worse than one trained alone (Tables 1–2). Defaults are the paper's CIFAR-10
setting (the authors' code: ``weight`` 0.04, ``temperature`` 4; CIFAR-100 / Tiny-ImageNet use
ω = 0.005, τ = 20); the KL is averaged over the batch, as in the authors' code.

A is this compressor's ``teacher`` (a ``Distiller``: any source of effml.teachers, frozen); the model
being trained is the nasty teacher. ``report()`` says how nasty it came out, measured on validation
batches at the end of training: the KL above (in nats, without τ²), the entropy of the nasty and
of A's softened outputs, and how often their argmax agrees.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.compressors._distill import DistillConfig, Distiller, without_labels
from effml.compressors.base import RunContext, Smoke
from effml.errors import EffmlError
from effml.registry import COMPRESSORS


@dataclass
class NastyTeacherConfig(DistillConfig):
    """Nasty teacher (Ma et al., ICLR 2021, Eq. 2): CE − ω·τ²·KL(nasty ‖ adversary) with the paper's
    CIFAR-10 ω=0.04, τ=4; the adversary (a normally trained network) is compressor.teacher."""

    name: str = "nasty_teacher"
    omega: float = 0.04  # ω: weight of the adversarial KL (paper/code CIFAR-10: 0.04; CIFAR-100: 0.005)
    temperature: float = 4.0  # τ_A of Eq. 2 (CIFAR-10: 4; CIFAR-100: 20)
    stats_batches: int = 8  # validation batches measured for report() at the end of training

    def __post_init__(self):
        super().__post_init__()
        if self.omega < 0:
            raise EffmlError(f"compressor.omega must be >= 0; got {self.omega}")
        if self.stats_batches < 0:
            raise EffmlError(f"compressor.stats_batches must be >= 0; got {self.stats_batches}")


def adversarial_kl(nasty_logits: Tensor, adversary_logits: Tensor, temperature: float) -> Tensor:
    """τ² · KL(σ(p_T/τ) ‖ σ(p_A/τ)), batch mean; differentiable in the nasty teacher's logits."""
    t = temperature
    log_nasty = F.log_softmax(nasty_logits.float() / t, dim=-1)
    log_adversary = F.log_softmax(adversary_logits.float() / t, dim=-1)
    return (log_nasty.exp() * (log_nasty - log_adversary)).sum(-1).mean() * t * t


def soft_stats(nasty_logits: Tensor, adversary_logits: Tensor, temperature: float) -> dict[str, Tensor]:
    """Per-example numbers for the report: KL to A (nats, no τ²), entropies at τ, argmax agreement."""
    log_nasty = F.log_softmax(nasty_logits.float() / temperature, dim=-1)
    log_adversary = F.log_softmax(adversary_logits.float() / temperature, dim=-1)
    return {
        "kl_to_adversary": (log_nasty.exp() * (log_nasty - log_adversary)).sum(-1),
        "soft_entropy": -(log_nasty.exp() * log_nasty).sum(-1),
        "adversary_soft_entropy": -(log_adversary.exp() * log_adversary).sum(-1),
        "agreement": (nasty_logits.argmax(-1) == adversary_logits.argmax(-1)).float(),
    }


@COMPRESSORS.register("nasty_teacher", NastyTeacherConfig)
class NastyTeacher(Distiller):
    """Ma et al. 2021: CE − ω·τ²·KL(nasty ‖ adversary); the adversary is ``compressor.teacher``."""

    smoke = Smoke(("mlp", "resnet", "vit"), ("teacher.model={name:lenet_300_100,hidden:[256,128]}",))

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        if metrics["compressors"][name].get("kl_to_adversary") is None:
            return "no KL to the adversary was measured"
        return super().effect(name, metrics)

    def __init__(self, cfg: NastyTeacherConfig):
        super().__init__(cfg)
        self.datamodule = None
        self.stats: dict[str, float] = {}

    def prepare(self, ctx: RunContext, datamodule) -> None:
        super().prepare(ctx, datamodule)
        self.datamodule = datamodule

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not self.distilling or self.cfg.omega == 0:
            return None
        return -self.cfg.omega * adversarial_kl(logits, self.teacher_logits(batch), self.cfg.temperature)

    # -- how nasty it came out -------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        # here, not in end_stage: the model is still on the training device
        if self.distilling and self.cfg.stats_batches:
            self.stats = self.measure(pl_module.model, self.datamodule.val_dataloader(), pl_module.device)

    @torch.no_grad()
    def measure(self, model: nn.Module, batches, device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        for batch in itertools.islice(batches, self.cfg.stats_batches):
            inputs = {k: v.to(device) for k, v in without_labels(batch).items()}
            per_example = soft_stats(model(**inputs), self.teacher(inputs), self.cfg.temperature)
            for key, values in per_example.items():
                sums[key] = sums.get(key, 0.0) + values.sum().item()
            count += next(iter(per_example.values())).numel()
        model.train(was_training)
        return {key: round(total / max(count, 1), 4) for key, total in sums.items()}

    def end_stage(self, stage, record: dict) -> dict | None:
        own = super().end_stage(stage, record)
        if own is None and stage.role != "prepare" and self.stats:
            return {f"nasty_{k}": v for k, v in self.stats.items()}
        return own

    # -- resume and report -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stats = dict(state_dict.get("stats", {}))

    def reference(self, dense: nn.Module) -> nn.Module:
        return dense  # the nasty teacher replaces nothing: time it against its own dense architecture

    def report(self) -> dict[str, Any]:
        return {**super().report(), "omega": self.cfg.omega, "temperature": self.cfg.temperature, **self.stats}
