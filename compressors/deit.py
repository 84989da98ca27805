"""DeiT: distillation through attention, with a distillation token.

Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021, §4. A ViT student gets a second learned token beside
the class token; it goes through the blocks like the class token, and a second linear head on its
output learns from the teacher, while the class head learns from the true labels. With the class
head's logits Z_cls, the distillation head's Z_dist, the teacher's Z_t and y_t = argmax_c Z_t(c):

    hard (the paper's choice):  L = (1 − α)·CE(Z_cls, y) + α·CE(Z_dist, y_t)            α = ½
    soft:                       L = (1 − α)·CE(Z_cls, y) + α·τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ))  α = λ = 0.1, τ = 3

(``alpha: null`` picks the paper's α of the chosen type.) The teacher's hard labels may be label-
smoothed (``label_smoothing``, ε; the paper's ε = 0.1 is for the true labels, i.e.
``trainer.label_smoothing``, and the official code leaves the teacher's labels unsmoothed). The
soft term is the batch mean of the KL, as the paper writes it (the official code also divides by
the number of classes). At test time the two heads are fused (``inference``, see effml.models.vit):
the paper adds their softmax outputs (``softmax``, the default); the official code averages their
logits (``logits``); ``class`` and ``distillation`` use one head (Table 3's rows). ``token: false``
is the paper's distillation without a token (Table 3, "usual"/"hard distillation"): the term above
then acts on the class head, and any student works.

In training the student returns its class head's logits (the task's cross-entropy, scaled by
1 − α, uses them); this compressor reads the distillation head's logits with a forward hook on
``head_dist`` (``FeatureTap``), opened in ``attach`` and closed in ``finalize``. The token and its
head are part of the deployed DeiT model: ``finalize`` keeps them. After every student stage the
report gives each head's test accuracy and how often it agrees with the teacher (Table 3; Table 4 for the
agreement with the convnet teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.choice import check_choices, choice
from effml.compressors._distill import DistillConfig, Distiller, soft_kl, without_labels
from effml.compressors.base import RunContext, Smoke
from effml.errors import EffmlError
from effml.models.vit import INFERENCE, fuse
from effml.registry import COMPRESSORS
from effml.teachers import FeatureTap

PAPER_ALPHA = {"hard": 0.5, "soft": 0.1}  # §4: ½ CE + ½ CE; soft: λ = 0.1
Distillation = choice("Distillation", PAPER_ALPHA)  # hard: the teacher's argmax; soft: KL at temperature τ
Inference = choice("Inference", INFERENCE)  # eval output: softmax (paper), logits (official code), class, distillation


@dataclass
class DeiTConfig(DistillConfig):
    """DeiT (Touvron et al. 2021): distillation token on a ViT student, hard teacher labels (½ CE + ½ CE);
    set compressor.teacher."""

    name: str = "deit"
    distillation: Distillation = Distillation.hard
    alpha: float | None = None  # weight of the distillation term; None: the paper's (hard ½, soft 0.1)
    temperature: float = 3.0  # τ of the soft term (paper: 3)
    label_smoothing: float = 0.0  # ε on the teacher's hard labels (0: the official code)
    token: bool = True  # a distillation token and head (False: distill into the class head)
    inference: Inference = Inference.softmax

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, "compressor")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise EffmlError(f"compressor.alpha must be in [0, 1]; got {self.alpha}")
        if not 0 <= self.label_smoothing < 1:
            raise EffmlError(f"compressor.label_smoothing must be in [0, 1); got {self.label_smoothing}")
        if not self.token and self.inference != "softmax":
            raise EffmlError("compressor.inference needs the distillation token (compressor.token=true)")

    @property
    def weight(self) -> float:
        """α: the distillation term's weight (the true labels' term gets 1 − α)."""
        return PAPER_ALPHA[self.distillation] if self.alpha is None else self.alpha


def distillation_loss(student: Tensor, teacher: Tensor, cfg: DeiTConfig) -> Tensor:
    """The distillation term before α: CE to the teacher's argmax, or τ²·KL to its softened output."""
    if cfg.distillation == "hard":
        return F.cross_entropy(student.float(), teacher.argmax(-1), label_smoothing=cfg.label_smoothing)
    return soft_kl(student, teacher, cfg.temperature)


@COMPRESSORS.register("deit", DeiTConfig)
class DeiT(Distiller):
    """DeiT (Touvron et al., ICML 2021): a distillation token learns from the teacher, hard or soft."""

    smoke = Smoke(("vit",), ("teacher.model={name:lenet_300_100,hidden:[256,128]}",))
    owns = frozenset({"modules"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        return super().effect(name, metrics) or (None if metrics["compressors"][name]["heads"] else "no head measured")

    def __init__(self, cfg: DeiTConfig):
        super().__init__(cfg)
        self.tap: FeatureTap | None = None
        self.datamodule = None
        self.device = "cpu"
        self.test_batches: float | None = None
        self.heads: dict[str, dict[str, float]] = {}

    @property
    def hard_loss_weight(self) -> float:
        return 1 - self.cfg.weight if self.distilling else 1.0

    # -- the token -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        if not self.cfg.token:
            return model
        if not hasattr(model, "add_distillation_token"):
            raise EffmlError(
                f"compressor deit needs a ViT student for its distillation token (model=vit_tiny); got "
                f"{type(model).__name__} (compressor.token=false distills any student without a token)"
            )
        model.add_distillation_token(self.cfg.inference)
        self.tap = FeatureTap(model, ["head_dist"], "the student")
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        super().prepare(ctx, datamodule)
        self.datamodule = datamodule
        self.device = ctx.device.type
        self.test_batches = ctx.trainer.limit_test_batches

    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        if self.tap is not None:  # the hook goes; the token and its head stay (they are the DeiT model)
            self.tap.close()
            self.tap = None
        return model

    # -- the loss --------------------------------------------------------------------------------
    def student_logits(self, logits: Tensor) -> Tensor:
        """The logits the teacher teaches: the distillation head's (tapped), or the class head's."""
        return self.tap.features["head_dist"] if self.tap is not None else logits

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not self.distilling:
            return None
        return self.cfg.weight * distillation_loss(self.student_logits(logits), self.teacher_logits(batch), self.cfg)

    # -- the heads, measured ---------------------------------------------------------------------
    def end_stage(self, stage, record: dict) -> dict | None:
        added = super().end_stage(stage, record)
        if stage.role == "prepare" or self.datamodule is None:
            return added
        self.heads = self.head_accuracies(self.task.model)
        return {**(added or {}), "heads": self.heads}

    @torch.no_grad()
    def head_accuracies(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Test accuracy of each head and of their fusion, and their agreement with the teacher."""
        was_training, home = model.training, next(model.parameters()).device
        model.eval().to(self.device)
        counts: dict[str, list[float]] = {}
        for batch in self.test_batches_of(self.datamodule.test_dataloader()):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            teacher = self.teacher(without_labels(batch)).argmax(-1)
            for head, logits in self.head_outputs(model, without_labels(batch)).items():
                predicted = logits.argmax(-1)
                tally = counts.setdefault(head, [0.0, 0.0, 0.0])
                tally[0] += float((predicted == batch["labels"]).sum())
                tally[1] += float((predicted == teacher).sum())
                tally[2] += len(predicted)
        model.train(was_training).to(home)
        return {head: {"test_acc": right / n, "teacher_agreement": agree / n}
                for head, (right, agree, n) in counts.items()}

    def head_outputs(self, model: nn.Module, inputs: dict) -> dict[str, Tensor]:
        if self.tap is None:
            return {"class": model(**inputs)}
        logits, dist_logits = model.heads(**inputs)
        return {"class": logits, "distillation": dist_logits,
                "softmax": fuse(logits, dist_logits, "softmax"), "logits": fuse(logits, dist_logits, "logits")}

    def test_batches_of(self, loader):
        """The test batches the task's test pass sees (``trainer.limit_test_batches``)."""
        limit = self.test_batches
        if limit is None:
            return loader
        count = int(limit) if limit >= 1 else max(1, int(limit * len(loader)))
        return (batch for i, batch in zip(range(count), loader, strict=False))

    # -- resume and report -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "heads": self.heads}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.heads = state_dict.get("heads", {})

    def report(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            **super().report(),
            "distillation": cfg.distillation,
            "alpha": cfg.weight,
            "temperature": cfg.temperature if cfg.distillation == "soft" else None,
            "token": cfg.token,
            "inference": cfg.inference if cfg.token else "class",
            "heads": self.heads,
        }
