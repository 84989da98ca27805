"""Resume after a mid-epoch checkpoint (``trainer.checkpoint_every_n_steps``) is exact: the resumed
epoch goes on with the very batches, and the very random numbers, that an uninterrupted run uses
next (``effml.data._base.ResumableLoader``, whose position Lightning keeps in every checkpoint)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, train_in
from effml.checkpoints import ResumeState
from effml.registry import DATASETS
from effml.safe_load import load as safe_load


class _Record(L.LightningModule):
    """A linear model that records every train batch's labels and one random number per step
    (drawn from torch's global RNG, as dropout would be)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list[list[int]] = []
        self.draws: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["labels"].tolist())
        self.draws.append(torch.rand(()).item())
        return torch.nn.functional.cross_entropy(self.layer(batch["x"].flatten(1)), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Killed(Exception):
    pass


class _SaveThenDie(L.Callback):
    """Saves at ``step`` from ``on_train_batch_end`` (as effml's LastCheckpoint does), then dies."""

    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise _Killed


def _fit(tmp_path: Path, callbacks: list, ckpt: Path | None = None, workers: int = 0) -> _Record:
    L.seed_everything(0, verbose=False)
    entry = DATASETS.get("digits")
    dm = entry.target(entry.make_config({"train_subset": 200, "batch_size": 20, "num_workers": workers}), seed=7)
    model = _Record()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[ResumeState(), *callbacks])
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    except _Killed:
        pass
    return model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run (3 epochs of 10 batches), once per number of workers."""
    runs: dict[int, _Record] = {}

    def run(workers: int) -> _Record:
        if workers not in runs:
            runs[workers] = _fit(tmp_path_factory.mktemp("uninterrupted"), [], workers=workers)
        return runs[workers]

    return run


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
@pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers")
@pytest.mark.parametrize(
    "step, workers",
    # 10 batches an epoch: mid-epoch, and each epoch's last batch; with worker processes (which take
    # indices ahead, and once took even a resumed epoch 1's from epoch 0's order)
    [(14, 0), (3, 0), (10, 0), (14, 2), (10, 2)],
)
def test_the_resumed_epoch_goes_on_with_the_next_batches_and_random_numbers(tmp_path, uninterrupted, step,
                                                                           workers):
    straight = uninterrupted(workers)
    ckpt = tmp_path / "step.ckpt"
    first = _fit(tmp_path / "b", [_SaveThenDie(step, ckpt)], workers=workers)
    resumed = _fit(tmp_path / "c", [], ckpt=ckpt, workers=workers)
    assert len(straight.seen) == 30 and len(first.seen) == step
    assert first.seen + resumed.seen == straight.seen  # the same batches, none twice, none left out
    assert first.draws + resumed.draws == straight.draws  # the RNG restored is the next step's
    weights = zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)
    fit_loop = safe_load(ckpt, "test checkpoint")["loops"]["fit_loop"]["state_dict"]
    epoch, batches = divmod(step - 1, 10)  # where the loader was: its epoch and the batches it had yielded
    assert fit_loop["combined_loader"] == [{"epoch": epoch, "batches": batches + 1}]


# -- as a user would: SIGKILL right after a mid-epoch last.ckpt, then the same command again -------
BATCHES_PER_EPOCH = 30
MID_EPOCH_RUN = ["recipe=magnitude_lenet", "data.train_subset=1500", "data.batch_size=50", "data.augment=true",
                 "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=4", "compressor.frequency=5",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.progress_bar=off",
                 "measure.enabled=false"]  # fmt: skip
# 30 batches an epoch: last.ckpt at steps 4, 8, ..., 28 (mid-epoch) and 30 (the epoch's end);
# masks change every 5 steps from step 6 to 42; every image is randomly shifted and mirrored


def _kill_after_a_mid_epoch_checkpoint(cwd: Path, env: dict, attempts: int = 3) -> Path:
    """Start the run, SIGKILL it as soon as last.ckpt appears; the checkpoint must be mid-epoch (the
    first one is, at step 4; on a loaded machine the run may have got further: then start over)."""
    command = [sys.executable, "-m", "effml.cli.main", "train", *MID_EPOCH_RUN]
    log = cwd.parent / "killed.log"  # a file, not a pipe: a full pipe would stall the run
    for _ in range(attempts):
        shutil.rmtree(cwd / "outputs", ignore_errors=True)
        with log.open("w") as out:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (found := list(cwd.glob("outputs/*/*/*/stages/00_train/checkpoints/last.ckpt"))):
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise AssertionError(f"last.ckpt never appeared:\n{log.read_text()}")
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        step = safe_load(found[0], "test checkpoint")["global_step"]
        if step % BATCHES_PER_EPOCH and not list(cwd.rglob("end.pt")):
            return found[0]
    raise AssertionError(f"no kill landed mid-epoch in {attempts} attempts")


@pytest.mark.e2e
def test_sigkill_after_a_mid_epoch_checkpoint_then_rerun_ends_bit_identical(tmp_path, monkeypatch, capfd):
    # The uninterrupted run and the resumed one run in this process, the killed one in a child: all
    # on one thread, so that floating-point sums are split alike and the weights can be equal bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        straight, killed = tmp_path / "straight", tmp_path / "killed"
        straight.mkdir(), killed.mkdir()
        train_in(straight, *MID_EPOCH_RUN)
        checkpoint = _kill_after_a_mid_epoch_checkpoint(killed, env)
        capfd.readouterr()
        train_in(killed, *MID_EPOCH_RUN)  # the same command again: resumes from the mid-epoch last.ckpt
    finally:
        torch.set_num_threads(threads)

    said = capfd.readouterr().err.splitlines()  # it resumed: a restart from scratch would end equal too
    assert any("resuming from" in line and str(checkpoint.relative_to(killed)) in line for line in said), said
    for name in ("stages/00_train/end.pt", "model.pt"):
        a, b = (safe_load(next(root.rglob("seed_0")) / name, name) for root in (straight, killed))
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and (name == "model.pt" or any(k.endswith("weight_mask") for k in a))
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different} differ after resuming mid-epoch"


def test_no_step_checkpoint_at_an_epoch_s_last_batch(tmp_path):
    """Lightning resumes from a checkpoint saved at the end of an epoch's last batch without running
    that epoch's validation and epoch-end hooks (IMP's and skeptical's among them); the epoch-end
    checkpoint comes right after, so LastCheckpoint saves only that one."""
    from effml.checkpoints import LastCheckpoint

    saved = []

    class Counting(LastCheckpoint):
        def save(self, trainer) -> None:
            saved.append(trainer.global_step)

    _fit(tmp_path, [Counting(tmp_path / "last.ckpt", every_n_steps=5)])
    assert saved == [5, 10, 15, 20, 25, 30]  # 10 and 20 and 30 once each, at their epoch's end
