"""Claims: a dataclass per kind, read from the spec's YAML by its ``kind:``, each checked (and validated)
by the handler registered for its type in ``CHECKS`` (and ``PROBLEMS``); ``CLAIM_TYPES`` maps a
YAML kind to its dataclass. A new kind is a dataclass, a check and a problem function, and a line in
each registry."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import MISSING, OmegaConf

from effml.errors import one_line
from effml.tables.cells import Cell, Cells, find_cell, in_range, x_order

if TYPE_CHECKING:
    from effml.tables.spec import TableSpec

AT_CHOICES = ("lowest_x", "highest_x", "all", "any", "mean")
SERIES_FIELDS = ("series", "than", "reference")  # the fields that name a series, where a kind has them


# --------------------------------------------------------------------------- one dataclass per kind


@dataclass
class ClaimBase:
    """A sentence of the paper as a check; ``kind`` is the YAML ``kind:`` that selects the dataclass."""

    kind: ClassVar[str]
    name: str = MISSING
    series: str = MISSING


@dataclass
class RangedClaim(ClaimBase):
    """A claim about the cells of ``series`` whose x lies in [``min_x``, ``max_x``] (None: open)."""

    min_x: float | None = None
    max_x: float | None = None


@dataclass
class ReachesClaim(RangedClaim):
    """Some cell of ``series`` in the x range reaches the reference cell's mean − ``tolerance``
    and/or × ``min_ratio``."""

    kind: ClassVar[str] = "reaches"
    reference: str | None = None  # default: the table's reference series
    reference_x: float | None = None  # default: the table's reference x
    tolerance: float | None = None
    min_ratio: float | None = None


@dataclass
class ExceedsClaim(RangedClaim):
    """``series`` beats ``than`` by >= ``margin`` at the common x values, aggregated by ``at``."""

    kind: ClassVar[str] = "exceeds"
    than: str | None = None
    margin: float = 0.0
    at: str = "lowest_x"


@dataclass
class FixedBarClaim(RangedClaim):
    """A claim against a fixed ``value``, on y or, with ``quantity``, on one of the table's ``also`` keys
    or its measured x (the sparsity or the speed measured in the same runs as the accuracy)."""

    value: float | None = None
    quantity: str | None = None


@dataclass
class AboveClaim(FixedBarClaim):
    """Some cell of ``series`` in the x range has a mean >= ``value``, a fixed bar (chance level)."""

    kind: ClassVar[str] = "above"


@dataclass
class BelowClaim(FixedBarClaim):
    """Every cell of ``series`` in the x range has a mean <= ``value``, a fixed ceiling (no loss spikes:
    ``value: 0`` on a count)."""

    kind: ClassVar[str] = "below"


@dataclass
class RecoversClaim(ClaimBase):
    """(series − than) / (reference − than) >= ``min_fraction``, at the reference x."""

    kind: ClassVar[str] = "recovers"
    reference: str | None = None  # the high end of the gap; default: the table's reference series
    reference_x: float | None = None
    than: str | None = None  # the low end of the gap
    min_fraction: float | None = None


@dataclass
class SteadierClaim(ClaimBase):
    """The spread over seeds: the sample std of ``series`` is at most ``max_ratio`` × that of ``than``
    (at the lowest common x), e.g. Switch's Table 3: 0.1x init varies less across seeds than 1.0x."""

    kind: ClassVar[str] = "steadier"
    than: str | None = None
    max_ratio: float = 1.0


Claim = ReachesClaim | ExceedsClaim | AboveClaim | RecoversClaim | SteadierClaim | BelowClaim


@dataclass
class ClaimResult:
    name: str
    kind: str
    passed: bool
    ours: float | None  # the number that decided it (a mean, or a difference of means)
    threshold: float | None  # what it had to reach
    detail: str  # the numbers behind the verdict, in one sentence


# --------------------------------------------------------------------------- loading and validation


def load_claim(raw: Any, index: int) -> Claim:
    """The dataclass of the claim's ``kind`` filled from its YAML mapping; ValueError says, in one line,
    what is wrong (the claim named by its name where it has one)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"claims[{index}]: a claim is a mapping (name, kind, series, ...); got {raw!r}")
    where = f"claim '{raw['name']}'" if isinstance(raw.get("name"), str) else f"claims[{index}]"
    kind = raw.get("kind")
    claim_type = CLAIM_TYPES.get(kind) if isinstance(kind, str) else None
    if claim_type is None:
        raise ValueError(f"{where}: kind must be one of {', '.join(CLAIM_TYPES)}; got {kind!r}")
    fields = {key: value for key, value in raw.items() if key != "kind"}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(claim_type), fields))
    except Exception as e:  # a field the kind does not have, a wrong type, a missing name or series
        raise ValueError(f"{where}: {one_line(e)}") from None


def claim_problem(claim: Claim, spec: TableSpec, keys: list[str]) -> str | None:
    """The claim's first inconsistency with the spec (a series that does not exist, a missing field), or None."""
    named = [getattr(claim, f) for f in SERIES_FIELDS if hasattr(claim, f)]
    for key in (k for k in named if k is not None):
        if key not in keys:
            return f"unknown series '{key}'; choose from: {', '.join(keys)}"
    return PROBLEMS[type(claim)](claim, spec)


def reaches_problem(claim: ReachesClaim, spec: TableSpec) -> str | None:
    if claim.tolerance is None and claim.min_ratio is None:
        return "reaches needs a tolerance and/or a min_ratio"
    if reference_series(claim, spec) is None:
        return "reaches needs a reference series (in the claim or the table's reference)"
    if spec.levels is not None and reference_x(claim, spec) is None:
        return "reaches needs reference_x (in the claim or the table's reference.x)"
    return None


def exceeds_problem(claim: ExceedsClaim, spec: TableSpec) -> str | None:
    if claim.than is None:
        return "exceeds needs 'than' (the series it beats)"
    if claim.at not in AT_CHOICES:
        return f"at must be one of {', '.join(AT_CHOICES)}; got {claim.at!r}"
    return None


def above_problem(claim: AboveClaim, spec: TableSpec) -> str | None:
    return bar_problem(claim, spec, "the bar")


def below_problem(claim: BelowClaim, spec: TableSpec) -> str | None:
    return bar_problem(claim, spec, "the ceiling")


def bar_problem(claim: FixedBarClaim, spec: TableSpec, what: str) -> str | None:
    if claim.value is None:
        return f"{claim.kind} needs a value ({what}, in table units)"
    keys = [axis.key for axis in spec.per_run]
    if claim.quantity is not None and claim.quantity not in keys:
        return f"quantity '{claim.quantity}' is not one of the table's also keys ({', '.join(keys) or 'none'})"
    return None


def recovers_problem(claim: RecoversClaim, spec: TableSpec) -> str | None:
    if claim.than is None or claim.min_fraction is None:
        return "recovers needs 'than' (the low end of the gap) and min_fraction"
    if reference_series(claim, spec) is None:
        return "recovers needs a reference series (the high end of the gap)"
    return None


def steadier_problem(claim: SteadierClaim, spec: TableSpec) -> str | None:
    if claim.than is None:
        return "steadier needs 'than' (the series whose spread it undercuts)"
    return None if claim.max_ratio > 0 else f"max_ratio must be > 0; got {claim.max_ratio:g}"


def reference_series(claim: ReachesClaim | RecoversClaim, spec: TableSpec) -> str | None:
    return claim.reference or (spec.reference.series if spec.reference else None)


def reference_x(claim: ReachesClaim | RecoversClaim, spec: TableSpec) -> float | None:
    if spec.levels is None:
        return None
    if claim.reference_x is not None:
        return claim.reference_x
    return spec.reference.x if spec.reference else None


# --------------------------------------------------------------------------- checks


def check_claims(spec: TableSpec, cells: Cells) -> list[ClaimResult]:
    return [check_claim(claim, spec, cells) for claim in spec.claims]


def check_claim(claim: Claim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """The verdict of the handler registered for the claim's type (a pure function of the cells)."""
    return CHECKS[type(claim)](claim, spec, cells)


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _at(cell: Cell) -> str:
    return "" if cell.x is None else f" at x={cell.x:g}"


def _range(claim: ReachesClaim | ExceedsClaim | AboveClaim) -> str:
    parts = [f"x >= {claim.min_x:g}"] if claim.min_x is not None else []
    parts += [f"x <= {claim.max_x:g}"] if claim.max_x is not None else []
    return f" with {' and '.join(parts)}" if parts else ""


def check_reaches(claim: ReachesClaim, spec: TableSpec, cells: Cells) -> ClaimResult:
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
    threshold, how = max(bounds)  # both given: the stricter holds
    candidates = [c for c in in_range(cells, claim.series, claim.min_x, claim.max_x) if c is not ref]
    if not candidates:
        return ClaimResult(claim.name, claim.kind, False, None, threshold,
                           f"no result for {claim.series}{_range(claim)}")
    best = max(candidates, key=lambda c: c.mean)
    reached = [c for c in candidates if c.mean >= threshold]
    if reached and spec.levels is not None:
        verdict = "reached at x = " + ", ".join(f"{c.x:g}" for c in reached)
    else:
        verdict = "reached" if reached else "not reached"
    detail = (f"{claim.series} best {_fmt(best.mean, d)}{_at(best)}; needs >= {_fmt(threshold, d)} "
              f"(= {how}, reference {ref_series}{_at(ref)}); {verdict}")
    return ClaimResult(claim.name, claim.kind, bool(reached), best.mean, threshold, detail)


def check_exceeds(claim: ExceedsClaim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when series − than >= margin, at the common x values picked by ``at``."""
    d = spec.y.decimals
    ours = {c.x: c for c in in_range(cells, claim.series, claim.min_x, claim.max_x)}
    theirs = {c.x: c for c in in_range(cells, claim.than, claim.min_x, claim.max_x)}
    common = sorted((x for x in ours if x in theirs), key=x_order)
    if not common:
        return ClaimResult(claim.name, claim.kind, False, None, claim.margin,
                           f"no x where both {claim.series} and {claim.than} have results{_range(claim)}")
    diffs = {x: ours[x].mean - theirs[x].mean for x in common}
    value, xs = _aggregate_diffs(diffs, common, claim.at)
    shown = "; ".join(
        f"{'' if x is None else f'x={x:g}: '}{_fmt(ours[x].mean, d)} − {_fmt(theirs[x].mean, d)}"
        f" = {diffs[x]:+.{d}f}"
        for x in xs
    )
    detail = f"{claim.series} − {claim.than}{'' if spec.levels is None else f' ({claim.at})'}: {shown}"
    if claim.at == "mean" and len(xs) > 1:
        detail += f"; mean {value:+.{d}f}"
    detail += f"; needs >= {claim.margin:+g}"
    return ClaimResult(claim.name, claim.kind, value >= claim.margin, value, claim.margin, detail)


def _aggregate_diffs(diffs: dict, common: list, at: str) -> tuple[float, list]:
    """The difference that decides an exceeds claim, and the x values it comes from."""
    if at == "lowest_x":
        return diffs[common[0]], [common[0]]
    if at == "highest_x":
        return diffs[common[-1]], [common[-1]]
    if at == "all":  # every x must clear the margin: the smallest difference counts
        return min(diffs.values()), [min(diffs, key=diffs.get)]
    if at == "any":
        return max(diffs.values()), [max(diffs, key=diffs.get)]
    return statistics.fmean(diffs.values()), common  # mean


def check_above(claim: AboveClaim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when the series' best cell (within the x range) has a mean >= ``value``."""
    return _highest_cell_against(claim, spec, cells, "best", ">=", lambda mean: mean >= claim.value)


def check_below(claim: BelowClaim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when the series' worst (highest) cell within the x range has a mean <= ``value``."""
    return _highest_cell_against(claim, spec, cells, "highest", "<=", lambda mean: mean <= claim.value)


def _highest_cell_against(claim: AboveClaim | BelowClaim, spec: TableSpec, cells: Cells, word: str, sign: str,
                          passes) -> ClaimResult:
    """The series' highest cell within the x range, held against the claim's fixed ``value``."""
    axis = next((a for a in spec.per_run if a.key == claim.quantity), spec.y)
    valued = [(c, c.mean if claim.quantity is None else c.also[claim.quantity][0])
              for c in in_range(cells, claim.series, claim.min_x, claim.max_x)
              if claim.quantity is None or claim.quantity in c.also]
    if not valued:
        return ClaimResult(claim.name, claim.kind, False, None, claim.value,
                           f"no result for {claim.series}{_range(claim)}")
    highest, value = max(valued, key=lambda pair: pair[1])
    what = claim.series if claim.quantity is None else f"{claim.series}'s {axis.label or axis.key}"
    detail = f"{what} {word} {_fmt(value, axis.decimals)}{_at(highest)}; needs {sign} {claim.value:g}"
    return ClaimResult(claim.name, claim.kind, passes(value), value, claim.value, detail)


def check_recovers(claim: RecoversClaim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when the series closes >= ``min_fraction`` of the gap from ``than`` up to the reference
    (tables without x: "a skeptical student recovers most of what the nasty teacher took")."""
    d = spec.y.decimals
    high_series = reference_series(claim, spec)
    found = {k: find_cell(cells, k, None if spec.levels is None else reference_x(claim, spec))
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


def check_steadier(claim: SteadierClaim, spec: TableSpec, cells: Cells) -> ClaimResult:
    """Passes when std(series) <= max_ratio × std(than), each over its seeds (>= 2 of them)."""
    d = spec.y.decimals
    ours, theirs = cells.get(claim.series, {}), cells.get(claim.than, {})
    common = sorted((x for x in ours if x in theirs), key=x_order)
    if not common or min(ours[common[0]].n, theirs[common[0]].n) < 2:
        return ClaimResult(claim.name, claim.kind, False, None, claim.max_ratio,
                           f"needs 2 or more seeds of both {claim.series} and {claim.than}")
    a, b = ours[common[0]], theirs[common[0]]
    limit = claim.max_ratio * b.std
    detail = (f"std over seeds: {claim.series} {a.std:.{d + 1}f} (n={a.n}), {claim.than} {b.std:.{d + 1}f} "
              f"(n={b.n}); needs <= {claim.max_ratio:g} × {b.std:.{d + 1}f}")
    return ClaimResult(claim.name, claim.kind, a.std <= limit, a.std, limit, detail)


# --------------------------------------------------------------------------- the registries

CHECKS: dict[type, Callable[[Any, TableSpec, Cells], ClaimResult]] = {
    ReachesClaim: check_reaches,
    ExceedsClaim: check_exceeds,
    AboveClaim: check_above,
    RecoversClaim: check_recovers,
    SteadierClaim: check_steadier,
    BelowClaim: check_below,
}
PROBLEMS: dict[type, Callable[[Any, TableSpec], str | None]] = {
    ReachesClaim: reaches_problem,
    ExceedsClaim: exceeds_problem,
    AboveClaim: above_problem,
    RecoversClaim: recovers_problem,
    SteadierClaim: steadier_problem,
    BelowClaim: below_problem,
}
CLAIM_TYPES: dict[str, type] = {claim_type.kind: claim_type for claim_type in CHECKS}  # YAML kind → dataclass
