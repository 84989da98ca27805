"""A ``-m`` sweep runs every job whatever happens to the others, ends with a table of them, and exits
non-zero when one failed (cli/sweep.py); Ctrl-C still stops it at once with 130.

The sweeps run in-process (the ``effml`` fixture), so a job can be made to fail with a non-effml
exception by wrapping ``effml.runner.run``, which the CLI calls for every job."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from conftest import TINY
from effml import runner
from effml.errors import Interrupted

FAST = [*(a for a in TINY if not a.startswith("trainer.max_epochs=")), "data=digits", "trainer.max_epochs=1",
        "measure.train_step=false"]
SWEEP = ["train", "-m", "recipe=magnitude_lenet", *FAST]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the table's rows on one line each


def rows(out: str) -> dict[str, tuple[str, str]]:
    """The sweep table: the overrides of each job → (status, its run or error)."""
    assert "effml sweep: " in out, out
    table = out[out.index("effml sweep: "):].splitlines()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table if line.startswith("│")]
    return {overrides: (status, detail) for _, overrides, status, detail in cells}


def finished_runs(root: Path) -> list[str]:
    return sorted(m.parent.name for m in (root / "outputs").rglob("metrics.json"))


def fail_seed(monkeypatch, seed: int, error: BaseException) -> list[int]:
    """Make the job of ``seed`` raise ``error`` as it starts; returns the seeds run so far."""
    real, seeds = runner.run, []

    def run(cfg, group=None):
        seeds.append(cfg.seed)
        if cfg.seed == seed:
            raise error
        return real(cfg, group=group)

    monkeypatch.setattr(runner, "run", run)
    return seeds


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> tuple[Path, int, str, str]:
    """A two-job sweep run to the end, shared by the test of its table and that of its rerun:
    (its folder, exit code, stdout, stderr)."""
    from effml.cli.main import main

    root, out, err = tmp_path_factory.mktemp("sweep"), io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        mp.chdir(root)
        mp.setenv("COLUMNS", "300")
        code = main([*SWEEP, "seed=0,1"])
    return root, code, out.getvalue(), err.getvalue()


def test_a_sweep_that_finishes_lists_every_job_and_exits_0(finished_sweep):
    root, code, out, err = finished_sweep
    assert code == 0, err
    assert finished_runs(root) == ["seed_0", "seed_1"]
    table = rows(out)
    assert [status for status, _ in table.values()] == ["finished", "finished"]
    assert "seed_0" in table["seed=0"][1] and "seed_1" in table["seed=1"][1]


def test_a_job_failing_with_an_effml_error_lets_the_others_run_and_the_sweep_fails(effml, tmp_path):
    code, out, err = effml(*SWEEP, "trainer.lr=1e30,0.1")  # the first job's loss becomes NaN
    assert code == 2, err  # the failed job's own exit code, as its run alone would give
    status, error = rows(out)["trainer.lr=1e+30"]
    assert status == "failed" and error.startswith("stage train: the training loss became nan")
    assert rows(out)["trainer.lr=0.1"][0] == "finished" and finished_runs(tmp_path) == ["seed_0"]
    assert "effml: error: stage train: the training loss became nan" in err


def test_a_job_failing_with_any_other_exception_is_one_line_and_the_others_run(effml, tmp_path, monkeypatch):
    fail_seed(monkeypatch, 0, RuntimeError("boom\non two lines"))
    code, out, err = effml(*SWEEP, "seed=0,1")
    assert code == 1, err
    assert "Traceback" not in out + err
    [line] = [line for line in err.splitlines() if "boom" in line]
    assert line.startswith("effml: error: RuntimeError: boom on two lines (traceback in ")
    log = tmp_path / line.split("(traceback in ")[1].rstrip(")")
    assert "Traceback" in log.read_text() and "RuntimeError: boom" in log.read_text()
    assert rows(out)["seed=0"] == ("failed", line.removeprefix("effml: error: "))
    assert rows(out)["seed=1"][0] == "finished" and finished_runs(tmp_path) == ["seed_1"]


def test_a_rerun_lists_the_jobs_as_skipped_and_exits_0(finished_sweep, effml, monkeypatch):
    root = finished_sweep[0]
    monkeypatch.chdir(root)
    metrics = sorted((root / "outputs").rglob("metrics.json"))
    before = [m.stat().st_mtime_ns for m in metrics]
    code, out, err = effml(*SWEEP, "seed=0,1")
    assert code == 0, err
    table = rows(out)
    assert [status for status, _ in table.values()] == ["skipped", "skipped"]
    assert "seed_1" in table["seed=1"][1] and out.count("finished already") == 2  # the runner's line, once a job
    assert [m.stat().st_mtime_ns for m in metrics] == before


def test_ctrl_c_stops_the_sweep_at_once_with_130(effml, monkeypatch):
    seeds = fail_seed(monkeypatch, 0, Interrupted("interrupted; rerun the same command to resume"))
    code, out, err = effml(*SWEEP, "seed=0,1")
    assert code == 130
    assert seeds == [0]  # the second job never started
    assert "effml: interrupted; rerun the same command to resume" in err and "effml sweep: " not in out
