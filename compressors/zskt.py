"""Zero-shot knowledge transfer: distillation without any data, through adversarial belief matching.

Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019
(arXiv 1905.09768), §3 and Algorithm 1. No training example is ever looked at: a generator G
turns noise z ~ N(0, I) into inputs x = G(z) on which the student S disagrees most with the frozen
teacher T, and the student learns to agree with the teacher there. Each cycle draws one batch z and
takes

    n_G generator steps:  max_G  D_KL(T(x) ‖ S(x))                       (x = G(z))
    n_S student steps:    min_S  D_KL(T(x) ‖ S(x)) + β · Σ_l ‖ a_T^l(x) − a_S^l(x) ‖²

with D_KL at temperature 1 and a^l the spatial attention map of block group l (attention transfer,
Zagoruyko & Komodakis, ICLR 2017, §3.1): a = vec(Σ_c f_c²/C) / ‖vec(Σ_c f_c²/C)‖₂, the squared
difference averaged over batch and positions, summed over groups. The paper's defaults: n_G = 1,
n_S = 10, β = 250, z of dimension 100, batches of 128, Adam for both (generator lr 1e-3, student
2e-3), both on cosine schedules, gradient norms clipped at 5. As in the authors' code (PyTorch 1.0's
``kl_div`` default), D_KL is averaged over batch *and* classes (``kl_reduction=mean``), the scale
β = 250 was chosen against. The generator (§4, the authors' code): linear → (128, H/4, W/4), BN,
upsample, conv 128, BN, LeakyReLU(0.2), upsample, conv 64, BN, LeakyReLU, conv to the data's
channels and a BN without affine parameters, so its images are standardized like the data.

How it fits effml: the student's stage trains on ``iterations_per_epoch`` empty batches (slots) that
this compressor supplies (``train_dataloader``); the datamodule only validates and tests. At each
batch (``on_train_batch_start``) it takes the generator steps when a cycle starts, with its own
optimizer, and writes G(z) into the batch; the task's optimizer then takes the student step on
``loss`` (the task's cross-entropy has weight 0: there are no labels; the batch's labels are set to
the teacher's argmax, so ``train/acc`` reads as agreement with the teacher on generated inputs).
The generator, its optimizer, z and the random stream live in ``state_dict``: a resumed run
continues exactly. The teacher is any of ``effml.teachers``'s sources, trained in the run if
``teacher.source=stage``; that stage (only) trains the teacher on the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from effml.choice import check_choices, choice
from effml.compressors._distill import DistillConfig, Distiller
from effml.compressors.base import RunContext, Smoke
from effml.errors import EffmlError
from effml.registry import COMPRESSORS
from effml.teachers import FeatureTap, find_module

GeneratorSchedule = choice("GeneratorSchedule", "cosine constant")  # over the stage's generator steps
KLReduction = choice("KLReduction", "mean batchmean")  # mean: over batch and classes (authors' code); batchmean: the true KL


@dataclass
class ZSKTConfig(DistillConfig):
    """Zero-shot KT (Micaelli & Storkey, NeurIPS 2019): data-free; a generator seeks inputs where student
    and teacher disagree, the student matches the teacher there (KL + 250·AT); n_G=1, n_S=10. Set
    compressor.teacher."""

    name: str = "zskt"
    temperature: float = 1.0  # the paper matches the plain (T = 1) distributions
    generator_steps: int = 1  # n_G per cycle
    student_steps: int = 10  # n_S per cycle: one generator update every n_S student batches
    beta: float = 250.0  # weight of the attention-transfer term
    attention_layers: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    z_dim: int = 100
    batch_size: int = 128  # generated inputs per batch
    iterations_per_epoch: int = 500  # student steps (slots for generated batches) per epoch
    generator_lr: float = 1e-3  # Adam; the student's optimizer is the run's (trainer.*)
    generator_schedule: GeneratorSchedule = GeneratorSchedule.cosine
    generator_grad_clip: float | None = 5.0  # max gradient norm of the generator (authors' code)
    generator_width: int = 128  # channels of the generator's first conv block (the second has half)
    kl_reduction: KLReduction = KLReduction.mean

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, "compressor")
        for name in ("generator_steps", "student_steps", "z_dim", "batch_size", "iterations_per_epoch",
                     "generator_width"):
            if getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {getattr(self, name)}")
        if self.beta < 0:
            raise EffmlError(f"compressor.beta must be >= 0; got {self.beta}")
        if self.generator_lr <= 0:
            raise EffmlError(f"compressor.generator_lr must be > 0; got {self.generator_lr}")
        if self.generator_grad_clip is not None and self.generator_grad_clip <= 0:
            raise EffmlError(f"compressor.generator_grad_clip must be > 0 or null; got {self.generator_grad_clip}")
        if self.beta > 0 and not self.attention_layers:
            raise EffmlError("compressor.attention_layers must name the block groups to match when beta > 0")


# -- the losses ------------------------------------------------------------------------------------
def attention_map(features: Tensor) -> Tensor:
    """Zagoruyko & Komodakis 2017, §3.1 (p = 2): channel mean of f², flattened, unit L2 norm per example."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Σ over matched groups of the mean squared difference of the attention maps."""
    return sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student, teacher, strict=True))


def belief_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: str) -> Tensor:
    """D_KL(softmax(t/T) ‖ softmax(s/T)); ``mean`` also divides by the number of classes (authors' scale)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl / student_logits.shape[-1] if reduction == "mean" else kl


# -- the generator ---------------------------------------------------------------------------------
class Generator(nn.Module):
    """The paper's generator, sized for (C, H, W): z → (w, ⌈H/4⌉, ⌈W/4⌉) → ×2 → (H, W), standardized."""

    def __init__(self, z_dim: int, shape: tuple[int, int, int], width: int = 128):
        super().__init__()
        channels, height, width_px = shape
        self.start = (width, math.ceil(height / 4), math.ceil(width_px / 4))
        self.project = nn.Linear(z_dim, math.prod(self.start))
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(size=(math.ceil(height / 2), math.ceil(width_px / 2))),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(size=(height, width_px)),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            nn.BatchNorm2d(channels, affine=False),  # each channel standardized, like the normalized data
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.blocks(self.project(z).view(-1, *self.start))


class PlaceholderBatches(Dataset):
    """``n`` batches of zeros shaped like the data: slots that ``on_train_batch_start`` fills with G(z)."""

    def __init__(self, n: int, batch_size: int, shape: tuple[int, ...]):
        self.n, self.batch_size, self.shape = n, batch_size, tuple(shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": torch.zeros(self.batch_size, *self.shape), "labels": torch.zeros(self.batch_size, dtype=torch.long)}


# -- the compressor --------------------------------------------------------------------------------
@COMPRESSORS.register("zskt", ZSKTConfig)
class ZeroShotKT(Distiller):
    """Zero-shot KT (Micaelli & Storkey 2019): an adversarial generator replaces the data; KL + β·AT."""

    # data-free: MLPs learn fastest; attention transfer is tested in tests/test_zskt.py
    smoke = Smoke(("mlp", "resnet", "vit"), ("teacher.model={name:lenet_300_100,hidden:[256,128]}", "beta=0", "student_steps=1", "iterations_per_epoch=40", "batch_size=64"))
    owns = frozenset({"training data"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        if not metrics["compressors"][name]["generator_updates"]:
            return "the generator was never updated"
        return super().effect(name, metrics)

    def __init__(self, cfg: ZSKTConfig):
        super().__init__(cfg)
        self.generator: Generator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.rng = torch.Generator()
        self.z: Tensor | None = None  # the current cycle's noise
        self.batches = 0  # student batches seen in this compressor's life (a cycle is n_S of them)
        self.generator_updates = 0
        self.student_tap: FeatureTap | None = None
        self.teacher_tap: FeatureTap | None = None
        self.student_module: nn.Module | None = None
        self._teacher_cache: tuple[Tensor, list[Tensor]] | None = None
        self.last_generator_kl: float | None = None

    # -- set-up --------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        self.student_module = model
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        super().prepare(ctx, datamodule)
        shape = datamodule.info.input_shape
        if datamodule.info.modality != "image" or not shape or len(shape) != 3:
            raise EffmlError(f"zskt generates images; data {ctx.data.name} is {datamodule.info.modality}")
        self.rng.manual_seed(int(ctx.seed))
        self.generator = Generator(self.cfg.z_dim, tuple(shape), self.cfg.generator_width)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.generator_lr)
        self.check_attention_layers(datamodule)

    def check_attention_layers(self, datamodule) -> None:
        """Matched groups must exist in both nets and give maps of equal size (AT compares positions)."""
        if self.cfg.beta == 0:
            return
        for path in self.cfg.attention_layers:
            find_module(self.student_module, path, "the student")
            find_module(self.teacher_module, path, "the teacher")
        inputs = datamodule.example_inputs(2)
        student, teacher = self.features(self.student_module, inputs), self.features(self.teacher_module, inputs)
        for path, s, t in zip(self.cfg.attention_layers, student, teacher, strict=True):
            if s.shape[2:] != t.shape[2:]:
                raise EffmlError(
                    f"compressor.attention_layers: {path} gives {tuple(s.shape[2:])} maps in the student and "
                    f"{tuple(t.shape[2:])} in the teacher; attention transfer needs equal sizes"
                )

    def features(self, model: nn.Module, inputs: dict) -> list[Tensor]:
        was_training, device = model.training, next(model.parameters()).device
        with FeatureTap(model, self.cfg.attention_layers) as tap, torch.no_grad():
            model.eval()(**{k: v.to(device) for k, v in inputs.items()})
            found = [tap.features[p] for p in self.cfg.attention_layers]
        model.train(was_training)
        return found

    def begin_stage(self, stage, task) -> None:
        super().begin_stage(stage, task)
        if self.distilling and self.cfg.beta > 0 and self.student_tap is None:
            self.student_tap = FeatureTap(task.model, self.cfg.attention_layers, "the student")
            self.teacher_tap = FeatureTap(self.teacher_module, self.cfg.attention_layers, "the teacher")

    def end_stage(self, stage, record: dict) -> dict | None:
        added = super().end_stage(stage, record)
        self.close_taps()
        if stage.role != "prepare":
            return {"generator_updates": self.generator_updates}
        return added

    def close_taps(self) -> None:
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.close()
        self.student_tap = self.teacher_tap = None
        self._teacher_cache = None

    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        self.close_taps()
        return model

    # -- data-free batches ----------------------------------------------------------------------
    @property
    def hard_loss_weight(self) -> float:
        return 0.0 if self.distilling else 1.0  # no true labels: only the teacher speaks

    def train_dataloader(self, stage, datamodule) -> DataLoader | None:
        if stage.role == "prepare":  # the teacher's own stage trains on the data
            return None
        shape = datamodule.info.input_shape
        # its own generator: starting a pass draws no number from torch's global RNG (effml.data._base)
        return DataLoader(PlaceholderBatches(self.cfg.iterations_per_epoch, self.cfg.batch_size, shape),
                          batch_size=None, shuffle=False, generator=torch.Generator())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.distilling:
            return
        device = batch["x"].device
        self.place(device)
        with trainer.precision_plugin.forward_context():  # the precision the student trains in
            if self.batches % self.cfg.student_steps == 0:  # a new cycle: fresh z, then the generator steps
                self.z = torch.randn(self.cfg.batch_size, self.cfg.z_dim, generator=self.rng).to(device)  # once a cycle
                lr = self.generator_lr(trainer.global_step, trainer.estimated_stepping_batches)
                for _ in range(self.cfg.generator_steps):
                    self.generator_step(pl_module.model, self.z.to(device), lr)
                self._teacher_cache = None
                pl_module.log("train/generator_kl", self.last_generator_kl, batch_size=self.cfg.batch_size)
            with torch.no_grad():  # the authors regenerate every batch too (the generator stays in train mode)
                x = self.generator(self.z.to(device)).to(batch["x"].dtype)
            logits, _ = self.teacher_outputs(x)
        batch["x"] = x
        batch["labels"] = logits.argmax(-1)  # no true labels; train/acc reads as agreement with the teacher
        self.batches += 1

    def place(self, device: torch.device) -> None:
        """Move the generator and the teacher to the student's device; the optimizer state follows."""
        if next(self.generator.parameters()).device == device:
            return
        state = self.optimizer.state_dict()
        self.generator.to(device)
        self.teacher_module.to(device)  # the generator's step calls it directly, with gradients to x
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.generator_lr)
        self.optimizer.load_state_dict(state)  # casts the moments to the parameters' device

    def generator_step(self, student: nn.Module, z: Tensor, lr: float) -> None:
        """One ascent step on D_KL(T(G(z)) ‖ S(G(z))); only the generator's parameters move."""
        self.generator.train()
        x = self.generator(z)
        teacher = self.teacher_module.eval()  # frozen: its BN keeps the statistics of real data
        kl = belief_kl(student(x=x), teacher(x=x), self.cfg.temperature, self.cfg.kl_reduction)
        params = list(self.generator.parameters())
        grads = torch.autograd.grad(-kl, params)  # student and teacher get no gradients
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if self.cfg.generator_grad_clip is not None:
            nn.utils.clip_grad_norm_(params, self.cfg.generator_grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.generator_updates += 1
        self.last_generator_kl = float(kl.detach())

    def generator_lr(self, step: int, total_steps: float) -> float:
        """Cosine from ``generator_lr`` to 0 over the stage's student steps (the authors anneal both
        optimizers together, once per cycle)."""
        if self.cfg.generator_schedule == "constant":
            return self.cfg.generator_lr
        progress = min(step / max(1.0, float(total_steps)), 1.0)
        return self.cfg.generator_lr * 0.5 * (1 + math.cos(math.pi * progress))

    # -- the student's loss ----------------------------------------------------------------------
    def teacher_outputs(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and features, once per cycle: x is the same for the cycle's n_S batches."""
        if self._teacher_cache is None:
            logits = self.teacher({"x": x})
            features = [self.teacher_tap.features[p] for p in self.cfg.attention_layers] if self.teacher_tap else []
            self._teacher_cache = (logits, features)
        return self._teacher_cache

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not self.distilling:
            return None
        teacher_logits, teacher_features = self._teacher_cache
        total = belief_kl(logits, teacher_logits, self.cfg.temperature, self.cfg.kl_reduction)
        if self.student_tap is not None:
            student_features = [self.student_tap.features[p] for p in self.cfg.attention_layers]
            total = total + self.cfg.beta * attention_loss(student_features, teacher_features)
        return total

    # -- resume and report -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.generator is None:
            return state
        return {
            **state,
            "generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
            "z": self.z,
            "batches": self.batches,
            "generator_updates": self.generator_updates,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "generator" not in state_dict:
            return
        self.generator.load_state_dict(state_dict["generator"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.rng.set_state(state_dict["rng"])
        self.z = state_dict["z"]
        self.batches = state_dict["batches"]
        self.generator_updates = state_dict["generator_updates"]
        self._teacher_cache = None

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "data_free": True,
            "generator_updates": self.generator_updates,
            "student_batches": self.batches,
            "generator_params": sum(p.numel() for p in self.generator.parameters()) if self.generator else None,
            "last_generator_kl": self.last_generator_kl,
        }
