"""Paper tables: what ``effml reproduce`` reruns, and how its numbers are checked against the paper.

A table spec, ``recipes/tables/<name>.yaml`` (or ``$EFFML_RECIPES/tables/<name>.yaml``)::

    title: Lottery tickets, LeNet-300-100            # one line
    paper: Frankle & Carbin, ICLR 2019, Fig. 3        # the citation
    recipe: lth_lenet                                 # recipe of every series unless it names its own
    seeds: [0, 1, 2]                                  # default seeds (--seeds overrides)
    overrides: []                                     # Hydra overrides applied to every run
    series:                                           # run in this order (a control may need the base)
      - {key: winning_ticket, label: winning ticket, overrides: [], recipe: null}
    points: compressors.imp.levels   # optional: dotted path in metrics.json to a list of points per run;
                                     # absent: the run's metrics.json is its one point
    x: {key: weights_remaining, label: weights remaining (%), scale: 100, log: true, reverse: true}
    y: {key: test_acc, label: test accuracy (%), scale: 100, decimals: 2}
    reference: {series: winning_ticket, x: 100, label: dense}   # the dashed line; claims' default reference
    paper_numbers:
      setting: MNIST, 50k iterations per level        # what the paper ran, when it differs from ours
      values: {winning_ticket: {100: 98.0, 51.3: 98.3}}   # per series: {x: y}, or one number without x
    claims:
      - {name: ..., kind: reaches, series: winning_ticket, max_x: 20, reference_x: 100, tolerance: 0.5}
      - {name: ..., kind: exceeds, series: winning_ticket, than: random_reinit, margin: 1.0, at: lowest_x}

Units: every number a spec holds (paper values, x limits, tolerances, margins) is in the units the
table shows, i.e. the metric times ``scale`` (percent and percentage points for accuracies), so a
spec reads like the paper. ``x`` and ``y`` keys are dotted paths inside a point; a y stored as
``{"dense": .., "compressed": ..}`` counts as its compressed value.

Cells: the points of all seeds of one series are grouped by x (rounded to 4 significant digits, so
float noise in a recomputed fraction never splits a level) and give mean ± sample std (n − 1).

Claims (pure functions of the cells, see ``check_claim``):

- ``reaches``: some cell of ``series`` with ``min_x <= x <= max_x`` has a mean >= the threshold,
  where the threshold comes from the reference cell (``reference`` series at ``reference_x``, by
  default the table's ``reference``): ``reference − tolerance`` and/or ``reference × min_ratio``
  (both given: both must hold); the reference cell itself never counts. "A ticket at <= 20%
  weights reaches the dense accuracy within 0.5 points"; "the student keeps >= 95% of the teacher's".
- ``exceeds``: ``series`` beats ``than`` by >= ``margin`` at the x values both have (within
  ``min_x``/``max_x``), aggregated by ``at``: ``lowest_x`` (default; the sparsest level when x is
  weights remaining), ``highest_x``, ``all`` (the smallest difference counts), ``any`` (the largest
  counts) or ``mean``. "Random reinit at the same sparsity is clearly worse"; "KD beats no KD".
- ``above``: some cell of ``series`` (within the x range) has a mean >= ``value``: "clearly above
  chance" (``value: 20`` for 10 classes).
- ``recovers``: (series − than) / (reference − than) >= ``min_fraction``, at the reference x: "the
  skeptical student recovers most of the gap the nasty teacher opened" (``min_fraction: 0.5``).

Tables without x (one point per run) use the same claims: every series has one cell, x is ignored.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from rich.table import Table
from rich.text import Text

from effml.errors import EffmlError

CLAIM_KINDS = ("reaches", "exceeds", "above", "recovers")
AT_CHOICES = ("lowest_x", "highest_x", "all", "any", "mean")
PAPER_X_MATCH = 0.05  # a paper number sits in our row whose x is within 5% of the paper's x


# --------------------------------------------------------------------------- the spec


@dataclass
class Axis:
    """A quantity read from each point: ``key`` (dotted path), shown as value × ``scale``."""

    key: str = MISSING
    label: str = ""
    scale: float = 1.0
    log: bool = False  # plot on a log scale
    reverse: bool = False  # decreasing to the right in the plot, top to bottom in the table
    decimals: int = 2


@dataclass
class Series:
    """One line of the figure / column of the table: the recipe plus its own overrides."""

    key: str = MISSING
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    recipe: str | None = None  # default: the table's recipe


@dataclass
class Reference:
    """The cell a dashed line marks (the dense network) and claims compare to by default."""

    series: str = MISSING
    x: float | None = None
    label: str = "reference"


@dataclass
class PaperNumbers:
    setting: str = ""  # the paper's setting where it differs from ours (dataset, scale)
    values: dict[str, Any] = field(default_factory=dict)  # series → {x: y} or one y


@dataclass
class Claim:
    """A sentence of the paper as a check; the fields each kind uses are in the module docstring."""

    name: str = MISSING
    kind: str = MISSING  # reaches | exceeds
    series: str = MISSING
    min_x: float | None = None
    max_x: float | None = None
    # reaches
    reference: str | None = None  # default: the table's reference series
    reference_x: float | None = None  # default: the table's reference x
    tolerance: float | None = None
    min_ratio: float | None = None
    # exceeds (and recovers: the low end of the gap)
    than: str | None = None
    margin: float = 0.0
    at: str = "lowest_x"
    # above: a fixed bar (chance level)
    value: float | None = None
    # recovers: (series − than) / (reference − than) >= min_fraction
    min_fraction: float | None = None


@dataclass
class TableSpec:
    title: str = MISSING
    paper: str = MISSING
    recipe: str = MISSING
    series: list[Series] = MISSING
    y: Axis = MISSING
    x: Axis | None = None
    points: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)
    reference: Reference | None = None
    paper_numbers: PaperNumbers = field(default_factory=PaperNumbers)
    claims: list[Claim] = field(default_factory=list)
    name: str = ""  # the file's stem

    def paper_values(self) -> dict[str, dict[float | None, float]]:
        """The published numbers per series as {x: y} (x is None in tables without x)."""
        values = {}
        for key, given in self.paper_numbers.values.items():
            by_x = given if isinstance(given, Mapping) else {None: given}
            values[key] = {None if x is None else float(x): float(y) for x, y in by_x.items()}
        return values


def table_dirs() -> list[Path]:
    """Where tables live: the shipped ``recipes/tables/`` and ``tables/`` in each ``$EFFML_RECIPES``
    directory (the same places, in the same order, as recipes: a later file of a name wins)."""
    from effml.config import recipes_dir

    extra = [Path(p) for p in os.environ.get("EFFML_RECIPES", "").split(os.pathsep) if p]
    return [d / "tables" for d in (recipes_dir(), *extra)]


def table_files() -> dict[str, Path]:
    return {path.stem: path for d in table_dirs() for path in sorted(d.glob("*.yaml"))}


def find_table(name: str) -> TableSpec:
    files = table_files()
    if name not in files:
        raise EffmlError(f"unknown table '{name}'; choose from: {', '.join(files) or '(none)'}")
    return load_spec(files[name])


def load_spec(path: Path) -> TableSpec:
    """Read and type-check a spec; any problem is one line naming the file and the field."""
    from effml.cli.compose import one_line

    try:
        data = yaml.safe_load(path.read_text()) or {}
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TableSpec), data))
    except Exception as e:  # YAML syntax, unknown key, wrong type, missing field
        raise EffmlError(f"table {path}: {one_line(e)}") from None
    spec.name = path.stem
    problem = spec_problem(spec)
    if problem:
        raise EffmlError(f"table {path}: {problem}")
    return spec


def spec_problem(spec: TableSpec) -> str | None:
    """The first inconsistency between the spec's parts (names that do not exist, etc.), or None."""
    keys = [s.key for s in spec.series]
    if not keys:
        return "series: needs at least one series"
    if len(set(keys)) != len(keys):
        return f"series: keys must be unique; got {', '.join(keys)}"
    if not spec.seeds:
        return "seeds: needs at least one seed"
    if spec.x is None and spec.points:
        return "points: a list of points per run needs an x axis (x.key)"
    if spec.reference and spec.reference.series not in keys:
        return f"reference.series: unknown series '{spec.reference.series}'; choose from: {', '.join(keys)}"
    for key in spec.paper_numbers.values:
        if key not in keys:
            return f"paper_numbers.values: unknown series '{key}'; choose from: {', '.join(keys)}"
    for claim in spec.claims:
        problem = claim_problem(claim, spec, keys)
        if problem:
            return f"claim '{claim.name}': {problem}"
    return None


def claim_problem(claim: Claim, spec: TableSpec, keys: list[str]) -> str | None:
    if claim.kind not in CLAIM_KINDS:
        return f"kind must be one of {', '.join(CLAIM_KINDS)}; got {claim.kind!r}"
    named = [claim.series, claim.than, claim.reference]
    for key in (k for k in named if k is not None):
        if key not in keys:
            return f"unknown series '{key}'; choose from: {', '.join(keys)}"
    if claim.kind == "exceeds":
        if claim.than is None:
            return "exceeds needs 'than' (the series it beats)"
        if claim.at not in AT_CHOICES:
            return f"at must be one of {', '.join(AT_CHOICES)}; got {claim.at!r}"
        return None
    if claim.kind == "above":
        return None if claim.value is not None else "above needs a value (the bar, in table units)"
    if claim.kind == "recovers":
        if claim.than is None or claim.min_fraction is None:
            return "recovers needs 'than' (the low end of the gap) and min_fraction"
        if reference_series(claim, spec) is None:
            return "recovers needs a reference series (the high end of the gap)"
        return None
    if claim.tolerance is None and claim.min_ratio is None:
        return "reaches needs a tolerance and/or a min_ratio"
    if reference_series(claim, spec) is None:
        return "reaches needs a reference series (in the claim or the table's reference)"
    if spec.x is not None and reference_x(claim, spec) is None:
        return "reaches needs reference_x (in the claim or the table's reference.x)"
    return None


def reference_series(claim: Claim, spec: TableSpec) -> str | None:
    return claim.reference or (spec.reference.series if spec.reference else None)


def reference_x(claim: Claim, spec: TableSpec) -> float | None:
    if spec.x is None:
        return None
    if claim.reference_x is not None:
        return claim.reference_x
    return spec.reference.x if spec.reference else None


# --------------------------------------------------------------------------- points and cells


@dataclass(frozen=True)
class Point:
    series: str
    seed: int
    x: float | None
    y: float


@dataclass(frozen=True)
class Cell:
    """All seeds of one series at one x: mean ± sample std over n values."""

    series: str
    x: float | None
    mean: float
    std: float
    n: int
    values: tuple[float, ...]


Cells = dict[str, dict[float | None, Cell]]  # series → x → cell


def lookup(obj: Any, dotted: str) -> Any:
    """``obj["a"]["b"]`` for "a.b"; KeyError names the missing part."""
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            raise KeyError(part)
        obj = obj[part]
    return obj


def grouping_x(value: float) -> float:
    """x rounded to 4 significant digits: the same level of different seeds lands in one cell
    even when its fraction is recomputed with float noise, and tiny fractions keep their digits."""
    return float(f"{float(value):.4g}")


def read_points(spec: TableSpec, series: str, seed: int, metrics: Mapping[str, Any]) -> list[Point]:
    """The points one run contributes, in table units; ValueError says what the run lacks."""
    try:
        raw = lookup(metrics, spec.points) if spec.points else [metrics]
    except KeyError:
        raise ValueError(f"metrics.json has no '{spec.points}'") from None
    if not isinstance(raw, list):
        raise ValueError(f"'{spec.points}' in metrics.json is not a list")
    points = []
    for item in raw:
        try:
            y = lookup(item, spec.y.key)
            x = lookup(item, spec.x.key) if spec.x else None
        except KeyError as e:
            raise ValueError(f"a point in metrics.json has no '{e.args[0]}'") from None
        if isinstance(y, Mapping):  # {"dense": .., "compressed": ..}: the compressed model's value
            y = y.get("compressed")
        if y is None or (spec.x and x is None):  # e.g. IMP level 0 has no hamming distance: no point
            continue
        if spec.x:
            x = round(grouping_x(x) * spec.x.scale, 9)  # 0.512 × 100 is 51.2, not 51.200000000000003
        points.append(Point(series, seed, x, float(y) * spec.y.scale))
    return points


def aggregate(points: Iterable[Point]) -> Cells:
    groups: dict[str, dict[float | None, list[float]]] = {}
    for p in points:
        groups.setdefault(p.series, {}).setdefault(p.x, []).append(p.y)
    return {
        series: {x: make_cell(series, x, ys) for x, ys in by_x.items()}
        for series, by_x in groups.items()
    }


def make_cell(series: str, x: float | None, values: list[float]) -> Cell:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(series, x, statistics.fmean(values), std, len(values), tuple(values))


def find_cell(cells: Cells, series: str, x: float | None) -> Cell | None:
    by_x = cells.get(series, {})
    if x is None:
        return by_x.get(None)
    return next((c for cx, c in by_x.items() if cx is not None and math.isclose(cx, x, rel_tol=1e-6)), None)


def x_order(x: float | None) -> float:
    """Sort key for x values; None (tables without x) first."""
    return -math.inf if x is None else x


def in_range(cells: Cells, series: str, min_x: float | None, max_x: float | None) -> list[Cell]:
    """The series' cells with min_x <= x <= max_x (every cell in tables without x), by x."""
    def inside(x: float | None) -> bool:
        return x is None or ((min_x is None or x >= min_x - 1e-9) and (max_x is None or x <= max_x + 1e-9))

    chosen = [c for x, c in cells.get(series, {}).items() if inside(x)]
    return sorted(chosen, key=lambda c: x_order(c.x))


# --------------------------------------------------------------------------- claims


@dataclass
class ClaimResult:
    name: str
    kind: str
    passed: bool
    ours: float | None  # the number that decided it (a mean, or a difference of means)
    threshold: float | None  # what it had to reach
    detail: str  # the numbers behind the verdict, in one sentence


def check_claims(spec: TableSpec, cells: Cells) -> list[ClaimResult]:
    return [check_claim(claim, spec, cells) for claim in spec.claims]


def check_claim(claim: Claim, spec: TableSpec, cells: Cells) -> ClaimResult:
    check = {"reaches": check_reaches, "exceeds": check_exceeds, "above": check_above, "recovers": check_recovers}
    return check[claim.kind](claim, spec, cells)


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _at(cell: Cell) -> str:
    return "" if cell.x is None else f" at x={cell.x:g}"


def check_reaches(claim: Claim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when some cell of the series (within the x range) reaches the reference's threshold."""
    d = spec.y.decimals
    ref_series, ref_x = reference_series(claim, spec), reference_x(claim, spec)
    ref = find_cell(cells, ref_series, ref_x)
    if ref is None:
        where = "" if ref_x is None else f" at x={ref_x:g}"
        detail = f"no result for reference {ref_series}{where}"
        return ClaimResult(claim.name, claim.kind, False, None, None, detail)
    bounds = []
    if claim.tolerance is not None:
        bounds.append((ref.mean - claim.tolerance, f"{_fmt(ref.mean, d)} − {claim.tolerance:g}"))
    if claim.min_ratio is not None:
        bounds.append((ref.mean * claim.min_ratio, f"{claim.min_ratio:g} × {_fmt(ref.mean, d)}"))
    threshold, how = max(bounds)
    candidates = [c for c in in_range(cells, claim.series, claim.min_x, claim.max_x) if c is not ref]
    if not candidates:
        return ClaimResult(claim.name, claim.kind, False, None, threshold,
                           f"no result for {claim.series}{_range(claim)}")
    best = max(candidates, key=lambda c: c.mean)
    reached = [c for c in candidates if c.mean >= threshold]
    if reached and spec.x is not None:
        verdict = "reached at x = " + ", ".join(f"{c.x:g}" for c in reached)
    else:
        verdict = "reached" if reached else "not reached"
    detail = (f"{claim.series} best {_fmt(best.mean, d)}{_at(best)}; needs >= {_fmt(threshold, d)} "
              f"(= {how}, reference {ref_series}{_at(ref)}); {verdict}")
    return ClaimResult(claim.name, claim.kind, bool(reached), best.mean, threshold, detail)


def _range(claim: Claim) -> str:
    parts = [f"x >= {claim.min_x:g}"] if claim.min_x is not None else []
    parts += [f"x <= {claim.max_x:g}"] if claim.max_x is not None else []
    return f" with {' and '.join(parts)}" if parts else ""


def check_exceeds(claim: Claim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when series − than >= margin, at the common x values picked by ``at``."""
    d = spec.y.decimals
    ours = {c.x: c for c in in_range(cells, claim.series, claim.min_x, claim.max_x)}
    theirs = {c.x: c for c in in_range(cells, claim.than, claim.min_x, claim.max_x)}
    common = sorted((x for x in ours if x in theirs), key=x_order)
    if not common:
        return ClaimResult(claim.name, claim.kind, False, None, claim.margin,
                           f"no x where both {claim.series} and {claim.than} have results{_range(claim)}")
    diffs = {x: ours[x].mean - theirs[x].mean for x in common}
    chosen = {
        "lowest_x": lambda: (diffs[common[0]], [common[0]]),
        "highest_x": lambda: (diffs[common[-1]], [common[-1]]),
        "all": lambda: (min(diffs.values()), [min(diffs, key=diffs.get)]),
        "any": lambda: (max(diffs.values()), [max(diffs, key=diffs.get)]),
        "mean": lambda: (statistics.fmean(diffs.values()), common),
    }[claim.at]
    value, xs = chosen()
    shown = "; ".join(
        f"{'' if x is None else f'x={x:g}: '}{_fmt(ours[x].mean, d)} − {_fmt(theirs[x].mean, d)}"
        f" = {diffs[x]:+.{d}f}"
        for x in xs
    )
    detail = f"{claim.series} − {claim.than}{'' if spec.x is None else f' ({claim.at})'}: {shown}"
    if claim.at == "mean" and len(xs) > 1:
        detail += f"; mean {value:+.{d}f}"
    detail += f"; needs >= {claim.margin:+g}"
    return ClaimResult(claim.name, claim.kind, value >= claim.margin, value, claim.margin, detail)


def check_above(claim: Claim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when the series' best cell (within the x range) has a mean >= ``value``."""
    d = spec.y.decimals
    candidates = in_range(cells, claim.series, claim.min_x, claim.max_x)
    if not candidates:
        return ClaimResult(claim.name, claim.kind, False, None, claim.value,
                           f"no result for {claim.series}{_range(claim)}")
    best = max(candidates, key=lambda c: c.mean)
    detail = f"{claim.series} best {_fmt(best.mean, d)}{_at(best)}; needs >= {claim.value:g}"
    return ClaimResult(claim.name, claim.kind, best.mean >= claim.value, best.mean, claim.value, detail)


def check_recovers(claim: Claim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when the series closes >= ``min_fraction`` of the gap from ``than`` up to the reference
    (tables without x: "a skeptical student recovers most of what the nasty teacher took")."""
    d = spec.y.decimals
    high_series = reference_series(claim, spec)
    found = {k: find_cell(cells, k, None if spec.x is None else reference_x(claim, spec))
             for k in (claim.series, claim.than, high_series)}
    missing = [k for k, cell in found.items() if cell is None]
    if missing:
        return ClaimResult(claim.name, claim.kind, False, None, claim.min_fraction, f"no result for {missing[0]}")
    ours, low, high = (found[k].mean for k in (claim.series, claim.than, high_series))
    gap = high - low
    if gap <= 0:
        return ClaimResult(claim.name, claim.kind, False, None, claim.min_fraction,
                           f"no gap to recover: {high_series} {_fmt(high, d)} <= {claim.than} {_fmt(low, d)}")
    fraction = (ours - low) / gap
    detail = (f"({claim.series} {_fmt(ours, d)} − {claim.than} {_fmt(low, d)}) / ({high_series} {_fmt(high, d)} − "
              f"{claim.than} {_fmt(low, d)}) = {fraction:.2f}; needs >= {claim.min_fraction:g}")
    return ClaimResult(claim.name, claim.kind, fraction >= claim.min_fraction, fraction, claim.min_fraction, detail)


# --------------------------------------------------------------------------- rows and paper numbers


def row_xs(spec: TableSpec, cells: Cells) -> list[float | None]:
    """The table's rows: every x we measured, plus the paper's x values that match none of ours."""
    if spec.x is None:
        return [None]
    ours = {x for by_x in cells.values() for x in by_x if x is not None}
    paper = spec.paper_values().values()
    theirs = {x for by_x in paper for x in by_x if x is not None and match_x(x, ours) is None}
    return sorted(ours | theirs, reverse=spec.x.reverse)


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
            row = None if x is None or spec.x is None else match_x(x, xs)
            placed.setdefault(series, {})[row] = y
    return placed


# --------------------------------------------------------------------------- renders


@dataclass
class Missing:
    """A run (or a cell) that should have a result and has none."""

    series: str
    seed: int | None
    reason: str

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


def run_device(metrics: Mapping[str, Any]) -> str:
    """'NVIDIA H100 80GB HBM3, bf16-mixed, torch 2.11.0' from a run's metrics.json."""
    speed, kernels = metrics.get("speed") or {}, metrics.get("kernels") or {}
    parts = [speed.get("device_name") or metrics.get("device") or "unknown device", kernels.get("precision")]
    torch_version = (metrics.get("versions") or {}).get("torch")
    parts.append(f"torch {torch_version}" if torch_version else None)
    return ", ".join(p for p in parts if p)


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


def cell_text(cell: Cell | None, decimals: int) -> str:
    if cell is None:
        return "—"
    spread = f" ± {cell.std:.{decimals}f}" if cell.n > 1 else ""
    return f"{cell.mean:.{decimals}f}{spread} ({cell.n})"


def grid(outcome: Outcome) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Rich and the Markdown table.

    With an x axis: a row per x, a column per series (ours, and the paper's beside it where given).
    Without: a row per series.
    """
    xs = row_xs(outcome.spec, outcome.cells)
    paper = paper_by_row(outcome.spec, xs)
    if outcome.spec.x is None:
        return _grid_by_series(outcome, paper)
    return _grid_by_x(outcome, xs, paper)


def _grid_by_series(outcome: Outcome, paper: dict[str, dict[float | None, float]]):
    spec, d = outcome.spec, outcome.spec.y.decimals
    header = ["series", f"ours: {spec.y.label or spec.y.key} (n)"] + (["paper"] if paper else [])
    rows = []
    for s in spec.series:
        row = [s.label or s.key, series_cell_text(outcome, s.key, None)]
        if paper:
            row.append(_paper_text(paper.get(s.key, {}).get(None), d))
        rows.append(row)
    return header, rows


def _grid_by_x(outcome: Outcome, xs: list[float], paper: dict[str, dict[float | None, float]]):
    spec, d = outcome.spec, outcome.spec.y.decimals
    header = [spec.x.label or spec.x.key]
    for s in spec.series:
        header.append(s.label or s.key)
        if s.key in paper:
            header.append("paper")
    rows = []
    for x in xs:
        row = [f"{x:g}"]
        for s in spec.series:
            row.append(series_cell_text(outcome, s.key, x))
            if s.key in paper:
                row.append(_paper_text(paper[s.key].get(x), d))
        rows.append(row)
    return header, rows


def series_cell_text(outcome: Outcome, series: str, x: float | None) -> str:
    if series not in outcome.cells:
        return "failed" if any(m.series == series for m in outcome.missing) else "—"
    return cell_text(find_cell(outcome.cells, series, x), outcome.spec.y.decimals)


def _paper_text(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{value:.{decimals}f}"


def rich_table(outcome: Outcome) -> Table:
    spec = outcome.spec
    header, rows = grid(outcome)
    caption = f"{spec.paper}; ours: mean ± std over seeds {_seeds(outcome.seeds)} (n runs)"
    table = Table(title=Text.assemble(spec.title, "\n", (caption, "dim")))
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 and spec.x is None else "right",
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
        lines.append(f"The paper's numbers: {spec.paper_numbers.setting}.")
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
    """series,x,mean,std,n,paper: one line per (series, x) with ours and/or the paper's number."""
    spec, cells = outcome.spec, outcome.cells
    rows = row_xs(spec, cells)
    paper = paper_by_row(spec, rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["series", "x", "mean", "std", "n", "paper"])
    for s in spec.series:
        for x in rows:
            cell = find_cell(cells, s.key, x)
            published = paper.get(s.key, {}).get(x)
            if cell is None and published is None:
                continue
            writer.writerow([s.key, "" if x is None else f"{x:g}",
                             *(("", "", 0) if cell is None else (_csv(cell.mean), _csv(cell.std), cell.n)),
                             "" if published is None else _csv(published)])
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
        "passed": outcome.passed,
        "claims": [asdict(c) for c in outcome.claims],
        "missing": [asdict(m) for m in outcome.missing],
        "cells": [
            {"series": c.series, "x": c.x, "mean": c.mean, "std": c.std, "n": c.n, "values": list(c.values)}
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


# --------------------------------------------------------------------------- the figure


def plot(outcome: Outcome, path: Path) -> None:
    """y vs x, one line per series with a ±std band (like Frankle & Carbin's Fig. 3), or a bar per
    series for tables without x; the paper's numbers as hollow markers, the reference dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = outcome.spec
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg backend, without pyplot's global state
    axes = figure.add_subplot()
    if spec.x is None:
        _bars(axes, outcome)
    else:
        _lines(axes, outcome)
    reference = spec.reference and find_cell(outcome.cells, spec.reference.series, spec.reference.x)
    if reference:
        axes.axhline(reference.mean, color="black", linestyle="--", linewidth=1,
                     label=f"{spec.reference.label} (ours, {reference.mean:.{spec.y.decimals}f})")
    axes.set_ylabel(spec.y.label or spec.y.key)
    axes.set_title(f"{spec.title}\n{spec.paper}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.savefig(path, dpi=150)


def _lines(axes, outcome: Outcome) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    spec = outcome.spec
    paper = spec.paper_values()
    our_x, paper_x = set(), set()
    for i, s in enumerate(spec.series):
        color = f"C{i}"
        cells = sorted(outcome.cells.get(s.key, {}).values(), key=lambda c: c.x)
        if cells:
            xs, means = [c.x for c in cells], [c.mean for c in cells]
            stds = [c.std for c in cells]
            axes.errorbar(xs, means, yerr=stds, color=color, marker="o", markersize=4, capsize=3,
                          label=f"{s.label or s.key} (ours)")
            low = [m - d for m, d in zip(means, stds, strict=True)]
            high = [m + d for m, d in zip(means, stds, strict=True)]
            axes.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
            our_x.update(xs)
        published = sorted(paper.get(s.key, {}).items())
        if published:
            axes.plot([x for x, _ in published], [y for _, y in published], color=color, marker="s",
                      markerfacecolor="none", linestyle=":", linewidth=1, label=f"{s.label or s.key} (paper)")
            paper_x.update(x for x, _ in published)
    if spec.x.log:
        axes.set_xscale("log")
    if spec.x.reverse:
        axes.invert_xaxis()
    if our_x or paper_x:
        axes.xaxis.set_major_locator(FixedLocator(pick_ticks(list(our_x), list(paper_x), log=spec.x.log)))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_major_formatter(lambda value, _: f"{value:.3g}")
    axes.set_xlabel(spec.x.label or spec.x.key)


def pick_ticks(ours: list[float], paper: list[float], log: bool, min_gap: float = 0.06) -> list[float]:
    """x ticks that do not crowd each other (gap as a fraction of the axis span), chosen by priority:
    our first and last x (the dense level, the sparsest), our other x values, then the paper's."""
    every = sorted(set(ours) | set(paper))
    if len(every) < 2:
        return every
    position = math.log if log and every[0] > 0 else float
    span = (position(every[-1]) - position(every[0])) or 1.0
    ours = sorted(set(ours))
    priority = ours[-1:] + ours[:1] + ours[1:-1][::-1] + sorted(set(paper) - set(ours), reverse=True)
    kept: list[float] = []
    for x in priority:
        if all(abs(position(x) - position(k)) / span >= min_gap for k in kept):
            kept.append(x)
    return sorted(kept)


def _bars(axes, outcome: Outcome) -> None:
    spec = outcome.spec
    paper = spec.paper_values()
    labels = [s.label or s.key for s in spec.series]
    cells = [find_cell(outcome.cells, s.key, None) for s in spec.series]
    positions = range(len(spec.series))
    axes.bar(positions, [c.mean if c else 0 for c in cells], yerr=[c.std if c else 0 for c in cells],
             color=[f"C{i}" for i in positions], capsize=4, alpha=0.85, label="ours (mean ± std)")
    published = [(i, paper[s.key][None]) for i, s in enumerate(spec.series) if None in paper.get(s.key, {})]
    if published:
        axes.plot([i for i, _ in published], [y for _, y in published], "ks", markerfacecolor="none",
                  linestyle="none", label="paper")
    lows = [c.mean - c.std for c in cells if c] + [y for _, y in published]
    if lows:  # accuracies near 90% should not all look equal: start the axis below the lowest value
        top = max([c.mean + c.std for c in cells if c] + [y for _, y in published])
        low = min(lows)
        axes.set_ylim(max(0.0, low - 0.2 * (top - low) - 1e-9), top + 0.1 * (top - low) + 1e-9)
    width = min(28, max(10, 70 // len(labels)))  # characters a bar's slot holds on the 10-inch figure
    axes.set_xticks(list(positions), [textwrap.fill(label, width) for label in labels])
