"""Checkpoint I/O of the stage loop (docs/ARCHITECTURE.md §2, §8): ``last.ckpt`` while a stage
trains, ``end.pt`` once it has finished, ``model.pt`` at the end, and the state Lightning does not
keep (RNG streams, the stage's clock).

Every file is written atomically (``effml.paths.atomic_file``) and read with ``weights_only=True``
(``effml.safe_load``): a checkpoint holds tensors and plain data, never code.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from effml import safe_load
from effml.compressors._masks import refresh_masked_weights
from effml.paths import StageDir, atomic_save, atomic_write_text


class LastCheckpoint(L.Callback):
    """``last.ckpt`` of a stage, at every epoch end (and every N steps if asked), through the
    trainer's :class:`BackgroundCheckpointIO`. Lightning's ModelCheckpoint, with no top-k
    checkpoints, writes ``last`` only when training ends."""

    def __init__(self, path: Path, every_n_steps: int | None = None):
        self.path, self.every_n_steps = path, every_n_steps

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Not at an epoch's last batch: on_train_epoch_end saves right after that epoch's validation,
        # and Lightning resumes from a save of the last batch's end without running either.
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not last_batch:
            self.save(trainer)

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # (a save: with the optimizer's state)


class BackgroundCheckpointIO(TorchCheckpointIO):
    """Checkpoints copied to host memory in the training loop, then written to disk by a thread,
    atomically (a kill mid-write leaves the previous checkpoint).

    The disk is the slow part: on an H200 node a BERT-base checkpoint (weights and AdamW state,
    1.3 GB) took 3 s to write, as long as 40 training steps at batch 256, which made checkpointing
    half of a 3-epoch fine-tuning's time. One write is in flight at a time; ``wait`` lands it and
    re-raises its error, if any; ``close`` (the runner calls it before a stage counts as finished)
    also ends the thread."""

    def __init__(self):
        super().__init__()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="effml-checkpoint")
        self._pending: Future | None = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        self.wait()
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._pending = self._executor.submit(atomic_save, snapshot, Path(path))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """``wait``, then end the writer thread: a run of many stages (IMP levels) keeps none idle."""
        try:
            self.wait()
        finally:
            self._executor.shutdown()

    def teardown(self) -> None:
        """Lightning tears the strategy down after fit: the write may go on, validation and test
        run meanwhile."""


class ResumeState(L.Callback):
    """RNG states and the stage's training time, saved in every checkpoint: Lightning keeps
    neither, so without this a resumed stage would draw other dropout masks and misreport time."""

    state_key = "effml/resume"

    def __init__(self):
        self.base = 0.0
        self.started: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.base + (time.perf_counter() - self.started if self.started else 0.0)

    def state_dict(self) -> dict:
        return {
            "elapsed": self.elapsed(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": numpy_rng_state(),
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.base = state["elapsed"]
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        set_numpy_rng_state(state["numpy"])
        random.setstate(state["python"])


def numpy_rng_state() -> list:
    """numpy's global RNG state as plain data (its key array as a list of ints): a checkpoint holds
    nothing that ``torch.load(weights_only=True)`` refuses (effml.safe_load)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]


def set_numpy_rng_state(state) -> None:
    name, keys, *rest = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


# -- finished stages and the finalized model ---------------------------------------------------
def save_stage_end(stage: StageDir, task, compressors, record: dict) -> None:
    """``record.json``, then ``end.pt``: the stage counts as finished once ``end.pt`` exists."""
    state = {
        "model": task.model.state_dict(),
        "compressors": {c.state_key: c.state_dict() for c in compressors},
    }
    atomic_write_text(stage.record, json.dumps(record, indent=2))
    atomic_save(canonical(state), stage.end)


def canonical(value: Any) -> Any:
    """A copy of ``value`` whose pickle depends on its values alone, so that two runs reaching the
    same state write the same bytes, also when one of them resumed: pickle writes an object met
    twice as a reference (its memo), and which objects are shared differs after a resume (a
    compressor's mask may be the model's buffer, or a loaded copy of it). So: fresh containers,
    every tensor cloned (no storage shared), strings interned (equal ones always shared)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        copy = type(value)((canonical(k), canonical(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # a state_dict's module versions, read by load_state_dict
            copy._metadata = canonical(value._metadata)
        return copy
    if type(value) in (list, tuple):
        return type(value)(canonical(v) for v in value)
    if type(value) is str:
        return sys.intern(value)
    return value


def remove_last(stage: StageDir) -> None:
    """Delete a finished stage's ``last.ckpt`` (and its folder, if then empty): 17 MB beside an 8 MB
    ``end.pt`` for LeNet, 1.3 GB per stage for BERT-base."""
    stage.last_checkpoint.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        stage.last_checkpoint.parent.rmdir()


def load_stage_end(stage: StageDir, task, compressors) -> dict:
    state = check_loadable(stage.end, f"finished stage {stage.name}")
    for c in compressors:  # first: a compressor that shrank the model restores its shape here
        c.load_state_dict(state["compressors"][c.state_key])
    task.model.load_state_dict(state["model"])
    refresh_masked_weights(task.model)
    return state


def load_stage_record(stage: StageDir) -> dict:
    return json.loads(stage.record.read_text())


def check_loadable(path: Path, what: str, mmap: bool = False) -> dict:
    return safe_load.load(path, f"checkpoint of {what}", broken="is corrupt", advice="; delete it to redo that stage",
                          mmap=mmap)


def save_model(path: Path, model: torch.nn.Module) -> None:
    """The finalized model's weights, ``model.pt``: what a later run loads as its teacher."""
    atomic_save(canonical(model.state_dict()), path)
