"""The Lightning ``Trainer`` of every stage and of the final evaluation, built from the typed
``trainer``, ``hardware`` and ``logger`` sections (docs/ARCHITECTURE.md §2)."""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import OmegaConf

from effml import distributed

if TYPE_CHECKING:
    from effml.runner import Plan


def make_trainer(p: Plan, root: Path, max_epochs: int, callbacks: list, logger_version: str,
                 strategy: Any = None, plugins: list | None = None, resume_step: int | None = None,
                 one_process: bool = False, logger: Any = None) -> L.Trainer:
    """``resume_step``: the global step of the checkpoint the stage resumes from, if it does.
    ``strategy``: None for the run's own (``hardware.strategy``, ``effml.distributed.strategy``).
    ``one_process``: this process alone, on its own device (each rank's evaluation on the full
    data, and rank 0's final test). ``logger``: None for the run's own."""
    t, h = p.typed["trainer"], p.typed["hardware"]
    alone = one_process and distributed.world_size(h) > 1
    devices, num_nodes = (1, 1) if alone else (h.devices, h.num_nodes)
    if logger is None:  # alone: rank 0 logs (the others write nothing)
        logger = make_logger(p, logger_version, resume_step) if distributed.is_main() else False
    if alone:
        strategy = strategy or own_device(h)
    return L.Trainer(
        max_epochs=max_epochs,
        strategy=strategy or distributed.strategy(h),
        accelerator=h.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        precision=h.precision,
        callbacks=[*callbacks, *progress_bar(t.progress_bar)],
        logger=logger,
        default_root_dir=root,
        enable_progress_bar=show_progress(t.progress_bar),
        enable_model_summary=False,
        enable_checkpointing=False,  # effml.checkpoints.LastCheckpoint does it
        num_sanity_val_steps=0,
        gradient_clip_val=t.gradient_clip_val,
        limit_train_batches=_limit(t.limit_train_batches),
        limit_val_batches=_limit(t.limit_val_batches),
        limit_test_batches=_limit(t.limit_test_batches),
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if isinstance(t.val_check_interval, int) else 1,
        log_every_n_steps=t.log_every_n_steps,
        deterministic="warn" if h.accelerator == "gpu" else True,
        profiler=make_profiler(t.profiler, root),
        plugins=plugins,
        # each rank's slice of every global batch comes from effml's own sampler (effml.data._base
        # EpochSeededSampler); evaluation runs on the full data on each rank
        use_distributed_sampler=False,
    )


def make_profiler(kind: str, root: Path):
    from lightning.pytorch import profilers

    if kind == "none":
        return None
    profiler = profilers.SimpleProfiler if kind == "simple" else profilers.AdvancedProfiler
    return profiler(dirpath=root, filename="profile")


class KeepOnDevice(SingleDeviceStrategy):
    """One GPU, without Lightning's move of the model to the CPU at teardown: a 2:4 weight moved to
    the CPU turns dense, so the test pass and the speed measurement after it would not see the kernel."""

    def teardown(self) -> None:
        module, self._lightning_module = self._lightning_module, None
        try:
            super().teardown()
        finally:
            self._lightning_module = module


def keep_on_gpu() -> KeepOnDevice:
    return KeepOnDevice(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))


def own_device(h) -> SingleDeviceStrategy:
    """This rank's device alone (its GPU is its local rank's)."""
    if h.accelerator == "gpu":
        return SingleDeviceStrategy(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    return SingleDeviceStrategy(torch.device("cpu"))


def show_progress(setting: str) -> bool:
    return setting == "on" or (setting == "auto" and sys.stderr.isatty())


def progress_bar(setting: str) -> list:
    from lightning.pytorch.callbacks import RichProgressBar

    return [RichProgressBar(leave=True)] if show_progress(setting) else []


def make_logger(p: Plan, version: str, resume_step: int | None = None):
    from lightning.pytorch import loggers

    cfg, save_dir = p.typed["logger"], p.run_dir.logs
    if cfg.name == "csv":
        return StageCSVLogger(save_dir, version, resume_step)
    if cfg.name == "tensorboard":
        return loggers.TensorBoardLogger(save_dir, name="tensorboard", version=version, default_hp_metric=False)
    if cfg.name == "wandb":
        save_dir.mkdir(parents=True, exist_ok=True)
        run_name = f"{p.name}/{p.run_dir.hash}/{p.run_dir.path.name}"
        return loggers.WandbLogger(
            project=cfg.project, entity=cfg.entity, mode=cfg.wandb_mode, save_dir=str(save_dir),
            name=f"{run_name}/{version}", group=p.group or run_name, job_type=version,
            config=OmegaConf.to_container(p.cfg, resolve=True), reinit="create_new",
        )
    return False


class StageCSVLogger(CSVLogger):
    """Lightning's CSV logger, made whole across a resume: each row is written as it is logged, and a
    resumed stage keeps the rows logged before its checkpoint (``step`` < the checkpoint's global
    step) and drops the later ones, which the resumed training logs again. Lightning's own deletes
    the file of an existing version, so a resumed stage kept only its last part."""

    def __init__(self, save_dir: Path, version: str, resume_step: int | None):
        super().__init__(save_dir, name="csv", version=version, flush_logs_every_n_steps=1)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumedExperimentWriter(self.log_dir, self.resume_step)
        return self._experiment


class ResumedExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """(Called by ``__init__``.) Keep the rows from before the checkpoint, or none for a new stage."""
        path = Path(self.metrics_file_path)
        if self.resume_step is None or not path.is_file():
            path.unlink(missing_ok=True)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if int(row["step"]) < self.resume_step]
            self.metrics_keys = list(reader.fieldnames or [])
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


@contextlib.contextmanager
def compiled(task: L.LightningModule, h) -> Iterator[L.LightningModule]:
    """The task, its model compiled for one fit under ``hardware.compile`` (``hardware.compile_mode``).

    ``nn.Module.compile`` compiles the model's call in place: parameter names, checkpoints and the
    compressors' hooks stay as they are, and Lightning sees a plain LightningModule. (Compiling the
    whole task made dynamo trace Lightning's ``self.log`` and fail: torch 2.13, Lightning 2.6.)"""
    if not h.compile:
        yield task
        return
    task.model.compile(mode=str(h.compile_mode))
    try:
        yield task
    finally:  # the next stage compiles its own model (a surgery may have changed it)
        task.model._compiled_call_impl = None


def _limit(value: float | None):
    if value is None:
        return None
    return int(value) if value >= 1 and float(value).is_integer() else value
