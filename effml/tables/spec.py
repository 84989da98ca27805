"""The table spec: its dataclasses, where table files live, loading one, and checking its parts agree."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf

from effml.errors import EffmlError, one_line
from effml.tables.claims import claim_problem, load_claim


@dataclass
class Axis:
    """A quantity read from each point: ``key`` (dotted path), shown as value × ``scale``."""

    key: str = MISSING
    label: str = ""
    scale: float = 1.0
    log: bool = False  # plot on a log scale
    reverse: bool = False  # decreasing to the right in the plot, top to bottom in the table
    decimals: int = 2
    # x only: a quantity each run measures itself (its latency), which differs from seed to seed, so
    # a series is one point (mean ± std of x and of y over seeds), not a line over shared x levels
    measured: bool = False


@dataclass
class Series:
    """One line of the figure / column of the table: the recipe plus its own overrides."""

    key: str = MISSING
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    recipe: str | None = None  # default: the table's recipe
    # Runs other series start from (the dense model they load by recipe), run first and not drawn:
    # they contribute no points, so their metrics need not have the table's x or points.
    prerequisite: bool = False
    # Where this series' runs keep their point(s), instead of the table's ``points``: one run measuring
    # several models (Sparse Cocktail's subnetworks), each a series of its own. A mapping is one point.
    points: str | None = None


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
class TableSpec:
    title: str = MISSING
    paper: str = MISSING
    recipe: str = MISSING
    series: list[Series] = MISSING
    y: Axis = MISSING
    x: Axis | None = None
    points: str | None = None
    # More quantities each run measured, shown beside y (a column each, a panel each in the plot):
    # the dropped tokens and the speed beside the loss, say. Tables without x (or with a measured x) only.
    also: list[Axis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)
    reference: Reference | None = None
    paper_numbers: PaperNumbers = field(default_factory=PaperNumbers)
    # The YAML mappings as read; load_spec turns each into the dataclass of its kind (claims.Claim).
    # OmegaConf cannot type a list of several dataclasses, hence Any.
    claims: list[Any] = field(default_factory=list)
    name: str = ""  # the file's stem

    @property
    def levels(self) -> Axis | None:
        """The x that groups points into cells (levels every seed shares: weights remaining, a budget);
        None for tables without x and for a measured x, whose cells are one per series."""
        return self.x if self.x is not None and not self.x.measured else None

    @property
    def measured_x(self) -> Axis | None:
        """A measured x (each run's own latency, say): kept per run like an ``also`` quantity."""
        return self.x if self.x is not None and self.x.measured else None

    @property
    def per_run(self) -> list[Axis]:
        """The quantities aggregated per cell beside y: a measured x first, then ``also``."""
        return ([self.x] if self.measured_x else []) + list(self.also)

    @property
    def shown_series(self) -> list[Series]:
        """The series of the table and plot (prerequisite series run, but are not shown)."""
        return [s for s in self.series if not s.prerequisite]

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
    try:
        data = yaml.safe_load(path.read_text()) or {}
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TableSpec), data))
    except Exception as e:  # YAML syntax, unknown key, wrong type, missing field
        raise EffmlError(f"table {path}: {one_line(e)}") from None
    try:
        spec.claims = [load_claim(raw, i) for i, raw in enumerate(spec.claims)]
    except ValueError as e:  # unknown kind, or a field its kind does not have
        raise EffmlError(f"table {path}: {e}") from None
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
    if spec.levels is None and spec.points:
        return "points: a list of points per run needs an x axis (x.key) that is not measured"
    if spec.also and spec.levels is not None:
        return "also: extra quantities are shown for tables without x (or with a measured x) only"
    if spec.reference and spec.reference.x is not None and spec.levels is None:
        return "reference.x: only a table with x levels (an x that is not measured) has one"
    shown = [s.key for s in spec.shown_series]
    if not shown:
        return "series: needs at least one series that is not a prerequisite"
    if spec.reference and spec.reference.series not in shown:
        return (f"reference.series: unknown series '{spec.reference.series}'; choose from: {', '.join(shown)}"
                + (" (prerequisite series are not drawn)" if spec.reference.series in keys else ""))
    for key in spec.paper_numbers.values:
        if key not in keys:
            return f"paper_numbers.values: unknown series '{key}'; choose from: {', '.join(keys)}"
    for claim in spec.claims:
        problem = claim_problem(claim, spec, keys)
        if problem:
            return f"claim '{claim.name}': {problem}"
    return None
