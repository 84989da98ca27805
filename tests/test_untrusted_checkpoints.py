"""A checkpoint never runs code (effml.safe_load): a pickle whose ``__reduce__`` would call something,
given on every route by which effml reads a file — a teacher checkpoint, the trained weights PTQ/QAT/N:M
start from, ``model.pt`` (or a stage's ``end.pt``) of a finished run named as teacher or source, a
stage's ``end.pt`` or ``last.ckpt`` met when resuming, and the ``end.pt`` IMP takes its masks from — is
refused in one line (exit code 2) before any of it runs: the file its payload would create never appears.
Each file is tried as a plain pickle and inside a ``torch.save`` zip."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import TINY, one_line_error

DIGITS = ["data=digits", *TINY, "measure.enabled=false"]
TEACHER = "compressor.teacher.model={name:lenet_300_100,hidden:[256,128]}"
KINDS = ["pickle", "torch_zip"]


class Payload:
    """Unpickling this creates ``sentinel``: a stand-in for any code a pickle can run."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return Path.touch, (self.sentinel,)


@pytest.fixture
def sentinel(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def plant(path: Path, kind: str, sentinel: Path) -> Path:
    """A malicious file at ``path``: the bare payload pickled, or a checkpoint-looking dict holding it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps(Payload(sentinel)))
    else:  # beside weights, where a Lightning .ckpt, an end.pt or a state dict keeps them
        weights = {"features.1.weight": torch.zeros(2, 2)}
        torch.save({"state_dict": weights, "model": weights, "extra": Payload(sentinel)}, path)
    return path


def fake_run(run_dir: Path, kind: str, sentinel: Path, weights: str = "model.pt") -> Path:
    """A "finished" run directory: its config, metrics and a malicious ``weights`` file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("model:\n  name: lenet_300_100\n  hidden: [256, 128]\n")
    (run_dir / "metrics.json").write_text(json.dumps({"test_acc": 0.9, "val_acc": 0.9}))
    plant(run_dir / weights, kind, sentinel)
    return run_dir


def refused(code: int, err: str, path: Path, sentinel: Path, lines: str = "one") -> None:
    """Exit code 2, the file named in one line (the last one, when training ran first), nothing ran."""
    assert not sentinel.exists(), "the pickle's payload ran"
    if lines == "one":
        one_line_error(code, err, f"{path} holds a disallowed object (")
    else:
        assert code == 2 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("effml: error: ") and f"{path} holds a disallowed object (" in last, err


def own_run_dir(*overrides: str) -> Path:
    """The run directory ``effml train OVERRIDES`` would use (relative to the working directory)."""
    from effml import runner
    from effml.cli.compose import compose_config

    return runner.plan(compose_config(list(overrides))).run_dir.path


# -- the payload is live: loaded the unsafe way, it runs ------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_the_payload_runs_when_unpickled_unsafely(tmp_path, sentinel, kind):
    path = plant(tmp_path / "evil.pt", kind, sentinel)
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert sentinel.exists()  # so the checks below, that it never appears, mean something


@pytest.mark.parametrize("kind", KINDS)
def test_safe_load_refuses_it_in_one_line(tmp_path, sentinel, kind):
    from effml import safe_load
    from effml.errors import EffmlError

    path = plant(tmp_path / "evil.pt", kind, sentinel)
    with pytest.raises(EffmlError) as error:
        safe_load.load(path, "teacher checkpoint")
    message = str(error.value)
    assert "\n" not in message and str(path) in message and not sentinel.exists()
    refused_global = "pathlib.Path.touch" if kind == "pickle" else "getattr"  # torch.save's protocol 2: getattr(Path, "touch")
    assert f"holds a disallowed object ({refused_global})" in message and "did not write this file" in message


# -- (a) a teacher checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_teacher_checkpoint(effml, tmp_path, sentinel, kind):
    evil = plant(tmp_path / "teacher.ckpt", kind, sentinel)
    code, _, err = effml("train", "compressor=kd", "compressor.teacher.source=checkpoint",
                         f"compressor.teacher.path={evil}", TEACHER, *DIGITS)
    refused(code, err, evil, sentinel)
    assert not (tmp_path / "outputs").exists()


# -- (b) the trained weights PTQ, QAT and N:M start from ----------------------------------------------
@pytest.mark.parametrize("compressor", ["ptq", "qat", "nm_sparsity"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_trained_weights_checkpoint(effml, tmp_path, sentinel, kind, compressor):
    evil = plant(tmp_path / "trained.pt", kind, sentinel)
    code, _, err = effml("train", f"compressor={compressor}", "compressor.weights.source=checkpoint",
                         f"compressor.weights.path={evil}", *DIGITS)
    refused(code, err, evil, sentinel)
    assert not (tmp_path / "outputs").exists()


# -- (c) model.pt / end.pt of a finished run named as teacher or source ----------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", ["model.pt", "stages/00_train/end.pt"])  # end.pt: a run from before model.pt
@pytest.mark.parametrize("route", [
    ["compressor=kd", "compressor.teacher.source=run", "compressor.teacher.path={run}"],
    ["compressor=kd", "compressor.teacher.source=recipe", "compressor.teacher.recipe=dense_lenet"],
    ["compressor=ptq", "compressor.weights.source=run", "compressor.weights.path={run}"],
    ["compressor=nm_sparsity", "compressor.weights.source=recipe", "compressor.weights.recipe=dense_lenet"],
], ids=["teacher_run", "teacher_recipe", "ptq_run", "nm_recipe"])
def test_weights_planted_in_a_finished_run(effml, tmp_path, sentinel, kind, weights, route):
    run = fake_run(tmp_path / "outputs" / "dense_lenet" / "0123456789ab" / "seed_0", kind, sentinel, weights)
    code, _, err = effml("train", *(r.format(run=run) for r in route), *DIGITS)
    named = "{run}" in " ".join(route)  # else found under output_root, which is relative
    refused(code, err, run / weights if named else (run / weights).relative_to(tmp_path), sentinel)


# -- (d) resuming: a stage's end.pt, a stage's last.ckpt ------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_finished_stage_s_end_pt(effml, tmp_path, sentinel, kind):
    stage = own_run_dir("recipe=dense_lenet", *DIGITS) / "stages" / "00_train"
    evil = plant(stage / "end.pt", kind, sentinel)
    (stage / "record.json").write_text(json.dumps({"name": "train", "time_s": 0.0}))
    code, _, err = effml("train", "recipe=dense_lenet", *DIGITS)
    refused(code, err, evil, sentinel)
    assert "delete it to redo that stage" in err and evil.exists()  # kept: the user decides


@pytest.mark.parametrize("kind", KINDS)
def test_a_stage_s_last_ckpt(effml, tmp_path, sentinel, kind):
    evil = plant(own_run_dir("recipe=dense_lenet", *DIGITS) / "stages" / "00_train" / "checkpoints" / "last.ckpt",
                 kind, sentinel)
    code, _, err = effml("train", "recipe=dense_lenet", *DIGITS)
    refused(code, err, evil, sentinel)
    assert "delete it to redo that stage" in err


@pytest.mark.parametrize("kind", KINDS)
def test_lightning_itself_loads_last_ckpt_weights_only(effml, tmp_path, sentinel, kind, monkeypatch):
    """Behind the runner's check, Lightning's own load of ``last.ckpt`` refuses the payload too."""
    from effml import checkpoints

    monkeypatch.setattr(checkpoints, "check_loadable", lambda path, what, mmap=False: {"global_step": 0})
    plant(own_run_dir("recipe=dense_lenet", *DIGITS) / "stages" / "00_train" / "checkpoints" / "last.ckpt",
          kind, sentinel)
    code, _, err = effml("train", "recipe=dense_lenet", *DIGITS)
    assert code != 0 and "Weights only load failed" in err and not sentinel.exists()  # torch.load's refusal


def test_an_old_last_ckpt_with_numpy_s_rng_state_is_one_line(effml, tmp_path):
    """Before safe loading, ResumeState kept numpy's RNG state as it comes, with an ndarray: such a
    last.ckpt is refused in one line (numpy arrays are not allowed), and redoing the stage is the fix."""
    import numpy as np

    old = own_run_dir("recipe=dense_lenet", *DIGITS) / "stages" / "00_train" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save({"epoch": 0, "callbacks": {"effml/resume": {"numpy": np.random.get_state()}}}, old)
    code, _, err = effml("train", "recipe=dense_lenet", *DIGITS)
    one_line_error(code, err, "a disallowed object (numpy.")
    assert str(old) in err and "delete it to redo that stage" in err
    old.unlink()
    code, _, err = effml("train", "recipe=dense_lenet", *DIGITS)  # the stage redone
    assert code == 0, err


# -- (e) the end.pt IMP takes its masks from ------------------------------------------------------------
IMP = ["train", "recipe=lth_lenet", *DIGITS, "compressor.levels=1", "trainer.max_epochs=1"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ["base_run", "ticket_from"])
def test_the_masks_source_s_end_pt(effml, tmp_path, sentinel, kind, source):
    if source == "base_run":  # control=reinit takes the masks of the same config's control=none run
        base = own_run_dir(*IMP[1:])
        extra = ["compressor.control=reinit"]
    else:
        base = tmp_path / "elsewhere" / "seed_0"
        extra = [f"compressor.ticket_from={base}"]
    evil = plant(base / "stages" / "01_level_01" / "end.pt", kind, sentinel)
    code, _, err = effml(*IMP, *extra)
    refused(code, err, evil, sentinel, lines="last")  # after level 0 trained: its log lines come first


# -- what effml writes loads safely -----------------------------------------------------------------------
def test_every_file_a_run_writes_loads_weights_only(effml, tmp_path):
    """end.pt, last.ckpt (RNG states included) and model.pt of a pruning run: tensors and plain data."""
    code, _, err = effml("train", "recipe=magnitude_lenet", *DIGITS, "trainer.keep_last=true")
    assert code == 0, err
    files = sorted([*tmp_path.rglob("*.pt"), *tmp_path.rglob("*.ckpt")])
    assert {f.name for f in files} == {"end.pt", "last.ckpt", "model.pt"}
    for f in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == [], f
        torch.load(f, weights_only=True)
    resume = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["callbacks"]["effml/resume"]
    assert isinstance(resume["numpy"], list) and len(resume["numpy"][1]) == 624  # MT19937's key, as ints


def test_a_resume_state_round_trips_the_rngs():
    import random

    import numpy as np

    from effml.checkpoints import ResumeState

    state = ResumeState().state_dict()
    expected = (np.random.random(3), random.random(), torch.rand(3))
    np.random.random(5)  # drawn after the checkpoint: forgotten at resume
    random.random()
    torch.rand(5)
    ResumeState().load_state_dict(state)
    again = (np.random.random(3), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], again[0]) and expected[1] == again[1] and torch.equal(expected[2], again[2])
