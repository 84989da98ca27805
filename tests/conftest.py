"""Shared test helpers: run the real CLI in-process on shrunken configs (docs/ARCHITECTURE.md §8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each,
    torch.set_num_threads(1)  # not 2 + 2 fighting over the cores (also for the runs they start)
    os.environ["OMP_NUM_THREADS"] = "1"

# Kernel timings are cached per machine (effml.kernels.select); tests measure into their own cache.
os.environ.setdefault("EFFML_KERNEL_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"effml-test-kernels-{os.getpid()}.json"))

@pytest.fixture
def one_thread():
    """torch at one thread for the test, restored after it. Tiny models on a shared 2-core machine: one
    intra-op thread is ~9x faster than two that wait on each other (8 s vs 74 s for TinyBERT's end-to-end
    run under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A run that exercises every stage on real data in seconds: few examples, few batches.
TINY = [
    "data.train_subset=512",
    "data.batch_size=64",
    "trainer.max_epochs=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.progress_bar=off",
    "measure.batch_size=8",
    "measure.iters=2",
    "measure.warmup=1",
    "measure.min_time_s=0",
]


@pytest.fixture
def effml(tmp_path, monkeypatch, capsys):
    """Run ``effml ARGS`` in-process in a fresh directory; returns (exit code, stdout, stderr)."""
    from effml.cli.main import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def train_in(root: Path, *args: str) -> Path:
    """``effml train ARGS`` in-process with ``root`` as the working directory (for module-scoped
    fixtures: a finished run other tests start from); returns ``root/outputs``."""
    from effml.cli.main import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", *args]) == 0
    finally:
        os.chdir(cwd)
    return root / "outputs"


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``effml ARGS`` as a separate process, the way a user runs it."""
    command = [sys.executable, "-m", "effml.cli.main", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(code: int, err: str, message: str) -> None:
    """Bad input: exit code 2 and one line on stderr that says what is wrong."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effml: error: ") and message in lines[0], err


class Linear(nn.Module):
    """A 4 → 3 linear classifier with seeded weights: a student or teacher for loss checks by hand."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x):
        return self.classifier(x)


def metrics_of(root: Path) -> dict:
    files = list(Path(root).rglob("metrics.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def smoke_args(setup: str, names: list[str]) -> list[str]:
    """``effml train`` arguments for a smoke run of ``names`` on ``setup``: the first is
    ``compressor``, the others are composed beside it, each with its own smoke settings."""
    from effml.compressors.smoke import SETUPS
    from effml.registry import COMPRESSORS

    first, *others = names
    args = [*SETUPS[setup], f"compressor={first}"]
    args += [f"compressor.{s}" for s in COMPRESSORS.get(first).target.smoke.settings]
    for name in others:
        args.append(f"+compressor@compose.{name}={name}")
        args += [f"compose.{name}.{s}" for s in COMPRESSORS.get(name).target.smoke.settings]
    return args
