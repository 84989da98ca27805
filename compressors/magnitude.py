"""Unstructured magnitude pruning, one-shot or gradual.

Gradual pruning follows Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning
for model compression" (ICLR-W 2018, arXiv 1710.01878): every ``frequency`` steps between ``t0``
and ``t0 + nΔt`` the sparsity target rises along the cubic

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (nΔt))^3

and the smallest-magnitude weights are masked. One-shot pruning trains dense, prunes to the final
sparsity once, then fine-tunes (Han et al. 2015). Layerwise scope prunes every layer to the same
sparsity; global scope ranks all targeted weights together (Blalock et al. 2020 found it the
stronger default for deep nets).

Masks use ``torch.nn.utils.prune`` reparametrization (``weight = weight_orig * weight_mask`` on
every forward), so pruned weights stay exactly zero through any optimizer step, and the masks
travel in the model's state_dict, i.e. in every checkpoint. ``finalize`` makes them permanent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effml.choice import check_choices, choice
from effml.compressors._masks import (
    LAYER_TYPES,
    Scope,
    effective_weight,
    make_permanent,
    mask_gradients,
    mask_layers,
    reapply_masks,
    set_mask,
)
from effml.compressors.base import Compressor, CompressorConfig, Smoke, Stage
from effml.errors import EffmlError
from effml.registry import COMPRESSORS

Schedule = choice("Schedule", "gradual oneshot")  # gradual: Zhu & Gupta's cubic; oneshot: train, prune, fine-tune


@dataclass
class MagnitudeConfig(CompressorConfig):
    """Unstructured magnitude pruning to 90% sparsity with Zhu & Gupta's gradual cubic schedule, output
    layer dense."""

    name: str = "magnitude"
    sparsity: float = 0.9  # s_f: final fraction of zeros in the targeted layers
    scope: Scope = Scope.layerwise
    schedule: Schedule = Schedule.gradual
    initial_sparsity: float = 0.0  # s_i
    start_fraction: float = 0.0  # t0, as a fraction of the stage's optimizer steps
    end_fraction: float = 0.75  # t0 + nΔt, likewise; the rest of training recovers accuracy
    frequency: int = 100  # Δt, optimizer steps between pruning events
    finetune_epochs: int | None = None  # oneshot: length of the fine-tune stage (None: trainer.max_epochs)
    layer_types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d"])
    skip: list[str] = field(default_factory=lambda: ["classifier"])  # module-name patterns left dense

    def __post_init__(self):
        check_choices(self, "compressor")
        if not 0 <= self.sparsity < 1:
            raise EffmlError(f"compressor.sparsity must be in [0, 1); got {self.sparsity}")
        if not 0 <= self.initial_sparsity <= self.sparsity:
            raise EffmlError(
                f"compressor.initial_sparsity must be in [0, sparsity={self.sparsity}]; got {self.initial_sparsity}"
            )
        if not 0 <= self.start_fraction < self.end_fraction <= 1:
            raise EffmlError(
                "compressor.start_fraction < end_fraction must both lie in [0, 1]; "
                f"got {self.start_fraction}, {self.end_fraction}"
            )
        if self.frequency < 1:
            raise EffmlError(f"compressor.frequency must be >= 1; got {self.frequency}")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise EffmlError(f"compressor.layer_types: unknown {sorted(unknown)}; choose from {sorted(LAYER_TYPES)}")


def cubic_sparsity(step: int, t0: int, t_end: int, s_i: float, s_f: float) -> float:
    """Zhu & Gupta's schedule: s_i before t0, s_f after t_end, cubic in between."""
    if step <= t0:
        return s_i
    if step >= t_end:
        return s_f
    return s_f + (s_i - s_f) * (1 - (step - t0) / (t_end - t0)) ** 3


def keep_masks(weights: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Masks that zero exactly round(sparsity * n) of the smallest |w| (per layer or over all)."""
    if scope == "layerwise":
        return [keep_masks([w], sparsity, "global")[0] for w in weights]
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    n_keep = scores.numel() - round(sparsity * scores.numel())
    flat = torch.zeros_like(scores, dtype=torch.bool)
    flat[torch.topk(scores, n_keep, sorted=False).indices] = True
    return [m.view_as(w).to(w.dtype) for m, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]


@COMPRESSORS.register("magnitude", MagnitudeConfig)
class MagnitudePruning(Compressor):
    """Unstructured magnitude pruning: layerwise or global, one-shot or gradual (Zhu & Gupta 2017)."""

    smoke = Smoke(("mlp", "resnet", "vit", "bert"))
    owns = frozenset({"masks"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        if abs(report["achieved_sparsity"] - report["target_sparsity"]) > 0.01:
            return f"sparsity {report['achieved_sparsity']:.3f}, not the target {report['target_sparsity']}"
        return None

    def __init__(self, cfg: MagnitudeConfig):
        super().__init__(cfg)
        self.layers: dict[str, nn.Module] = {}
        self.current_sparsity = 0.0
        self.events = 0
        self._window = (0, 0)  # (t0, t_end) in optimizer steps of the pruning stage

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        if self.cfg.schedule == "oneshot":
            return [Stage("train", owner=self.name), Stage("finetune", self.cfg.finetune_epochs, self.name)]
        return [Stage("train", owner=self.name)]

    def attach(self, model: nn.Module) -> nn.Module:
        # in place: magnitude masks only shrink, so no pruned weight ever needs its old value back
        self.layers = mask_layers(model, self.cfg.layer_types, self.cfg.skip, self.name, in_place_masks=True)
        return model

    def begin_stage(self, stage: Stage, task) -> None:
        if self.cfg.schedule == "oneshot" and stage.of(self.name, "finetune"):
            self.prune_to(self.cfg.sparsity)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.cfg.schedule == "gradual":
            total = trainer.estimated_stepping_batches
            self._window = (round(self.cfg.start_fraction * total), round(self.cfg.end_fraction * total))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.gradient_clip_val:
            mask_gradients(self.layers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        reapply_masks(self.layers)
        if self.cfg.schedule != "gradual":
            return
        step, (t0, t_end) = trainer.global_step, self._window
        if step < t0 or (step - t0) % self.cfg.frequency and step < t_end:
            return
        target = cubic_sparsity(step, t0, t_end, self.cfg.initial_sparsity, self.cfg.sparsity)
        if target > self.current_sparsity:
            self.prune_to(target)
            pl_module.log("prune/sparsity", target)

    def on_train_end(self, trainer, pl_module) -> None:
        # A run cut short (limit_train_batches, few epochs) still ends at the promised sparsity.
        if self.cfg.schedule == "gradual" and self.current_sparsity < self.cfg.sparsity:
            self.prune_to(self.cfg.sparsity)

    def state_dict(self) -> dict:
        # The masks themselves are buffers of the model, saved with its weights.
        return {"current_sparsity": self.current_sparsity, "events": self.events}

    def load_state_dict(self, state_dict: dict) -> None:
        self.current_sparsity = state_dict["current_sparsity"]
        self.events = state_dict["events"]

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        make_permanent(self.layers)
        return model

    def target_sparsity(self) -> float:
        return self.cfg.sparsity

    def report(self) -> dict:
        per_layer = {name: round(float((m.weight == 0).float().mean()), 6) for name, m in self.layers.items()}
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        total = sum(m.weight.numel() for m in self.layers.values())
        return {
            "target_sparsity": self.cfg.sparsity,
            "achieved_sparsity": zeros / total,  # counted from the weights of the targeted layers
            "scope": self.cfg.scope,
            "schedule": self.cfg.schedule,
            "pruning_events": self.events,
            "layers": per_layer,
        }

    # -- mechanics --------------------------------------------------------------------------
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        modules = list(self.layers.values())
        masks = keep_masks([effective_weight(m) for m in modules], sparsity, self.cfg.scope)
        for module, mask in zip(modules, masks, strict=True):
            set_mask(module, mask)
        self.current_sparsity = sparsity
        self.events += 1
