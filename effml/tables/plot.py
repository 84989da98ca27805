"""The figure of a table, drawn with matplotlib's Agg backend (no pyplot state)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from effml.tables.cells import find_cell

if TYPE_CHECKING:
    from effml.tables.cells import Cell
    from effml.tables.render import Outcome
    from effml.tables.spec import Axis


def plot(outcome: Outcome, path: Path):
    """y vs x, one line per series with a ±std band (like Frankle & Carbin's Fig. 3), a bar per series
    for tables without x, or one marker per series with error bars in x and y for a measured x (accuracy
    against each run's latency); the paper's numbers as hollow markers, the reference dashed.
    Returns the matplotlib Figure (saved to ``path``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = outcome.spec
    width = 7 + 3.5 * len(spec.also) + (3 if spec.measured_x else 0)  # the scatter's legend sits outside
    figure = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg backend, without pyplot's global state
    axes, *extra = figure.subplots(1, 1 + len(spec.also), squeeze=False, width_ratios=[2] + [1] * len(spec.also))[0]
    for panel, axis in zip(extra, spec.also, strict=True):
        _also_bars(panel, outcome, axis)
    if spec.measured_x:
        _scatter(axes, outcome)
    elif spec.x is None:
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
    if spec.measured_x:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        axes.legend(fontsize=7)
    figure.savefig(path, dpi=150)
    return figure


@dataclass(frozen=True)
class Marker:
    """One series of a measured-x plot: mean ± std over its seeds of x and of y."""

    series: str
    label: str
    x: float
    x_std: float
    y: float
    y_std: float
    n: int
    reference: bool  # the table's reference (the dense model): drawn highlighted


def scatter_markers(outcome: Outcome) -> list[Marker]:
    """What a measured-x plot draws, one marker per shown series that has a result, in spec order."""
    spec, axis = outcome.spec, outcome.spec.measured_x
    reference = spec.reference.series if spec.reference else None
    markers = []
    for s in spec.shown_series:
        cell = find_cell(outcome.cells, s.key, None)
        if cell is None or axis.key not in cell.also:
            continue
        x, x_std, _ = cell.also[axis.key]
        markers.append(Marker(s.key, s.label or s.key, x, x_std, cell.mean, cell.std, cell.n, s.key == reference))
    return markers


SHAPES = "os^Dv<>pPXh"  # 11 shapes cycled against 10 colours: no two of the first 110 series look alike


def _scatter(axes, outcome: Outcome) -> None:
    """A marker per series at (mean x, mean y) with ±std bars both ways; the reference a black star."""
    axis = outcome.spec.measured_x
    index = {s.key: i for i, s in enumerate(outcome.spec.shown_series)}  # a series keeps its look
    for m in scatter_markers(outcome):
        i = index[m.series]
        style = ({"color": "black", "marker": "*", "markersize": 14, "zorder": 3} if m.reference
                 else {"color": f"C{i % 10}", "marker": SHAPES[i % len(SHAPES)], "markersize": 7})
        axes.errorbar(m.x, m.y, xerr=m.x_std, yerr=m.y_std, linestyle="none", capsize=3,
                      label=f"{m.label} (n={m.n})", **style)
        if m.reference:
            axes.axvline(m.x, color="black", linestyle=":", linewidth=1)
    if axis.log:
        axes.set_xscale("log")
    if axis.reverse:
        axes.invert_xaxis()
    axes.set_xlabel(f"{axis.label or axis.key} (mean ± std over seeds)")


def _lines(axes, outcome: Outcome) -> None:
    spec = outcome.spec
    paper = spec.paper_values()
    our_x, paper_x = set(), set()
    for i, s in enumerate(spec.shown_series):
        label = s.label or s.key
        our_x.update(_our_line(axes, f"C{i}", label, outcome.cells.get(s.key, {})))
        paper_x.update(_paper_line(axes, f"C{i}", label, paper.get(s.key, {})))
    _x_axis(axes, spec.x, our_x, paper_x)


def _our_line(axes, color: str, label: str, cells_by_x: dict[float | None, Cell]) -> list[float]:
    """Means with error bars and a ±std band; the x values drawn."""
    cells = sorted(cells_by_x.values(), key=lambda c: c.x)
    if not cells:
        return []
    xs, means = [c.x for c in cells], [c.mean for c in cells]
    stds = [c.std for c in cells]
    axes.errorbar(xs, means, yerr=stds, color=color, marker="o", markersize=4, capsize=3, label=f"{label} (ours)")
    low = [m - d for m, d in zip(means, stds, strict=True)]
    high = [m + d for m, d in zip(means, stds, strict=True)]
    axes.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
    return xs


def _paper_line(axes, color: str, label: str, paper_by_x: dict[float | None, float]) -> list[float]:
    """The paper's numbers as hollow squares on a dotted line; the x values drawn."""
    published = sorted(paper_by_x.items())
    if not published:
        return []
    axes.plot([x for x, _ in published], [y for _, y in published], color=color, marker="s",
              markerfacecolor="none", linestyle=":", linewidth=1, label=f"{label} (paper)")
    return [x for x, _ in published]


def _x_axis(axes, x_axis: Axis, our_x: set[float], paper_x: set[float]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    if x_axis.log:
        axes.set_xscale("log")
    if x_axis.reverse:
        axes.invert_xaxis()
    if our_x or paper_x:
        axes.xaxis.set_major_locator(FixedLocator(pick_ticks(list(our_x), list(paper_x), log=x_axis.log)))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_major_formatter(lambda value, _: f"{value:.3g}")
    axes.set_xlabel(x_axis.label or x_axis.key)


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


def _bar_bottom(axes, cells: list[Cell | None], published: list[float]) -> float:
    """Where the bars start, and the y range set: accuracies near 90% should not all look equal, so the
    axis starts below the lowest value (at 0 at most for positive values); negative values (neg. log
    perplexity) get bars rising from below their lowest value, not hanging from 0."""
    lows = [c.mean - c.std for c in cells if c] + published
    if not lows:
        return 0.0
    top = max([c.mean + c.std for c in cells if c] + published)
    low = min(lows)
    bottom = low - 0.2 * (top - low) - 1e-9
    bottom = max(0.0, bottom) if low >= 0 else bottom
    axes.set_ylim(bottom, top + 0.1 * (top - low) + 1e-9)
    return bottom


def _also_bars(axes, outcome: Outcome, axis) -> None:
    """One ``also`` quantity: a bar per series (mean ± std), in the series' colours."""
    spec = outcome.spec
    cells = [find_cell(outcome.cells, s.key, None) for s in spec.shown_series]
    stats = [c.also.get(axis.key) if c else None for c in cells]
    positions = range(len(stats))
    axes.bar(positions, [v[0] if v else 0 for v in stats], yerr=[v[1] if v else 0 for v in stats],
             color=[f"C{i}" for i in positions], capsize=4, alpha=0.85)
    axes.set_xticks(list(positions), [s.key for s in spec.shown_series], rotation=30, fontsize=7)
    axes.set_ylabel(axis.label or axis.key)
    axes.grid(alpha=0.3)


def _bars(axes, outcome: Outcome) -> None:
    spec = outcome.spec
    paper = spec.paper_values()
    labels = [s.label or s.key for s in spec.shown_series]
    cells = [find_cell(outcome.cells, s.key, None) for s in spec.shown_series]
    positions = range(len(spec.shown_series))
    published = [(i, paper[s.key][None]) for i, s in enumerate(spec.shown_series) if None in paper.get(s.key, {})]
    bottom = _bar_bottom(axes, cells, [y for _, y in published])
    axes.bar(positions, [c.mean - bottom if c else 0 for c in cells], bottom=bottom,
             yerr=[c.std if c else 0 for c in cells], color=[f"C{i}" for i in positions], capsize=4, alpha=0.85,
             label="ours (mean ± std)")
    if published:
        axes.plot([i for i, _ in published], [y for _, y in published], "ks", markerfacecolor="none",
                  linestyle="none", label="paper")
    width = min(28, max(10, 70 // len(labels)))  # characters a bar's slot holds on the 10-inch figure
    axes.set_xticks(list(positions), [textwrap.fill(label, width) for label in labels])
