"""What every distillation method shares: a teacher, trained in the run or loaded, and frozen.

``Distiller`` builds the teacher in ``prepare`` (so a missing or incompatible teacher fails before
anything is written, effml.teachers), trains it in a ``prepare`` stage named ``teacher`` when
``teacher.source=stage`` (the task's model is the teacher for that stage; its weights then travel
in this compressor's state, so a resumed run skips the stage), and then calls it frozen, in eval
mode under ``no_grad``, during the student's training. The student trains in a ``plain`` stage, so a
pruning method composed beside it trains the student once, with both losses (docs/ARCHITECTURE.md §3).

Speed in the report compares the student with its teacher (``reference``): the model it replaces.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from effml.compressors.base import Compressor, CompressorConfig, RunContext, Stage
from effml.errors import EffmlError
from effml.teachers import HFClassifier, Teacher, TeacherConfig, build_teacher, check_outputs, frozen


@dataclass
class DistillConfig(CompressorConfig):
    """Fields every distillation method has."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    temperature: float = 4.0  # T of the softened distributions

    def __post_init__(self):
        if self.temperature <= 0:
            raise EffmlError(f"compressor.temperature must be > 0; got {self.temperature}")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch (Hinton et al. 2015, §2: the T²
    keeps the soft term's gradients on the hard term's scale when T changes)."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * t * t


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


class Distiller(Compressor):
    """Base of the distillation compressors: owns the teacher's life cycle."""

    needs_teacher_logits = True  # False for methods that only match features

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        """A teacher trained in the run was the model of its own stage (its record says how big)."""
        if not str(metrics["compressors"][name]["teacher"]).startswith("stage:"):
            return None
        if any(s["owner"] == name and "teacher_params" in s for s in metrics["stages"]):
            return None
        return "its teacher stage never trained the teacher"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.teacher_module: nn.Module | None = None
        self.teacher: Teacher | None = None
        self.training_teacher = False
        self.task = None

    # -- stages --------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        t = self.cfg.teacher
        own = [Stage("teacher", t.epochs, self.name, t.lr_scale, role="prepare")] if t.source == "stage" else []
        return own + self.student_stages()

    def student_stages(self) -> list[Stage]:
        return [Stage("train", owner=self.name, role="plain")]

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.teacher_module = build_teacher(self.cfg.teacher, datamodule, ctx.output_root, ctx.seed, ctx.data)
        self.use_teacher(datamodule)

    def use_teacher(self, datamodule, without_logits: str = "") -> None:
        """Refuse a teacher whose logits are needed but untrained, or whose outputs do not fit the
        data; then wrap it frozen. A method with structural checks (TinyBERT) runs them first, since a
        teacher of another vocabulary would fail inside its first forward pass."""
        module = self.teacher_module
        if isinstance(module, HFClassifier) and not module.trained_head and self.needs_teacher_logits:
            raise EffmlError(
                f"teacher {self.cfg.teacher.path} has no trained classification head; {self.name} needs the "
                f"teacher's logits: fine-tune it first (teacher.source=run or recipe){without_logits}"
            )
        check_outputs(module, datamodule)
        self.teacher = Teacher(module)

    def begin_stage(self, stage: Stage, task) -> None:
        self.task = task
        if stage.of(self.name, "teacher"):
            self.student, task.model = task.model, self.teacher_module.train().requires_grad_(True)
            self.training_teacher = True

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        if stage.of(self.name, "teacher"):
            self.task.model = self.student
            frozen(self.teacher_module)
            self.training_teacher = False
            return {"teacher_params": sum(p.numel() for p in self.teacher_module.parameters())}
        return None

    def teacher_logits(self, batch: dict) -> Tensor:
        return self.teacher(without_labels(batch))

    @property
    def distilling(self) -> bool:
        """True while the student trains (not while this run's own teacher stage trains the teacher)."""
        return not self.training_teacher

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.cfg.teacher.source != "stage" or self.teacher_module is None:
            return {}  # an outside teacher is loaded again from its source
        return {"teacher": self.teacher_module.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "teacher" in state_dict:
            self.teacher_module.load_state_dict(state_dict["teacher"])

    # -- report ----------------------------------------------------------------------------------
    def reference(self, dense: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(self.teacher_module).cpu().requires_grad_(True)
        teacher.effml_reference = "teacher"
        return teacher

    def report(self) -> dict[str, Any]:
        return {
            "teacher": self.cfg.teacher.describe(),
            "teacher_params": sum(p.numel() for p in self.teacher_module.parameters()) if self.teacher_module else None,
        }
