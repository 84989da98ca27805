"""Points and cells: what each run contributes (read from its metrics.json), and the mean ± std of
all seeds of one series at one x."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from effml.tables.spec import TableSpec


@dataclass(frozen=True)
class Point:
    series: str
    seed: int
    x: float | None
    y: float
    also: tuple[tuple[str, float], ...] = ()  # (key, value) of the spec's ``also`` quantities this run has


@dataclass(frozen=True)
class Cell:
    """All seeds of one series at one x: mean ± sample std over n values."""

    series: str
    x: float | None
    mean: float
    std: float
    n: int
    values: tuple[float, ...]
    also: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # key → (mean, std, n)


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
    where = next((s.points for s in spec.series if s.key == series and s.points), None) or spec.points
    try:
        raw = lookup(metrics, where) if where else [metrics]
    except KeyError:
        raise ValueError(f"metrics.json has no '{where}'") from None
    if isinstance(raw, Mapping):  # a series' own path may name one point
        raw = [raw]
    if not isinstance(raw, list):
        raise ValueError(f"'{where}' in metrics.json is not a list")
    points = []
    for item in raw:
        try:
            y = lookup(item, spec.y.key)
            x = lookup(item, spec.x.key) if spec.x else None
        except KeyError as e:
            raise ValueError(f"a point in metrics.json has no '{e.args[0]}'") from None
        if isinstance(y, Mapping):  # {"dense": .., "compressed": ..}: the compressed model's value
            y = y.get("compressed")
        if isinstance(x, Mapping):
            x = x.get("compressed")
        if y is None or (spec.x and x is None):  # e.g. IMP level 0 has no hamming distance: no point
            continue
        if spec.levels:
            x = round(grouping_x(x) * spec.x.scale, 9)  # 0.512 × 100 is 51.2, not 51.200000000000003
        else:  # no x, or a measured one: kept with the also quantities (per_run), the cell is the series'
            x = None
        points.append(Point(series, seed, x, float(y) * spec.y.scale, also_values(spec, item)))
    return points


def also_values(spec: TableSpec, item: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """The ``per_run`` quantities of one run (a measured x, ``also``), in table units; one the run did
    not measure is left out."""
    found = []
    for axis in spec.per_run:
        try:
            value = lookup(item, axis.key)
        except KeyError:
            continue
        if isinstance(value, Mapping):
            value = value.get("compressed")
        if value is not None:
            found.append((axis.key, float(value) * axis.scale))
    return tuple(found)


def run_device(metrics: Mapping[str, Any]) -> str:
    """'NVIDIA H100 80GB HBM3, bf16-mixed, torch 2.11.0' from a run's metrics.json."""
    speed, kernels = metrics.get("speed") or {}, metrics.get("kernels") or {}
    parts = [speed.get("device_name") or metrics.get("device") or "unknown device", kernels.get("precision")]
    torch_version = (metrics.get("versions") or {}).get("torch")
    parts.append(f"torch {torch_version}" if torch_version else None)
    return ", ".join(p for p in parts if p)


def aggregate(points: Iterable[Point]) -> Cells:
    groups: dict[str, dict[float | None, list[Point]]] = {}
    for p in points:
        groups.setdefault(p.series, {}).setdefault(p.x, []).append(p)
    return {
        series: {x: make_cell(series, x, [p.y for p in ps], _also(ps)) for x, ps in by_x.items()}
        for series, by_x in groups.items()
    }


def _also(points: list[Point]) -> dict[str, tuple[float, float, int]]:
    by_key: dict[str, list[float]] = {}
    for p in points:
        for key, value in p.also:
            by_key.setdefault(key, []).append(value)
    return {key: _mean_std(values) + (len(values),) for key, values in by_key.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def make_cell(series: str, x: float | None, values: list[float],
              also: dict[str, tuple[float, float, int]] | None = None) -> Cell:
    mean, std = _mean_std(values)
    return Cell(series, x, mean, std, len(values), tuple(values), also or {})


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
