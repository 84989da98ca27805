"""``effml list`` and ``effml report``: Rich tables of what exists and of what finished."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from effml.errors import EffmlError

KINDS = {"recipes": "recipe", "models": "model", "data": "data", "compressors": "compressor", "hardware": "hardware"}


def describe(path: Path) -> tuple[str, str]:
    """The first comment line of a preset/recipe file, and the schema it extends."""
    description, schema = "", ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not description and "@package" not in stripped:
            description = stripped.lstrip("# ").strip()
        if stripped.startswith("- /schema/"):
            schema = stripped.split("/")[3].split("@")[0]
        if stripped.startswith("- override /") and not schema:
            schema = stripped.removeprefix("- override /")
    return description, schema


def list_command(args: list[str]) -> int:
    from effml.cli.compose import presets
    from effml.config import recipe_problem

    if len(args) != 1 or args[0] not in KINDS:
        raise EffmlError(f"effml list needs one of: {', '.join(KINDS)}")
    group = KINDS[args[0]]
    title = {"recipe": "uses"}.get(group, "schema")
    table = Table(title=f"effml {args[0]}", show_lines=False)
    table.add_column(group, style="bold cyan", no_wrap=True)
    table.add_column("description")
    table.add_column(title, style="dim")
    for name, path in presets(group).items():
        problem = recipe_problem(path) if group == "recipe" else None
        description, schema = (f"[red]broken: {problem}[/red]", "") if problem else describe(path)
        table.add_row(name, description, schema)
    Console().print(table)
    return 0


def report_command(args: list[str]) -> int:
    from effml import report

    if not args:
        raise EffmlError("effml report needs a run directory (or a folder of runs), e.g. outputs/magnitude_lenet")
    files = []
    for arg in args:
        path = Path(arg)
        if not path.exists():
            raise EffmlError(f"{path} does not exist")
        files += [path] if path.is_file() else sorted(path.rglob("metrics.json"))
    if not files:
        raise EffmlError(f"no finished runs (metrics.json) under {' '.join(args)}")
    runs = [report.load_metrics(f) for f in files]
    if len(runs) == 1:
        report.print_summary(runs[0])
    else:
        Console().print(report.runs_table(runs))
    return 0
