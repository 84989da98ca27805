"""Skeptical student: learn from a (possibly nasty) teacher at a shallow auxiliary classifier.

Kundu, Sun, Fu, Pedram, Beerel, "Analyzing the Confidentiality of Undistillable Teachers in
Knowledge Distillation", NeurIPS 2021, §4 (the hybrid distillation loss; results in Table 2). Distilling a nasty teacher (Ma et al.,
ICLR 2021; compressors/nasty_teacher.py) into a shallow subsection of the student hurts far less
than into the whole student (their Fig. 1c). So the student gets auxiliary classifiers (ACs) at
shallow points, the teacher's soft targets go only to one of them, and the final classifier learns
from the labels, while every AC also learns from the final classifier (self-distillation):

    L = γ1 · L_KD(AC_k)  +  γ2 · Σ_i L_SD(AC_i)  +  γ3 · CE(f, y)
    L_KD(AC_k) = (1 − α) · CE(AC_k, y) + α · τ² · KL(σ(p_teacher/τ) ‖ σ(p_ACk/τ))
    L_SD(AC_i) = (1 − β) · CE(AC_i, y) + β · KL(σ(p_f/τ) ‖ σ(p_ACi/τ))

f is the student's own (final) classifier. As in the authors' code (Skeptical2021,
``train_kd_to_SD.py``): γ1 = γ2 = γ3 = 1, α = 0.9, τ = 4, β = 0.3, and no τ² on the self-distillation
KL. The final classifier is SD's teacher, so its logits are detached there (as in "Be Your Own
Teacher", Zhang et al. ICCV 2019, whose ACs these are): the nasty knowledge reaches the final
classifier only through the shared shallow layers, never as a target.

Each AC follows Be-Your-Own-Teacher / Skeptical2021: depthwise-separable conv blocks (stride 2,
doubling the channels up to the width the final classifier sees), global average pooling and a
linear layer. They are added to the student in ``attach`` (``model.skeptical_aux``, so they train,
checkpoint and move with it), read the tapped module outputs, and are removed in ``finalize``: the
finished student has exactly its own architecture and cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.compressors._distill import DistillConfig, Distiller, soft_kl
from effml.compressors.base import Smoke
from effml.errors import EffmlError
from effml.registry import COMPRESSORS
from effml.teachers import FeatureTap, find_module

AUX_ATTR = "skeptical_aux"  # the attribute of the student that holds the ACs while it trains


@dataclass
class SkepticalConfig(DistillConfig):
    """Skeptical student (Kundu et al., NeurIPS 2021, §4): the teacher distills into a shallow auxiliary
    classifier (layer1 of a ResNet), the final classifier self-distills into every AC (layer1, layer2);
    γ1=γ2=γ3=1, α=0.9, β=0.3, τ=4 as in the authors' code. Set compressor.teacher."""

    name: str = "skeptical"
    # module paths in the student after which an AC sits (ResNet-20: layer1 = 1/3, layer2 = 2/3 depth)
    aux_paths: list[str] = field(default_factory=lambda: ["layer1", "layer2"])
    kd_at: str | None = None  # the AC the teacher distills into (None: the first, shallowest, of aux_paths)
    alpha: float = 0.9  # teacher term of L_KD; its CE gets 1 − α
    beta: float = 0.3  # self-distillation term of L_SD; its CE gets 1 − β (authors' code)
    gamma1: float = 1.0  # weight of L_KD (teacher → shallow AC)
    gamma2: float = 1.0  # weight of Σ L_SD (final classifier → ACs)
    gamma3: float = 1.0  # weight of the final classifier's CE

    def __post_init__(self):
        super().__post_init__()
        if not self.aux_paths:
            raise EffmlError("compressor.aux_paths must name at least one module of the student; got []")
        if len(set(self.aux_paths)) != len(self.aux_paths):
            raise EffmlError(f"compressor.aux_paths must not repeat a module; got {list(self.aux_paths)}")
        if self.kd_at is not None and self.kd_at not in self.aux_paths:
            raise EffmlError(f"compressor.kd_at must be one of compressor.aux_paths {list(self.aux_paths)}; "
                             f"got {self.kd_at!r}")
        for name in ("alpha", "beta"):
            if not 0 <= getattr(self, name) <= 1:
                raise EffmlError(f"compressor.{name} must be in [0, 1]; got {getattr(self, name)}")
        for name in ("gamma1", "gamma2", "gamma3"):
            if getattr(self, name) < 0:
                raise EffmlError(f"compressor.{name} must be >= 0; got {getattr(self, name)}")

    @property
    def kd_path(self) -> str:
        return self.kd_at or self.aux_paths[0]


# -- the auxiliary classifiers --------------------------------------------------------------------
def sep_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Be-Your-Own-Teacher's SepConv: two depthwise-separable 3x3 convs, the first with stride 2."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def aux_classifier(channels: int, final_width: int, num_classes: int) -> nn.Sequential:
    """SepConv blocks doubling ``channels`` up to ``final_width``, global pooling, a linear layer."""
    blocks = []
    for _ in range(max(0, math.ceil(math.log2(final_width / channels)))):
        blocks.append(sep_conv(channels, min(2 * channels, final_width)))
        channels = min(2 * channels, final_width)
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def out_channels(module: nn.Module, path: str) -> int:
    """The channels of a module's output: those of its last convolution."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise EffmlError(f"compressor.aux_paths: the student's module '{path}' has no convolution; "
                         "auxiliary classifiers read conv feature maps (e.g. layer1 of a ResNet)")
    return convs[-1].out_channels


def final_classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EffmlError("compressor=skeptical needs a student with a linear classifier")
    return linears[-1]


def aux_key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots


# -- the compressor -----------------------------------------------------------------------------
@COMPRESSORS.register("skeptical", SkepticalConfig)
class SkepticalStudent(Distiller):
    """Kundu et al. 2021: teacher → shallow AC, final classifier → every AC, CE on the final classifier."""

    smoke = Smoke(("resnet",), ("teacher.model={name:lenet_300_100,hidden:[256,128]}",))  # auxiliary classifiers after layer1/2
    owns = frozenset({"modules"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        if metrics["compressors"][name].get("aux_val_acc") is None:
            return "the auxiliary classifier was never evaluated"
        return super().effect(name, metrics)

    def __init__(self, cfg: SkepticalConfig):
        super().__init__(cfg)
        self.tap: FeatureTap | None = None
        self.aux: nn.ModuleDict | None = None
        self.aux_params = 0
        self.aux_val_acc: dict[str, float] = {}
        self._correct: dict[str, int] = {}
        self._seen = 0

    def attach(self, model: nn.Module) -> nn.Module:
        head = final_classifier(model)
        who = "compressor.aux_paths: the student"
        widths = {p: out_channels(find_module(model, p, who), p) for p in self.cfg.aux_paths}
        self.aux = nn.ModuleDict(
            {aux_key(p): aux_classifier(c, head.in_features, head.out_features) for p, c in widths.items()}
        )
        setattr(model, AUX_ATTR, self.aux)
        self.aux_params = sum(p.numel() for p in self.aux.parameters())
        self.tap = FeatureTap(model, list(self.cfg.aux_paths), who)
        return model

    @property
    def hard_loss_weight(self) -> float:
        return self.cfg.gamma3 if self.distilling else 1.0

    def aux_logits(self) -> dict[str, Tensor]:
        features = self.tap.features
        for path in self.cfg.aux_paths:
            if features[path].dim() != 4:  # e.g. a module that ends in Flatten
                raise EffmlError(f"compressor.aux_paths: the student's module '{path}' gives "
                                 f"{tuple(features[path].shape)}, not a conv feature map (N, C, H, W)")
        return {p: self.aux[aux_key(p)](features[p]) for p in self.cfg.aux_paths}

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not self.distilling:
            return None
        return skeptical_loss(self.aux_logits(), self.cfg.kd_path, logits, self.teacher_logits(batch),
                              batch["labels"], self.cfg)

    # -- the ACs' own accuracy, on every validation pass (the paper's Skeptical-E uses them) ------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._correct, self._seen = {p: 0 for p in self.cfg.aux_paths}, 0

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.distilling or not self.tap.features:
            return
        with trainer.precision_plugin.forward_context():  # the tapped features are bf16 under bf16-mixed
            aux = self.aux_logits()
        for path, logits in aux.items():
            self._correct[path] += int((logits.argmax(-1) == batch["labels"]).sum())
        self._seen += batch["labels"].numel()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.distilling and self._seen:
            self.aux_val_acc = {p: round(c / self._seen, 4) for p, c in self._correct.items()}

    # -- removal ---------------------------------------------------------------------------------
    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        if self.tap is not None:
            self.tap.close()
        if hasattr(model, AUX_ATTR):
            delattr(model, AUX_ATTR)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "aux_val_acc": dict(self.aux_val_acc)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.aux_val_acc = dict(state_dict.get("aux_val_acc", {}))

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "aux_paths": list(self.cfg.aux_paths),
            "kd_at": self.cfg.kd_path,
            "aux_params_removed": self.aux_params,
            "aux_val_acc": self.aux_val_acc,
        }


def skeptical_loss(aux: dict[str, Tensor], kd_path: str, final: Tensor, teacher: Tensor, labels: Tensor,
                   cfg: SkepticalConfig) -> Tensor:
    """γ1·L_KD(AC_k) + γ2·Σ_i L_SD(AC_i); the task adds γ3·CE(final) (``hard_loss_weight``)."""
    t = cfg.temperature
    kd_logits = aux[kd_path]
    l_kd = (1 - cfg.alpha) * F.cross_entropy(kd_logits, labels) + cfg.alpha * soft_kl(kd_logits, teacher, t)
    target = final.detach()  # the final classifier teaches the ACs; it does not learn from them
    l_sd = sum(
        (1 - cfg.beta) * F.cross_entropy(logits, labels) + cfg.beta * soft_kl(logits, target, t) / (t * t)
        for logits in aux.values()
    )
    return cfg.gamma1 * l_kd + cfg.gamma2 * l_sd
