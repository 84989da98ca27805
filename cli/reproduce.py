"""``effml reproduce TABLE``: rerun the grid behind a paper's table, then check it against the paper.

The table spec (``recipes/tables/TABLE.yaml``, see ``effml.tables``) names a recipe, seeds, and
series. Every job of every series is composed and validated first, so a bad override is one line
and exit code 2 before any work. Then each series, in the declared order (a control series may
need the base series' finished runs), runs as one ``effml train -m`` subprocess whose output
streams to the console. With ``--launcher local|slurm`` that command gets Hydra's submitit launcher
(``hydra/launcher=submitit_local`` or ``slurm``), which runs the series' jobs at the same time, as local
processes or SLURM jobs, and returns once they have all ended: the series still run one after the other. ``effml train`` skips runs that have a metrics.json, so a rerun only does
what is missing; a failed job never stops the others, its cell just shows as missing.

Results are found where the runs put them: ``runner.plan(cfg).run_dir.metrics`` for the
composed config of each job (``effml train -m`` exits 0 even when a job failed, so the file is the
only evidence). The table, the claims and a plot go to ``<output_root>/tables/TABLE/``.

Exit code: 0 when every claim passes and every run has its result; 1 when a claim fails or a
result is missing; 2 for bad input (unknown table, bad spec, bad override).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from effml import run_record, tables
from effml.errors import EffmlError
from effml.paths import RunDir
from effml.tables import Missing, Outcome, Point, Series, TableSpec

USAGE = """usage: effml reproduce TABLE [--seeds 0,1,2] [--launcher local|slurm] [--dry-run | --report] [override ...]
       effml reproduce --list

  TABLE          a table spec: recipes/tables/TABLE.yaml (or $EFFML_RECIPES/tables/TABLE.yaml)
  --seeds LIST   seeds to run instead of the table's (comma-separated)
  --launcher L   run each series' jobs through Hydra's submitit launcher, all at once: local (processes
                 of this machine, submitit_local) or slurm (SLURM jobs, conf/hydra/launcher/slurm.yaml;
                 set hydra.launcher.partition=... as an override); the series still run in order
  --dry-run      print the effml train commands and how many runs are finished; run nothing
  --report       only re-render the table from the runs that are finished; run nothing
  --list         the tables there are
  override       Hydra overrides for every run, e.g. trainer.max_epochs=1 hardware=h100
                 (pass the same ones to --report: they change the runs' identity)
"""


@dataclass
class Options:
    table: str | None = None
    seeds: list[int] | None = None
    dry_run: bool = False
    report_only: bool = False
    list_tables: bool = False
    help: bool = False
    overrides: tuple[str, ...] = ()
    launcher: str | None = None


# --launcher NAME → the Hydra launcher config each series' `effml train -m` gets (conf/hydra/launcher/)
LAUNCHERS = {"local": "submitit_local", "slurm": "slurm"}


@dataclass
class Job:
    """One run of the grid and where its result will be."""

    series: str
    seed: int
    run_dir: RunDir

    @property
    def metrics(self) -> Path:
        return self.run_dir.metrics


@dataclass
class SeriesPlan:
    """A series as one ``effml train -m`` command and the jobs that command runs."""

    series: Series
    overrides: list[str]
    jobs: list[Job]
    output_root: Path
    launcher: str | None = None  # a key of LAUNCHERS; None: the jobs run one by one in that process

    def command(self) -> list[str]:
        # the launcher goes first: the table's and the user's hydra.launcher.* overrides refine it
        launcher = [f"hydra/launcher={LAUNCHERS[self.launcher]}"] if self.launcher else []
        return [sys.executable, "-m", "effml.cli.main", "train", "-m", *launcher, *self.overrides]

    def finished(self) -> list[Job]:
        return [job for job in self.jobs if job.metrics.exists()]


def reproduce(args: list[str]) -> int:
    options = parse(args)
    if options.help:
        print(USAGE)
        return 0
    if options.list_tables:
        return list_tables()
    spec = tables.find_table(options.table)
    seeds = options.seeds or spec.seeds
    plans = plan_series(spec, seeds, list(options.overrides))
    for plan in plans:
        plan.launcher = options.launcher
    console = Console()
    if options.dry_run:
        print_commands(plans, console)
        return 0
    if not options.report_only:
        run_series(plans, console)
    outcome = collect(spec, plans, seeds, shlex.join(["effml", "reproduce", *args]))
    show(outcome, plans[0].output_root / "tables" / spec.name, console)
    return 0 if outcome.passed else 1


# --------------------------------------------------------------------------- arguments


def parse(args: list[str]) -> Options:
    options, overrides, rest = Options(), [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            options.help = True
        elif arg == "--list":
            options.list_tables = True
        elif arg == "--dry-run":
            options.dry_run = True
        elif arg == "--report":
            options.report_only = True
        elif arg == "--seeds" or arg.startswith("--seeds="):
            value = arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else "")
            options.seeds = parse_seeds(value)
        elif arg == "--launcher" or arg.startswith("--launcher="):
            options.launcher = parse_launcher(arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else ""))
        elif arg.startswith("-"):
            raise EffmlError(f"effml reproduce: unknown option '{arg}'; see effml reproduce --help")
        elif options.table is None and "=" not in arg:
            options.table = arg
        else:
            overrides.append(check_override(arg))
    options.overrides = tuple(overrides)
    if options.dry_run and options.report_only:
        raise EffmlError("effml reproduce: --dry-run and --report exclude each other")
    if options.table is None and not (options.list_tables or options.help):
        raise EffmlError("effml reproduce needs a table, e.g. effml reproduce lth_lenet (--list shows them)")
    return options


def parse_seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise EffmlError(f"--seeds needs distinct integers separated by commas, e.g. 0,1,2; got {value!r}")
    return seeds


def parse_launcher(value: str) -> str:
    if value not in LAUNCHERS:
        raise EffmlError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {value!r}")
    return value


def check_override(arg: str) -> str:
    """Overrides reach every run; the two that the table decides itself are refused."""
    if "=" not in arg and not arg.startswith("~"):
        raise EffmlError(f"'{arg}' is not an override (key=value); give one table: effml reproduce TABLE")
    key = arg.partition("=")[0].lstrip("+~")
    if key == "seed":
        raise EffmlError("the table runs its own seeds; choose them with --seeds 0,1,2")
    if key == "recipe":
        raise EffmlError("the table names its recipe; override its fields instead, e.g. trainer.max_epochs=1")
    return arg


# --------------------------------------------------------------------------- the grid


def plan_series(spec: TableSpec, seeds: list[int], extra: list[str]) -> list[SeriesPlan]:
    """Compose and validate every job of every series: a bad override fails here, before any work."""
    plans = []
    for series in spec.series:
        overrides = [f"recipe={series.recipe or spec.recipe}", f"seed={','.join(map(str, seeds))}",
                     *spec.overrides, *series.overrides, *extra]
        try:
            plans.append(plan_one(series, overrides))
        except EffmlError as e:
            raise EffmlError(f"table {spec.name}, series '{series.key}': {e}") from None
    return plans


def plan_one(series: Series, overrides: list[str]) -> SeriesPlan:
    from effml import runner
    from effml.cli.compose import compose_config, expand_jobs

    jobs, output_root = [], None
    for job_overrides in expand_jobs(overrides, multirun=True):
        cfg = compose_config(job_overrides)
        jobs.append(Job(series.key, int(cfg.seed), runner.plan(cfg).run_dir))
        output_root = Path(cfg.output_root)
    return SeriesPlan(series, overrides, jobs, output_root)


def print_commands(plans: list[SeriesPlan], console: Console) -> None:
    for index, plan in enumerate(plans, 1):
        done = len(plan.finished())
        console.print(Text(f"# series {index}/{len(plans)}: {plan.series.key}: "
                           f"{len(plan.jobs)} runs, {done} finished already", style="dim"))
        console.out(shlex.join(plan.command()), highlight=False)


# --------------------------------------------------------------------------- running


def run_series(plans: list[SeriesPlan], console: Console) -> None:
    """Each series in order, as a subprocess, its output streamed above a progress bar of runs;
    a series whose runs are all finished is not started at all."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("runs"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=sum(len(p.jobs) for p in plans))
        for index, plan in enumerate(plans, 1):
            label = plan.series.label or plan.series.key
            title = f"series {index}/{len(plans)}: {label} ({len(plan.jobs)} runs)"
            progress.update(task, description=title)
            progress.console.rule(title)
            if len(plan.finished()) == len(plan.jobs):  # effml train would only say so
                progress.console.print(f"all {len(plan.jobs)} runs finished already; nothing to run")
                progress.advance(task, len(plan.jobs))
                continue
            progress.console.out(shlex.join(plan.command()), style="dim", highlight=False)
            code = run_streaming(plan, progress, task)
            if code != 0:
                progress.console.print(Text(f"effml train exited with {code} for series {plan.series.key}; "
                                            "going on with the others", style="bold red"))


def run_streaming(plan: SeriesPlan, progress: Progress, task) -> int:
    """Run the series' command; count a run done as soon as a line names its finished directory."""
    pending = list(plan.jobs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(plan.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, env=env) as child:
        for line in child.stdout:
            progress.console.out(line.rstrip("\n"), highlight=False)
            done = [job for job in pending if str(job.run_dir.path) in line and job.metrics.exists()]
            if done:
                pending = [job for job in pending if job not in done]
                progress.advance(task, len(done))
    progress.advance(task, len(pending))  # failed ones too: the bar counts runs attempted
    return child.returncode


# --------------------------------------------------------------------------- results


MISSING_WHY = {
    "not run": "not run yet",
    "running": "still running: see run.log beside it",
    "failed": "the run started and ended without it, failed or killed: see the log above or run.log beside it",
}


def collect(spec: TableSpec, plans: list[SeriesPlan], seeds: list[int], command: str) -> Outcome:
    """The points of every finished run; every job without a usable result is named as missing."""
    from effml import report

    points: list[Point] = []
    missing: list[Missing] = []
    seeds_done: dict[str, set[int]] = defaultdict(set)
    devices: set[str] = set()
    for job in (job for plan in plans if not plan.series.prerequisite for job in plan.jobs):
        if not job.metrics.exists():
            state = run_record.missing_state(job.run_dir)
            missing.append(Missing(job.series, job.seed, f"no {job.metrics} ({MISSING_WHY[state]})", state))
            continue
        try:
            metrics = report.load_metrics(job.metrics)
            found = tables.read_points(spec, job.series, job.seed, metrics)
        except (EffmlError, ValueError) as e:
            missing.append(Missing(job.series, job.seed, f"{job.metrics}: {e}"))
            continue
        if not found:
            missing.append(Missing(job.series, job.seed, f"{job.metrics}: no points in '{spec.points}'"))
            continue
        points += found
        seeds_done[job.series].add(job.seed)
        devices.add(tables.run_device(metrics))
    cells = tables.aggregate(points)
    missing += tables.incomplete_cells(cells, {series: len(s) for series, s in seeds_done.items()})
    return Outcome(spec, cells, tables.check_claims(spec, cells), missing, seeds, command, sorted(devices))


def show(outcome: Outcome, folder: Path, console: Console) -> None:
    console.print(tables.rich_table(outcome))
    for line in tables.claim_lines(outcome):
        console.print(line)
    for m in outcome.missing:
        console.print(Text(f"missing: {m.text}", style="yellow"))
    files = tables.write_outputs(outcome, folder)
    console.print(Text(f"written: {', '.join(str(p) for p in files.values())}", style="dim"))
    failed = [c for c in outcome.claims if not c.passed]
    verdict = f"{len(failed)} of {len(outcome.claims)} claims fail" if failed else "every claim holds"
    if outcome.missing:
        verdict += f"; {len(outcome.missing)} results missing"
    style = "bold green" if outcome.passed else "bold red"
    console.print(Text(f"{outcome.spec.name}: {verdict}", style=style))


# --------------------------------------------------------------------------- --list


def list_tables() -> int:
    table = Table(title="effml reproduce: paper tables")
    for column in ("table", "title", "paper", "recipe", "series × seeds"):
        table.add_column(column, style="bold cyan" if column == "table" else None,
                         no_wrap=column == "table", justify="right" if column == "series × seeds" else "left")
    for name, path in tables.table_files().items():
        try:
            spec = tables.load_spec(path)
        except EffmlError as e:
            table.add_row(name, Text(f"invalid: {e}", style="red"), "", "", "")
            continue
        recipes = ", ".join(dict.fromkeys(s.recipe or spec.recipe for s in spec.series))
        runs = f"{len(spec.series)} × {len(spec.seeds)} = {len(spec.series) * len(spec.seeds)}"
        table.add_row(name, Text(spec.title), Text(spec.paper), recipes, runs)
    Console().print(table)
    return 0
