"""Iterative magnitude pruning with rewinding: lottery tickets and their controls.

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks"
(ICLR 2019, arXiv 1803.03635), Algorithm 1 / Strategy "iterative pruning with resetting":

    level 0: train θ0 → θ_T.
    level k: prune p% of the surviving weights of θ_T (per layer, or globally), reset the
             survivors to θ0, train again.

Rewinding to θ_k instead of θ0 (``rewind=step:N`` / ``epoch:N``) is Frankle et al., "Linear Mode
Connectivity and the Lottery Ticket Hypothesis" (ICML 2020); ``rewind=none`` keeps the trained
weights, i.e. standard prune-and-fine-tune. Chen et al., "The Lottery Ticket Hypothesis for
Pre-trained BERT Networks" (NeurIPS 2020) run the same loop from pre-trained BERT weights (θ0 is
the pre-trained model) and prune globally.

Every level is one stage (``level_00`` … ``level_LL``): a rerun skips finished levels and a kill
mid-level resumes from that level's ``last.ckpt``. The controls that make the claim testable are
options of the same recipe and reuse the masks of the *base run* (the same config with
``control=none``), level by level:

- ``reinit``: the ticket's masks, survivors re-initialized at random (Frankle & Carbin Fig. 4);
- ``random_prune``: random masks with the ticket's per-layer sparsity, weights reset to θ0;
- ``shuffle``: the ticket's masks on pre-trained weights shuffled within each layer (Chen et al.'s
  random re-initialization of BERT, which keeps each layer's weight distribution).

Level 0 of a control trains the dense network from the control's weights (θ0 for random_prune).
``ticket_from`` reuses another run's masks on this run's data: ticket transfer (Chen et al. §5).
Per level the report gives test/val accuracy, the early-stopping iteration (lowest validation
loss: Frankle & Carbin's second metric), weights remaining and the normalized Hamming distance to
the previous level's mask.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from effml import safe_load
from effml.choice import check_choices, choice
from effml.compressors._masks import (
    LAYER_TYPES,
    Scope,
    make_permanent,
    mask_gradients,
    mask_layers,
    matches,
    reapply_masks,
    set_mask,
)
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.paths import RunDir, runs_of
from effml.registry import COMPRESSORS

Control = choice("Control", "none reinit random_prune shuffle")  # masks of the base run (control=none)


@dataclass
class IMPConfig(CompressorConfig):
    """Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019) and its controls."""

    name: str = "imp"
    levels: int = 5  # pruning levels after the dense level 0
    prune_fraction: float = 0.2  # of the surviving weights per level; fully connected layers (paper: 20%)
    conv_fraction: float | None = None  # conv layers (paper: 10% Conv-2, 15% Conv-4/6); None: prune_fraction
    output_fraction: float | None = None  # the output layer; None: half of prune_fraction (paper); 0: dense
    output_layer: str = "classifier"  # module-name pattern of the output layer
    scope: Scope = Scope.layerwise  # global: one ranking over every layer but the output
    oneshot: bool = False  # prune straight to the last level's sparsity after level 0
    rewind: str = "init"  # init | step:N | epoch:N (rewind to θ_N of level 0) | none (fine-tune)
    control: Control = Control.none  # reinit | random_prune | shuffle: the base run's masks
    ticket_from: str | None = None  # reuse these masks: a run dir, or recipe[/hash] under output_root
    level_epochs: int | None = None  # epochs per level (None: trainer.max_epochs)
    layer_types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d"])
    skip: list[str] = field(default_factory=list)  # module-name patterns never pruned (e.g. pooler)

    def __post_init__(self):
        check_choices(self, "compressor")
        if not 0 < self.prune_fraction < 1:
            raise EffmlError(f"compressor.prune_fraction must be in (0, 1); got {self.prune_fraction}")
        for name in ("conv_fraction", "output_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise EffmlError(f"compressor.{name} must be in [0, 1); got {value}")
        if self.levels < 1:
            raise EffmlError(f"compressor.levels must be >= 1; got {self.levels}")
        if self.level_epochs is not None and self.level_epochs < 1:
            raise EffmlError(f"compressor.level_epochs must be >= 1; got {self.level_epochs}")
        parse_rewind(self.rewind)
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise EffmlError(f"compressor.layer_types: unknown {sorted(unknown)}; choose from {sorted(LAYER_TYPES)}")

    @property
    def uses_source(self) -> bool:
        """Masks come from another run (the base run of a control, or a transferred ticket)."""
        return self.control != "none" or self.ticket_from is not None


def parse_rewind(rewind: str) -> tuple[str, int]:
    """'init' → ('step', 0); 'step:N' / 'epoch:N' → (unit, N); 'none' → ('none', 0)."""
    if rewind in ("init", "none"):
        return ("step", 0) if rewind == "init" else ("none", 0)
    unit, _, number = rewind.partition(":")
    if unit in ("step", "epoch") and number.isdigit():
        return unit, int(number)
    raise EffmlError(f"compressor.rewind must be init, none, step:N or epoch:N; got {rewind!r}")


# -- weights, outside the pruning reparametrization -------------------------------------------
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer except masks, keyed by the plain name (``x.weight``)."""
    return {
        key.removesuffix("_orig"): value.detach().clone()
        for key, value in model.state_dict().items()
        if not key.endswith("_mask")
    }


@torch.no_grad()
def restore(model: nn.Module, weights: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> None:
    """Set the model to ``weights`` (a ``snapshot``), keeping the current masks."""
    for key, value in model.state_dict(keep_vars=True).items():
        plain = key.removesuffix("_orig")
        if not key.endswith("_mask") and plain in weights:
            value.copy_(weights[plain])
    for module in layers.values():
        set_mask(module, module.weight_mask)


def fresh_init(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A new random draw of every layer's initialization (Frankle & Carbin's random reinit)."""
    model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return snapshot(model)


def keep_largest(scores: list[torch.Tensor], masks: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """New masks keeping the ``keep`` largest scores among the surviving positions (pruned stay pruned)."""
    flat = torch.cat([torch.where(m.bool(), s, -1.0).flatten() for s, m in zip(scores, masks, strict=True)])
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[torch.topk(flat, keep, sorted=False).indices] = True
    return [k.view_as(m).to(m.dtype) for k, m in zip(kept.split([m.numel() for m in masks]), masks, strict=True)]


def shuffled_like(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mask with the same number of survivors."""
    return mask.flatten()[torch.randperm(mask.numel(), generator=generator)].view_as(mask)


@COMPRESSORS.register("imp", IMPConfig)
class IterativeMagnitudePruning(Compressor):
    """Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019)."""

    smoke = Smoke(("mlp", "resnet", "vit", "bert"), ("levels=2", "level_epochs=1"))
    owns = frozenset({"masks", "rewinding"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        levels = [s for s in metrics["stages"] if s["owner"] == name]
        if len(levels) != len(report["levels"]) or not report["achieved_sparsity"] > 0:
            return f"{len(levels)} level stages for {len(report['levels'])} levels, sparsity {report['achieved_sparsity']}"
        return None

    def __init__(self, cfg: IMPConfig):
        super().__init__(cfg)
        self.layers: dict[str, nn.Module] = {}
        self.rates: dict[str, float] = {}
        self.rewind_unit, self.rewind_at = parse_rewind(cfg.rewind)
        self.initial_weights: dict[str, torch.Tensor] = {}  # θ0
        self.rewind_weights: dict[str, torch.Tensor] | None = None  # θ0, or θ_N once level 0 reaches N
        self.reinit_weights: dict[str, torch.Tensor] = {}  # control=reinit: another random draw
        self.control_seed = 0
        self.source: RunDir | None = None  # the run whose masks this one reuses
        self.history: list[dict[str, Any]] = []  # one entry per finished level
        self.current: dict[str, Any] = {}  # the level in progress

    # -- contract ---------------------------------------------------------------------------
    def level_numbers(self) -> list[int]:
        return [0, self.cfg.levels] if self.cfg.oneshot else list(range(self.cfg.levels + 1))

    def stages(self) -> list[Stage]:
        return [Stage(f"level_{k:02d}", self.cfg.level_epochs, self.name) for k in self.level_numbers()]

    def attach(self, model: nn.Module) -> nn.Module:
        # Drawn from the run's seeded RNG: the same on every resume, different from θ0's draw.
        self.control_seed = int(torch.randint(2**31 - 1, ()))
        if self.cfg.control == "reinit":  # drawn before the masks reparametrize the weights
            self.reinit_weights = fresh_init(model, self.control_seed)
        output = self._output_fraction()
        skip = self.cfg.skip + ([self.cfg.output_layer] if output == 0 else [])
        self.layers = mask_layers(model, self.cfg.layer_types, skip, self.name, self.masks_in_place())
        self.rates = {name: self._rate(name, module, output) for name, module in self.layers.items()}
        self.initial_weights = snapshot(model)
        if self.rewind_unit != "none" and self.rewind_at == 0:
            self.rewind_weights = self.initial_weights
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        level0_epochs = self.cfg.level_epochs or ctx.trainer.max_epochs
        if self.rewind_unit == "epoch" and self.rewind_at > level0_epochs:
            raise EffmlError(f"compressor.rewind={self.cfg.rewind} is beyond level 0's {level0_epochs} epochs")
        if self.rewind_unit == "step":
            steps = level0_epochs * train_batches(datamodule, ctx.trainer.limit_train_batches)
            if self.rewind_at > steps:
                raise EffmlError(f"compressor.rewind={self.cfg.rewind} is beyond level 0's {steps} steps")
        if self.cfg.uses_source:
            self.source = self._find_source(ctx)

    def begin_stage(self, stage: Stage, task) -> None:
        if stage.owner != self.name:
            return
        level = int(stage.key.removeprefix("level_"))
        before = self.masks()
        if level > 0:
            for module, mask in zip(self.layers.values(), self._next_masks(level), strict=True):
                set_mask(module, mask)
        self._start_weights(task.model, level)
        after = self.masks()
        changed = sum(int((a != b).sum()) for a, b in zip(after, before, strict=True))
        self.current = {
            "level": level,
            "weights_remaining": round(self.weights_remaining(), 6),
            "hamming": round(changed / self.prunable(), 6) if level > 0 else None,
            "best_val_loss": math.inf,
            "early_stop_step": None,
            "early_stop_val_acc": None,
        }

    def masks_in_place(self) -> bool:
        """Masks in place (compressors/_masks.py) unless a level may revive a weight without restoring
        it: random_prune's masks are not nested, and rewind=none keeps the trained weights."""
        return not (self.cfg.control == "random_prune" and self.rewind_unit == "none")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.gradient_clip_val:
            mask_gradients(self.layers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        reapply_masks(self.layers)
        if self._in_level0() and self.rewind_unit == "step" and trainer.global_step == self.rewind_at > 0:
            self.rewind_weights = snapshot(pl_module.model)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._in_level0() and self.rewind_unit == "epoch" and trainer.current_epoch + 1 == self.rewind_at:
            self.rewind_weights = snapshot(pl_module.model)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.current or trainer.state.fn != TrainerFn.FITTING:
            return
        loss, acc = trainer.callback_metrics.get("val/loss"), trainer.callback_metrics.get("val/acc")
        if loss is not None and float(loss) < self.current["best_val_loss"]:
            self.current.update(best_val_loss=float(loss), early_stop_step=trainer.global_step,
                                early_stop_val_acc=None if acc is None else float(acc))

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        if stage.owner != self.name:
            return None
        level = {k: v for k, v in self.current.items() if k != "best_val_loss"}
        level.update(test_acc=record["test_acc"], val_acc=record["val_acc"], steps=record["steps"])
        self.history.append(level)
        self.current = {}
        return {k: level[k] for k in ("weights_remaining", "hamming", "early_stop_step")}

    def state_dict(self) -> dict:
        state = {"history": self.history, "current": self.current}
        if self.rewind_weights is not self.initial_weights:  # θ0 is rebuilt from the seed at attach
            state["rewind_weights"] = self.rewind_weights
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.history, self.current = state_dict["history"], state_dict["current"]
        if "rewind_weights" in state_dict:
            self.rewind_weights = state_dict["rewind_weights"]

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        make_permanent(self.layers)
        return model

    def target_sparsity(self) -> float:
        levels = self.level_numbers()[-1]
        kept = sum(m.weight.numel() * (1 - self.rates[n]) ** levels for n, m in self.layers.items())
        return 1 - kept / self.prunable()

    def report(self) -> dict:
        return {
            "levels": self.history,
            "weights_remaining": self.history[-1]["weights_remaining"] if self.history else None,
            "achieved_sparsity": 1 - self.weights_remaining(),
            "prune_fraction": self.cfg.prune_fraction,
            "scope": self.cfg.scope,
            "rewind": self.cfg.rewind,
            "control": self.cfg.control,
            "masks_from": str(self.source) if self.source else None,
        }

    # -- masks -------------------------------------------------------------------------------
    def masks(self) -> list[torch.Tensor]:
        """The current masks (after ``finalize``: where the weights are nonzero)."""
        return [(m.weight_mask if hasattr(m, "weight_mask") else m.weight != 0).detach().clone().float()
                for m in self.layers.values()]

    def prunable(self) -> int:
        return sum(m.weight.numel() for m in self.layers.values())

    def weights_remaining(self) -> float:
        return sum(int(mask.sum()) for mask in self.masks()) / self.prunable()

    def _next_masks(self, level: int) -> list[torch.Tensor]:
        if self.source is not None:
            masks = self._source_masks(level)
            if self.cfg.control == "random_prune":
                generator = torch.Generator().manual_seed(self.control_seed + level)
                masks = [shuffled_like(mask, generator) for mask in masks]
            return masks
        return self._magnitude_masks(level)

    def _magnitude_masks(self, level: int) -> list[torch.Tensor]:
        """Prune each layer's rate of its survivors (one-shot: of all weights, ``levels`` times over)."""
        names = list(self.layers)
        scores = {n: (self.layers[n].weight_orig * self.layers[n].weight_mask).detach().abs() for n in names}
        masks = {n: self.layers[n].weight_mask.detach() for n in names}
        if self.cfg.oneshot:
            masks = {n: torch.ones_like(m) for n, m in masks.items()}
        steps = level if self.cfg.oneshot else 1
        groups = [[n] for n in names]
        if self.cfg.scope == "global":  # one ranking for all layers but the output, which keeps its own rate
            output = [n for n in names if self._is_output(n)]
            groups = [[n for n in names if n not in output]] + [[n] for n in output]
        new = {}
        for group in groups:  # every layer of a group has the same rate
            alive = sum(int(masks[n].sum()) for n in group)
            keep = round(alive * (1 - self.rates[group[0]]) ** steps)
            new.update(zip(group, keep_largest([scores[n] for n in group], [masks[n] for n in group], keep),
                           strict=True))
        return [new[n] for n in names]

    def _source_masks(self, level: int) -> list[torch.Tensor]:
        end = level_end(self.source, level)
        if end is None:
            raise EffmlError(f"{self.source} has no finished level {level} to take masks from")
        state = safe_load.load(end, "the masks' checkpoint")  # tensors and plain data only: no code runs
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise EffmlError(f"the masks' checkpoint {end} holds no model state")
        state = state["model"]
        masks = []
        for name, module in self.layers.items():
            mask = state.get(f"{name}.weight_mask")
            if mask is None or mask.shape != module.weight_mask.shape:
                raise EffmlError(f"the masks of {self.source} do not fit this model (layer {name})")
            masks.append(mask.to(module.weight_mask.dtype))
        return masks

    # -- weights -----------------------------------------------------------------------------
    def _start_weights(self, model: nn.Module, level: int) -> None:
        """The weights a level trains from: θ_rewind, or the control's, or (rewind=none) the trained ones."""
        if self.cfg.control == "reinit":
            restore(model, self.reinit_weights, self.layers)
        elif self.cfg.control == "shuffle":
            restore(model, self._shuffled_initial(), self.layers)
        elif level > 0 and self.rewind_unit != "none":
            if self.rewind_weights is None:
                raise EffmlError(f"level 0 ended before the rewind point {self.cfg.rewind}")
            restore(model, self.rewind_weights, self.layers)

    def _shuffled_initial(self) -> dict[str, torch.Tensor]:
        """θ0 with every pruned layer's weights permuted within the layer (same values, same spread)."""
        generator = torch.Generator().manual_seed(self.control_seed)
        weights = dict(self.initial_weights)
        for name in self.layers:
            w = weights[f"{name}.weight"]
            weights[f"{name}.weight"] = w.flatten()[torch.randperm(w.numel(), generator=generator)].view_as(w)
        return weights

    # -- helpers -----------------------------------------------------------------------------
    def _in_level0(self) -> bool:
        return self.current.get("level") == 0

    def _is_output(self, name: str) -> bool:
        return matches(name, [self.cfg.output_layer])

    def _output_fraction(self) -> float:
        fraction = self.cfg.output_fraction
        return self.cfg.prune_fraction / 2 if fraction is None else fraction

    def _rate(self, name: str, module: nn.Module, output: float) -> float:
        """Per-level pruning rate of a layer (global scope: one rate for all but the output layer)."""
        if self._is_output(name):
            return output
        conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        if conv and self.cfg.conv_fraction is not None and self.cfg.scope == "layerwise":
            return self.cfg.conv_fraction
        return self.cfg.prune_fraction

    def _find_source(self, ctx: RunContext) -> RunDir:
        """The run whose masks this run reuses; every level it needs must be finished there."""
        from effml import identity

        seed, root = ctx.seed, Path(ctx.output_root)
        if self.cfg.ticket_from is not None:
            source = resolve_run(self.cfg.ticket_from, root, seed)
            what = f"compressor.ticket_from={self.cfg.ticket_from}"
        else:
            base = dict(ctx.sections, compressor=dataclasses.replace(self.cfg, control="none"))
            source = identity.run_dir(root, ctx.name, base, seed)
            what = f"compressor.control={self.cfg.control} needs its base run (the same config with control=none)"
        missing = [k for k in self.level_numbers()[1:] if level_end(source, k) is None]
        if missing:
            raise EffmlError(f"{what}: {source} has no finished level {missing[0]}; train that run first")
        return source


def level_end(run: RunDir, level: int) -> Path | None:
    """The ``end.pt`` of a finished IMP level of a run (its stage index depends on the run's levels)."""
    return run.stage_end(f"level_{level:02d}")


def resolve_run(spec: str, output_root: Path, seed: int) -> RunDir:
    """A run directory from ``path/to/seed_N``, a ``<recipe>/<hash>`` folder, or a recipe name: its one
    run under ``output_root`` that found its own ticket (no control, no ticket_from; this run's seed)."""
    path = Path(spec)
    for candidate in (path, output_root / path):
        if candidate.name.startswith("seed_") and candidate.is_dir():
            return RunDir(candidate)
        if (candidate / f"seed_{seed}").is_dir():
            return RunDir(candidate / f"seed_{seed}")
    runs = runs_of(output_root, spec, seed, where=finds_own_ticket)
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise EffmlError(f"ticket source '{spec}' not found (no run dir, nor an IMP run in {output_root / spec})")
    choices = ", ".join(f"{r.recipe}/{r.hash}" for r in runs)
    raise EffmlError(f"ticket source '{spec}' is ambiguous; name one of: {choices}")


def finds_own_ticket(run: RunDir) -> bool:
    from omegaconf import OmegaConf

    if not run.config.exists():
        return False
    compressor = OmegaConf.load(run.config).get("compressor", {})
    return compressor.get("name") == "imp" and compressor.get("control") == "none" and not compressor.get("ticket_from")


def train_batches(datamodule, limit: float | None) -> int:
    """Optimizer steps per epoch, as Lightning counts them under ``limit_train_batches``."""
    batches = len(datamodule.train_dataloader())
    if limit is None:
        return batches
    return min(batches, int(limit)) if limit >= 1 else int(batches * limit)
