"""Where every file of a run lives, in one place (after open_lth's ``foundations/paths.py``;
docs/ARCHITECTURE.md §2)::

    <output_root>/<recipe>/<hash>/seed_<n>/       RunDir
        config.yaml  run.json  run.log  .lock      written when the run starts
        stages/<NN>_<label>/                       StageDir, one per stage, in order
            checkpoints/last.ckpt                  the stage's latest state (deleted once it ends)
            record.json  end.pt                    the stage finished (end.pt is written last)
        logs/<logger>/<NN>_<label>/                the loggers' files
        final/                                     the finalized model's validation and test
        model.pt  [model/]                         the finalized weights (an HF export beside them)
        metrics.json                               the run finished; never touched again

Code asks a ``RunDir`` or a ``StageDir`` for these paths rather than spell them (``effml report``
alone searches folders for ``metrics.json`` by name). Every file that must never be seen
half-written goes through :func:`atomic_file`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from effml.errors import EffmlError


@dataclass(frozen=True)
class StageDir:
    """``stages/<NN>_<label>``: a stage is finished when its ``end.pt`` exists."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return self.path.name.split("_", 1)[1]  # after the NN_ index

    @property
    def end(self) -> Path:
        return self.path / "end.pt"

    @property
    def record(self) -> Path:
        return self.path / "record.json"

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.ckpt"

    @property
    def finished(self) -> bool:
        return self.end.exists()


@dataclass(frozen=True)
class RunDir:
    """``<output_root>/<recipe>/<hash>/seed_<n>``: one seed of one configuration."""

    path: Path

    def __str__(self) -> str:  # messages name the folder
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def of(cls, output_root: str | Path, recipe: str, config_hash: str, seed: int) -> RunDir:
        return cls(Path(output_root) / recipe / config_hash / f"seed_{seed}")

    @property
    def hash(self) -> str:
        return self.path.parent.name

    @property
    def recipe(self) -> str:
        return self.path.parent.parent.name

    config = property(lambda self: self.path / "config.yaml")
    run_record = property(lambda self: self.path / "run.json")
    log = property(lambda self: self.path / "run.log")
    lock = property(lambda self: self.path / ".lock")
    metrics = property(lambda self: self.path / "metrics.json")
    model = property(lambda self: self.path / "model.pt")
    export = property(lambda self: self.path / "model")  # save_pretrained of a structurally pruned BERT
    logs = property(lambda self: self.path / "logs")
    final = property(lambda self: self.path / "final")

    @property
    def finished(self) -> bool:
        return self.metrics.is_file()

    def artifact(self, name: str) -> Path:
        """A compressor's own file (a plot, an analysis), beside the run's."""
        return self.path / name

    def stage(self, index: int, label: str) -> StageDir:
        return StageDir(self.path / "stages" / f"{index:02d}_{label}")

    def finished_stages(self) -> list[StageDir]:
        """The stage directories holding an ``end.pt``, in order."""
        return [StageDir(end.parent) for end in sorted(self.path.glob("stages/*/end.pt"))]

    def stage_end(self, key: str) -> Path | None:
        """The ``end.pt`` of the finished stage of ``key`` (its label is the key, or owner_key when
        keys collided; its index depends on the run)."""
        return next((s.end for s in self.finished_stages() if s.label == key or s.label.endswith(f"_{key}")), None)


def runs_of(output_root: str | Path, recipe: str, seed: int, config_hash: str | None = None,
            where: Callable[[RunDir], bool] = lambda run: run.finished) -> list[RunDir]:
    """The run directories of ``recipe`` and ``seed`` under ``output_root`` (of every configuration,
    unless ``config_hash``) for which ``where`` holds: by default, the finished ones."""
    found = sorted((Path(output_root) / recipe).glob(f"{config_hash or '*'}/seed_{seed}"))
    return [run for run in map(RunDir, found) if run.path.is_dir() and where(run)]


def check_writable(folder: str | Path) -> None:
    """Refuse, in one line, an outputs folder that cannot be written (a read-only mount, an immutable
    folder, no permission), by creating and removing a file in it or its nearest existing parent:
    permission bits do not tell, since they do not bind root."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".effml-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise unwritable(e, folder) from None


def unwritable(error: OSError, folder: str | Path) -> EffmlError:
    return EffmlError(f"cannot write {folder}: {error.strerror}; free space there or set output_root "
                      "to a writable folder")


# -- atomic writes ----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A file to write ``path`` through: a temporary file in the same folder, fsynced, then renamed
    over ``path``. A reader, or a run killed mid-write, sees the old file or the new one, never half
    of one; an error leaves the old file and no temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as f:
        f.write(text.encode())
    return Path(path)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` of ``obj`` through :func:`atomic_file`."""
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)
    return Path(path)
