"""What a table shows: its rows (ours and the paper's numbers placed beside them), the outcome of a
reproduction (cells, claims, what is missing), and its Rich, Markdown, CSV and JSON renders."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from effml.tables.cells import Cell, Cells, find_cell
from effml.tables.claims import ClaimResult
from effml.tables.plot import plot
from effml.tables.spec import TableSpec

PAPER_X_MATCH = 0.05  # a paper number sits in our row whose x is within 5% of the paper's x


# --------------------------------------------------------------------------- rows and paper numbers


def row_xs(spec: TableSpec, cells: Cells) -> list[float | None]:
    """The table's rows: every x we measured, plus the paper's x values that match none of ours."""
    if spec.levels is None:
        return [None]
    ours = {x for by_x in cells.values() for x in by_x if x is not None}
    paper = spec.paper_values().values()
    theirs = {x for by_x in paper for x in by_x if x is not None and match_x(x, ours) is None}
    return sorted(ours | theirs, reverse=spec.levels.reverse)


def match_x(x: float, candidates: Iterable[float]) -> float | None:
    """Our x nearest to the paper's x, if within PAPER_X_MATCH (the paper's 51.3% is our 51.2%)."""
    near = [c for c in candidates if abs(c - x) <= PAPER_X_MATCH * max(abs(x), 1e-12)]
    return min(near, key=lambda c: abs(c - x)) if near else None


def paper_by_row(spec: TableSpec, rows: list[float | None]) -> dict[str, dict[float | None, float]]:
    """The paper's numbers placed in our rows (x matched as in ``match_x``)."""
    placed: dict[str, dict[float | None, float]] = {}
    xs = [x for x in rows if x is not None]
    for series, by_x in spec.paper_values().items():
        for x, y in by_x.items():
            row = None if x is None or spec.levels is None else match_x(x, xs)
            placed.setdefault(series, {})[row] = y
    return placed


# --------------------------------------------------------------------------- the outcome


@dataclass
class Missing:
    """A run (or a cell) that should have a result and has none."""

    series: str
    seed: int | None
    reason: str
    state: str = "failed"  # "not run", "running" or "failed" (also: a result that cannot be read)

    @property
    def text(self) -> str:
        return f"{self.series}{'' if self.seed is None else f' seed {self.seed}'}: {self.reason}"


@dataclass
class Outcome:
    """Everything a table shows: cells, claims, what is missing, and how it was made."""

    spec: TableSpec
    cells: Cells
    claims: list[ClaimResult]
    missing: list[Missing]
    seeds: list[int]
    command: str
    devices: list[str] = field(default_factory=list)  # where the runs trained, with library versions

    @property
    def passed(self) -> bool:
        return not self.missing and all(c.passed for c in self.claims)


def incomplete_cells(cells: Cells, seeds_with_results: Mapping[str, int]) -> list[Missing]:
    """Cells with fewer values than the series has seeds with results: some seed lacks that x."""
    found = []
    for series, by_x in cells.items():
        expected = seeds_with_results.get(series, 0)
        for x, cell in by_x.items():
            if cell.n < expected:
                where = "" if x is None else f"x={x:g}: "
                found.append(Missing(series, None, f"{where}{cell.n} of {expected} seeds have this point"))
    return found


# --------------------------------------------------------------------------- renders


def cell_text(cell: Cell | None, decimals: int) -> str:
    if cell is None:
        return "—"
    spread = f" ± {cell.std:.{decimals}f}" if cell.n > 1 else ""
    return f"{cell.mean:.{decimals}f}{spread} ({cell.n})"


def grid(outcome: Outcome) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Rich and the Markdown table.

    With x levels: a row per x, a column per series (ours, and the paper's beside it where given).
    Without (or with a measured x, a column then): a row per series.
    """
    xs = row_xs(outcome.spec, outcome.cells)
    paper = paper_by_row(outcome.spec, xs)
    if outcome.spec.levels is None:
        return _grid_by_series(outcome, paper)
    return _grid_by_x(outcome, xs, paper)


def _grid_by_series(outcome: Outcome, paper: dict[str, dict[float | None, float]]):
    spec, d = outcome.spec, outcome.spec.y.decimals
    header = ["series", f"ours: {spec.y.label or spec.y.key} (n)"] + (["paper"] if paper else [])
    header += [f"ours: {axis.label or axis.key}" if axis is spec.x else axis.label or axis.key for axis in spec.per_run]
    rows = []
    for s in spec.shown_series:
        row = [s.label or s.key, series_cell_text(outcome, s.key, None)]
        if paper:
            row.append(_paper_text(paper.get(s.key, {}).get(None), d))
        cell = find_cell(outcome.cells, s.key, None)
        row += [_also_text(cell, axis) for axis in spec.per_run]
        rows.append(row)
    return header, rows


def _also_text(cell: Cell | None, axis) -> str:
    if cell is None or axis.key not in cell.also:
        return "—"
    mean, std, n = cell.also[axis.key]
    return f"{mean:.{axis.decimals}f}" + (f" ± {std:.{axis.decimals}f}" if n > 1 else "")


def _grid_by_x(outcome: Outcome, xs: list[float], paper: dict[str, dict[float | None, float]]):
    spec, d = outcome.spec, outcome.spec.y.decimals
    header = [spec.x.label or spec.x.key]
    for s in spec.shown_series:
        header.append(s.label or s.key)
        if s.key in paper:
            header.append("paper")
    rows = []
    for x in xs:
        row = [f"{x:g}"]
        for s in spec.shown_series:
            row.append(series_cell_text(outcome, s.key, x))
            if s.key in paper:
                row.append(_paper_text(paper[s.key].get(x), d))
        rows.append(row)
    return header, rows


def series_cell_text(outcome: Outcome, series: str, x: float | None) -> str:
    if series not in outcome.cells:
        states = {m.state for m in outcome.missing if m.series == series}
        return next((state for state in ("failed", "running", "not run") if state in states), "—")
    return cell_text(find_cell(outcome.cells, series, x), outcome.spec.y.decimals)


def _paper_text(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{value:.{decimals}f}"


def rich_table(outcome: Outcome) -> Table:
    spec = outcome.spec
    header, rows = grid(outcome)
    caption = f"{spec.paper}; ours: mean ± std over seeds {_seeds(outcome.seeds)} (n runs)"
    table = Table(title=Text.assemble(spec.title, "\n", (caption, "dim")))
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 and spec.levels is None else "right",
                         style="dim" if column == "paper" else None)
    for row in rows:
        table.add_row(*(Text(cell, style="red" if cell == "failed" else "") for cell in row))
    return table


def claim_lines(outcome: Outcome) -> list[Text]:
    """PASS/FAIL and the claim, then the numbers that decided it, indented."""
    lines = []
    for c in outcome.claims:
        verdict = ("PASS", "bold green") if c.passed else ("FAIL", "bold red")
        lines.append(Text.assemble(verdict, " ", (c.name, "bold"), "\n     ", (c.detail, "dim")))
    return lines


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def markdown(outcome: Outcome) -> str:
    spec = outcome.spec
    header, rows = grid(outcome)
    lines = [f"# {spec.title}", "", f"Paper: {spec.paper}."]
    if spec.paper_numbers.setting:
        lines.append(f"The paper's numbers: {spec.paper_numbers.setting.rstrip().rstrip('.')}.")
    lines += [
        "",
        f"Ours: mean ± std over seeds {_seeds(outcome.seeds)} (n = runs with a result), "
        f"{spec.y.label or spec.y.key}. Command: `{outcome.command}`",
        *([f"Trained on: {'; '.join(outcome.devices)}."] if outcome.devices else []),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":--" if i == 0 else "--:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if outcome.claims:
        lines += ["", "## Claims", ""]
        lines += [f"- **{'PASS' if c.passed else 'FAIL'}** {c.name}: {c.detail}" for c in outcome.claims]
    if outcome.missing:
        lines += ["", "## Missing", ""]
        lines += [f"- {m.text}" for m in outcome.missing]
    return "\n".join(lines) + "\n"


def long_csv(outcome: Outcome) -> str:
    """series,x,mean,std,n,paper: one line per (series, x) with ours and/or the paper's number; with a
    measured x, x is its mean over the seeds and x_std its std (the last column)."""
    spec, cells = outcome.spec, outcome.cells
    rows = row_xs(spec, cells)
    paper = paper_by_row(spec, rows)
    measured = spec.measured_x
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["series", "x", "mean", "std", "n", "paper"] + (["x_std"] if measured else []))
    for s in spec.shown_series:
        for x in rows:
            cell = find_cell(cells, s.key, x)
            published = paper.get(s.key, {}).get(x)
            if cell is None and published is None:
                continue
            x_mean, x_std = (cell.also[measured.key][:2] if measured and cell and measured.key in cell.also
                             else (x, None))
            writer.writerow([s.key, "" if x_mean is None else _csv(x_mean) if measured else f"{x_mean:g}",
                             *(("", "", 0) if cell is None else (_csv(cell.mean), _csv(cell.std), cell.n)),
                             "" if published is None else _csv(published),
                             *([("" if x_std is None else _csv(x_std))] if measured else [])])
    return out.getvalue()


def _csv(value: float) -> str:
    return f"{value:.6g}"  # metrics.json holds 6 significant digits; more would be float noise


def summary(outcome: Outcome) -> dict[str, Any]:
    spec = outcome.spec
    return {
        "table": spec.name,
        "title": spec.title,
        "paper": spec.paper,
        "command": outcome.command,
        "devices": outcome.devices,
        "seeds": outcome.seeds,
        "x": None if spec.x is None else asdict(spec.x),
        "y": asdict(spec.y),
        "also": [asdict(axis) for axis in spec.also],
        "passed": outcome.passed,
        "claims": [asdict(c) for c in outcome.claims],
        "missing": [asdict(m) for m in outcome.missing],
        "cells": [
            {"series": c.series, "x": c.x, "mean": c.mean, "std": c.std, "n": c.n, "values": list(c.values),
             **({"also": {k: dict(zip(("mean", "std", "n"), v, strict=True)) for k, v in c.also.items()}}
                if c.also else {})}
            for by_x in outcome.cells.values() for c in by_x.values()
        ],
    }


def write_outputs(outcome: Outcome, folder: Path) -> dict[str, Path]:
    """table.md, table.csv, summary.json (claims inside) and <name>.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": folder / "table.md",
        "csv": folder / "table.csv",
        "summary": folder / "summary.json",
        "plot": folder / f"{outcome.spec.name}.png",
    }
    files["markdown"].write_text(markdown(outcome))
    files["csv"].write_text(long_csv(outcome))
    files["summary"].write_text(json.dumps(summary(outcome), indent=2) + "\n")
    plot(outcome, files["plot"])
    return files
