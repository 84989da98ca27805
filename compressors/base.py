"""The compressor contract (docs/ARCHITECTURE.md §3).

A compressor is a Lightning ``Callback`` with a typed config. The runner calls, in order:

1. ``attach(model)`` once, before any checkpoint is loaded: wrap or reparametrize the model, so a
   resumed run's checkpoint keys match;
2. ``prepare(ctx, datamodule)``, with the run's read-only ``RunContext``, still before anything is
   written: check that the run can work (bounds that depend on the data, other runs it needs) and
   fail with one line if not;
3. for each of its ``stages()`` (a stage is one ``Trainer.fit``): ``begin_stage(stage, task)``,
   then the fit, during which Lightning calls the usual callback hooks and the task adds
   ``loss(task, batch, logits)`` to the training loss (and scales its own cross-entropy by
   ``hard_loss_weight``); after the fit and a test pass, ``end_stage(stage, record)`` sees the
   stage's record and may add to it;
4. ``finalize(model, hardware)``: make the compression real (permanent masks, smaller modules,
   kernel conversion; remove training-only pieces it attached), then ``report()``: what it did, as
   numbers. Accuracy is measured on the finalized model; speed and ``model.pt`` on
   ``deployable(model)`` (the same model unless a method simulates something it cannot deploy).

Compressors compose (``compose:`` in a recipe, docs/ARCHITECTURE.md §3): their losses add and their stages
concatenate by role (``effml.runner.stage_plan``): every ``prepare`` stage first (a teacher trained
in the run), then every ``train`` stage in declaration order; a ``plain`` stage (plain training of
the model, e.g. distillation's student stage) runs only when no compressor declares a ``train``
stage, so "prune while distilling" trains once, with both. In a ``prepare`` stage only its owner is
active; in the others every compressor is.

A method whose training needs parameters beyond the model's (distillation's projections, early-exit
classifiers, a distillation token) adds them to the model in ``attach`` (so they are trained,
checkpointed and moved with it) and removes them in ``finalize``.

A method that swaps layers for other kernels in ``finalize`` (quantization, 2:4 sparsity) does it
through ``effml.kernels.select.convert_linears`` (chosen by measurement on the hardware target) and
keeps the returned decisions, as dicts, in ``self.kernel_decisions``: the run records them.

``state_dict``/``load_state_dict`` hold everything needed to resume exactly; Lightning stores them
in every checkpoint under ``state_key`` and the runner in every finished stage. When the runner
resumes after a finished stage it calls ``load_state_dict`` *before* loading the model's weights,
so a compressor that changed the model's shape (structured pruning) restores that shape there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from effml.errors import EffmlError
from effml.paths import RunDir


@dataclass(frozen=True)
class Stage:
    """One ``Trainer.fit``. ``max_epochs=None`` means ``trainer.max_epochs``.

    ``key`` is the declaring compressor's own name for the stage, and never changes: compressors
    recognise their stages by it (``stage.of(self.name, "teacher")``). ``label`` names the stage's
    directory and record; the runner sets it (``effml.runner.stage_plan``): the key, or
    ``<owner>_<key>`` when two compressors' keys collide.
    """

    key: str
    max_epochs: int | None = None
    owner: str = ""  # the compressor that declared it
    lr_scale: float = 1.0  # the stage's learning rate is trainer.lr times this
    role: str = "train"  # prepare | train | plain (see the module docstring)
    label: str = ""

    def __post_init__(self):
        assert self.role in ("prepare", "train", "plain"), self.role
        if not self.label:
            object.__setattr__(self, "label", self.key)

    def of(self, owner: str, *keys: str) -> bool:
        """Declared by ``owner`` (and, if keys are given, one of them)."""
        return self.owner == owner and (not keys or self.key in keys)


@dataclass(frozen=True)
class RunContext:
    """What a compressor knows of its run, read-only: ``prepare(ctx, datamodule)`` receives it.

    ``hardware`` is the resolved target (``hardware=auto`` already decided); ``model``, ``data``,
    ``trainer`` and ``measure`` are the run's typed sections; ``sections`` holds all of them, for a
    method that must find a related run by its identity (imp's controls).
    """

    name: str  # the recipe's
    seed: int
    run_dir: RunDir
    output_root: Path
    hardware: Any
    model: Any
    data: Any
    trainer: Any
    measure: Any
    sections: Mapping[str, Any]

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.hardware.accelerator == "gpu" and torch.cuda.is_available() else "cpu")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.hardware, self.device)


def autocast_dtype(hardware: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a mixed-precision run on the GPU (Lightning's bf16-mixed / 16-mixed)."""
    precision = str(getattr(hardware, "precision", "32-true"))
    if device.type != "cuda" or not precision.endswith("-mixed"):
        return None
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16


@dataclass
class CompressorConfig:
    """Fields every compressor config has."""

    name: str = "none"


@dataclass(frozen=True)
class Smoke:
    """A run of seconds on embedded data that shows the method at work. The registry-driven tests run
    every compressor on it, and the composition matrix every pair (tests/test_composition.py).

    ``setups`` name the model and data it runs on (``effml.compressors.smoke.SETUPS``), preferred
    first; ``settings`` are its own fields, relative to its config (``teacher.epochs=1``).
    """

    setups: tuple[str, ...] = ("mlp",)
    settings: tuple[str, ...] = ()


# What a compressor may change in the model or the run, in words that finish "<name> ...".
OWNED = {
    "structure": "removes heads and neurons physically",
    "masks": "prunes the weights with masks of its own",
    "quantization": "quantizes the weights",
    "training quantization": "fake-quantizes the layers while they train",
    "modules": "adds modules of its own to the model (heads, exits, projections)",
    "training data": "replaces the training data",
    "adapters": "trains low-rank adapters on frozen weights and merges them in at the end",
    "rewinding": "rewinds the model's state to an earlier point at every level",
    "activation thresholds": "calibrates activation thresholds kept in the model's state",
    "token dropping": "drops tokens from layers while training",
    "attention": "replaces the attention function of every layer",
    "gathered inference": "computes each sample's layers from weights it gathers itself at inference",
}
# Pairs of owned things that cannot meet in one run (each found to crash or to undo the other in the
# composition matrix, tests/test_composition.py): each thing with itself; physical cuts, which rewind
# to θ0 by parameter name, beside anything that renames or adds parameters; and layers fake-quantized
# in training beside masks or added heads that wrap or tap the same layers.
CONFLICTS = {frozenset({thing}) for thing in OWNED} | {
    frozenset(pair) for pair in [("structure", "masks"), ("structure", "quantization"), ("structure", "modules"),
                                 ("training quantization", "masks"), ("training quantization", "modules"),
                                 # a merged adapter fills pruned zeros; quantized or cut layers are not the
                                 # ones the adapters wrap; another's added modules go unfrozen or unwrapped
                                 ("adapters", "masks"), ("adapters", "quantization"), ("adapters", "structure"),
                                 ("adapters", "training quantization"), ("adapters", "modules"),
                                 # a rewind resets calibrated thresholds: the run ended with no zeros
                                 ("rewinding", "activation thresholds"),
                                 # a window, Linformer's segments or LSH's buckets over the kept tokens
                                 # would cover other positions than the ones they were set for
                                 ("token dropping", "attention"),
                                 # EBERT's per-sample path reads plain Linear weights and runs its own
                                 # softmax attention: a quantized layer has none, a replaced attention is skipped
                                 ("gathered inference", "quantization"), ("gathered inference", "attention")]}


class Compressor(L.Callback):
    """Base class: every hook is a no-op, a method overrides only what it needs."""

    smoke: ClassVar[Smoke] = Smoke()
    owns: ClassVar[frozenset[str]] = frozenset()  # keys of OWNED: what this method changes
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # the tasks (effml.task.TASKS) it works on
    # False: the method cannot run in several processes (effml.distributed); a run of more is refused
    multi_process: ClassVar[bool] = True

    @classmethod
    def owned(cls, cfg: Any) -> frozenset[str]:
        """What a run of ``cfg`` changes: ``owns``, unless a field changes what the method does to
        the model (movement's block granularity also removes heads and channels physically)."""
        return cls.owns

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        """What must be true after a run of this method, alone or composed, read from the run's
        ``metrics.json`` (its report is ``metrics["compressors"][name]``): None, or what is wrong, in
        words. The smoke tests and the composition matrix assert it."""
        return None

    def __init__(self, cfg: Any):
        self.cfg = cfg
        # Kernel choices made in finalize (effml.kernels.select.Decision.as_dict()); the run records them.
        self.kernel_decisions: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def state_key(self) -> str:
        return f"compressor/{self.name}"

    def stages(self) -> list[Stage]:
        return [Stage("train", owner=self.name, role="plain")]

    @property
    def hard_loss_weight(self) -> float:
        """The factor on the task's own cross-entropy (KD's 1 − α); the factors of all compressors multiply."""
        return 1.0

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def prepare(self, ctx: RunContext, datamodule: Any) -> None:
        """Check the run before any file is written; keep from ``ctx`` what the method needs."""

    def begin_stage(self, stage: Stage, task: L.LightningModule) -> None:
        """Called before every stage's fit (also stages other compressors own)."""

    def end_stage(self, stage: Stage, record: dict[str, Any]) -> dict[str, Any] | None:
        """After a stage's fit and test (``record`` has epochs, steps, val_acc, test_acc, time_s):
        what to add to the stage's record. Called for every stage, also others'."""
        return None

    def train_dataloader(self, stage: Stage, datamodule: Any) -> Any | None:
        """A stage's training batches when they do not come from the data (data-free distillation
        generates its inputs): a DataLoader, or None for the datamodule's own."""
        return None

    def loss(self, task: L.LightningModule, batch: dict, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        return model

    def deployable(self, model: nn.Module) -> nn.Module:
        """The finalized model as it would be deployed on this hardware, which the speed measurement
        times and ``model.pt`` holds: the model itself, unless part of it is simulated for accuracy
        (fake quantization where no real kernel was kept) and deploys as something else."""
        return model

    def reference(self, dense: nn.Module) -> nn.Module:
        """The model the compressed one is timed against: the dense original, or a distiller's teacher."""
        return dense

    def target_sparsity(self) -> float | None:
        """The fraction of prunable weights this method sets to zero, where it has one."""
        return None

    def report(self) -> dict[str, Any]:
        return {}


class StructuredCompressor(Compressor):
    """A method that removes heads and neurons physically: its effect is a model of fewer FLOPs."""

    owns = frozenset({"structure"})

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        flops = metrics["flops"]
        return None if flops["compressed"] < flops["dense"] else f"FLOPs not reduced: {flops}"


def refuse_conflicts(names: list[str], owned: list[frozenset[str]]) -> None:
    """Two compressors whose owned things (``Compressor.owned``) conflict (``CONFLICTS``) cannot
    compose: one line."""
    for i, (first, a) in enumerate(zip(names, owned, strict=True)):
        for second, b in zip(names[i + 1:], owned[i + 1:], strict=True):
            for x, y in sorted((x, y) for x in a for y in b if frozenset({x, y}) in CONFLICTS):
                raise EffmlError(f"compressors {first} and {second} cannot compose: {first} {OWNED[x]} and "
                                 f"{second} {OWNED[y]}; use one of them")
