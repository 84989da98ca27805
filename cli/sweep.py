"""A ``-m`` sweep: every job runs whatever happens to the others, then a table lists how each ended.

A job is ``finished``, ``skipped`` (its ``metrics.json`` existed before it started: finished already)
or ``failed``. A failed job prints one line: an ``EffmlError``'s message, or the type and message of
any other exception, whose traceback goes to the run's ``run.log`` (to ``traceback.log`` in the job's
folder under ``<output_root>/multirun/`` when the run directory was never made), not the console.

Exit code: 0 when no job failed; else the highest code among the failed jobs, each the code its run
alone would give (an ``EffmlError``'s ``exit_code``, 2 for bad input; 1 for any other exception).
Ctrl-C (``Interrupted``) stops the sweep at once with 130.

The table is kept by the process that started the sweep. Under a launcher that runs the jobs in other
processes (``hydra/launcher=local``, ``slurm``, ``submitit_local``) each job also writes how it ended to
``effml_job.json`` in its folder under ``<output_root>/multirun/``, and the table is read back from
there; a failed job prints its line in its own process and raises ``JobFailed`` (Hydra fails the
sweep there too), and the table still lists every job.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from rich.console import Console
from rich.table import Table
from rich.text import Text

from effml.errors import EffmlError, Interrupted

STYLES = {"finished": "green", "skipped": "cyan", "failed": "bold red"}


@dataclass
class Job:
    """One job of the sweep and how it ended."""

    num: int
    overrides: tuple[str, ...]
    status: str  # finished | skipped | failed
    detail: str  # the run directory, or the error line
    exit_code: int = 0


JOBS: list[Job] = []
_owner: int | None = None  # the process that collects JOBS
_started = 0.0
_roots: list[Path] = []  # output roots whose multirun/ folders launched jobs write to
JOB_FILE = "effml_job.json"


def start(output_roots: list[str] = ()) -> None:
    """Collect the jobs this process runs from now on (and those launched elsewhere that write
    under ``output_roots``)."""
    global _owner, _started, _roots
    JOBS.clear()
    _owner, _started, _roots = os.getpid(), time.time(), [Path(r) for r in output_roots]


class JobFailed(Exception):
    """A failed job, raised in a launcher's worker so that Hydra fails the sweep there too."""


def run_job(cfg, group: str) -> None:
    """Run one job of a sweep and record how it ended; only Ctrl-C (``Interrupted``) propagates."""
    hydra = HydraConfig.get()
    job = Job(hydra.job.num, tuple(hydra.overrides.task), *outcome(cfg, group))
    JOBS.append(job)
    if os.getpid() != _owner:  # a launched job: the process that started the sweep reads it back
        from effml.paths import atomic_write_text

        atomic_write_text(Path(hydra.runtime.output_dir) / JOB_FILE, json.dumps(asdict(job)))
        if job.status == "failed":
            raise JobFailed(job.detail)


def outcome(cfg, group: str) -> tuple[str, str, int]:
    """How one job ended: its status, its run directory or error line, and its exit code."""
    from effml import runner

    run_dir = None
    try:
        run_dir = runner.plan(cfg, group).run_dir
        finished_already = run_dir.finished  # metrics.json: runner.run will only say so
        runner.run(cfg, group=group)
        if finished_already:
            return "skipped", str(run_dir), 0  # runner.run said "finished already" and where
        return "finished", str(run_dir), 0
    except Interrupted:
        raise
    except EffmlError as e:
        print(f"{e.prefix}{e}", file=sys.stderr)
        return "failed", str(e), e.exit_code
    except Exception as e:
        message = " ".join(str(e).split())[:300]
        line = f"{type(e).__name__}: {message} (traceback in {save_traceback(e, run_dir)})"
        print(f"effml: error: {line}", file=sys.stderr)
        return "failed", line, 1


def save_traceback(error: Exception, run_dir) -> Path:
    """Append the traceback to the run's run.log, or, with no run directory yet, to the job's folder."""
    made = run_dir is not None and run_dir.path.is_dir()
    sweep = HydraConfig.get().sweep
    log = run_dir.log if made else Path(sweep.dir, sweep.subdir, "traceback.log")
    with log.open("a") as f:
        traceback.print_exception(error, file=f)
    return log


def finish() -> int:
    """Print the table of the sweep's jobs (nothing for a single run); the exit code of the sweep."""
    jobs = JOBS or launched_jobs()
    if not jobs:
        return 0
    Console().print(table(jobs))
    return max(job.exit_code for job in jobs)


def launched_jobs() -> list[Job]:
    """The jobs other processes ran for this sweep (``effml_job.json`` written since it started)."""
    found = [f for root in _roots for f in (root / "multirun").glob(f"*/*/{JOB_FILE}")
             if f.stat().st_mtime >= _started]
    jobs = [Job(**{**(d := json.loads(f.read_text())), "overrides": tuple(d["overrides"])}) for f in found]
    return sorted(jobs, key=lambda j: j.num)


def table(jobs: list[Job]) -> Table:
    """One row per job: the overrides that differ between jobs, the status, the run or the error."""
    common = set.intersection(*(set(job.overrides) for job in jobs)) if len(jobs) > 1 else set()
    counts = ", ".join(f"{sum(j.status == s for j in jobs)} {s}" for s in STYLES)
    result = Table(title=f"effml sweep: {len(jobs)} jobs, {counts}")
    for name in ("#", "overrides", "status", "run / error"):
        result.add_column(name, overflow="fold")
    for job in jobs:
        overrides = " ".join(o for o in job.overrides if o not in common)
        status = Text(job.status, style=STYLES[job.status])
        result.add_row(str(job.num), Text(overrides), status, Text(job.detail))
    return result
