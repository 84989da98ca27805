"""``effml reproduce``: the claim logic on hand-built numbers, spec validation, and real tiny tables
run end to end (two series × two seeds of LeNet on Fashion-MNIST) through the CLI."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import TINY, one_line_error, run_cli
from effml import tables
from effml.errors import EffmlError
from effml.tables import Point

# A one-point-per-run table: dense LeNet vs 50% magnitude pruning; the first claim holds, the second cannot.
TINY_TABLE = {
    "title": "Tiny pruning table",
    "paper": "Zhu & Gupta 2017 (numbers made up for the test)",
    "recipe": "magnitude_lenet",
    "seeds": [0, 1],
    "series": [
        {"key": "dense", "label": "dense", "recipe": "dense_lenet"},
        {"key": "pruned", "label": "50% pruned", "overrides": ["compressor.sparsity=0.5"]},
    ],
    "y": {"key": "test_acc", "label": "test accuracy (%)", "scale": 100},
    "reference": {"series": "dense", "label": "dense"},
    "paper_numbers": {"values": {"dense": 88.5, "pruned": 88.7}},
    "claims": [
        {"name": "pruning keeps the accuracy", "kind": "reaches", "series": "pruned", "tolerance": 30},
        {"name": "pruning adds 50 points", "kind": "exceeds", "series": "pruned", "than": "dense",
         "margin": 50},
    ],
}

# Points per run, like IMP levels: x = weights remaining (%), as the LTH table reads them.
LEVELS_TABLE = {
    "title": "levels",
    "paper": "a paper",
    "recipe": "magnitude_lenet",
    "series": [{"key": "ticket"}, {"key": "reinit"}],
    "points": "compressors.imp.levels",
    "x": {"key": "weights_remaining", "scale": 100, "log": True, "reverse": True},
    "y": {"key": "test_acc", "scale": 100},
    "reference": {"series": "ticket", "x": 100},
}


def write_table(folder: Path, name: str, spec: dict) -> Path:
    path = folder / "tables" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def spec_of(tmp_path: Path, base: dict, **changes) -> tables.TableSpec:
    return tables.load_spec(write_table(tmp_path, "t", {**base, **changes}))


def cells_of(rows: dict[str, dict[float | None, list[float]]]) -> tables.Cells:
    """{series: {x: [y of each seed]}} → cells, the way reproduce aggregates real runs."""
    return tables.aggregate(
        Point(series, seed, x, y) for series, by_x in rows.items() for x, ys in by_x.items()
        for seed, y in enumerate(ys)
    )


def claim(tmp_path, base, cells, **fields) -> tables.ClaimResult:
    spec = spec_of(tmp_path, base, claims=[{"name": "c", **fields}])
    return tables.check_claim(spec.claims[0], spec, cells)


# --------------------------------------------------------------------------- claims, pure


TICKET = {100: [88.0, 88.2], 51.2: [88.5, 88.3], 16.8: [87.8, 87.6], 10.7: [87.0, 87.2]}


@pytest.mark.parametrize(
    "fields, passed, ours",
    [
        ({"max_x": 20, "tolerance": 0.5}, True, 87.7),  # 16.8% reaches 88.1 − 0.5
        ({"max_x": 20, "tolerance": 0.3}, False, 87.7),  # ... but not 88.1 − 0.3
        ({"max_x": 12, "tolerance": 0.5}, False, 87.1),  # only 10.7% counts
        ({"min_x": 12, "max_x": 60, "tolerance": 0.0}, True, 88.4),  # 51.2% beats the dense network
        ({"max_x": 20, "min_ratio": 0.99}, True, 87.7),  # 0.99 × 88.1 = 87.22
        ({"max_x": 20, "min_ratio": 0.99, "tolerance": 0.2}, False, 87.7),  # both bounds must hold
        ({"tolerance": 0.0, "reference_x": 51.2}, False, 88.1),  # the reference cell itself never counts
    ],
)
def test_reaches(tmp_path, fields, passed, ours):
    cells = cells_of({"ticket": TICKET})
    result = claim(tmp_path, LEVELS_TABLE, cells, kind="reaches", series="ticket", **fields)
    assert result.passed is passed, result.detail
    assert result.ours == pytest.approx(ours)


def test_reaches_reports_the_threshold_and_where_it_was_reached(tmp_path):
    result = claim(tmp_path, LEVELS_TABLE, cells_of({"ticket": TICKET}), kind="reaches", series="ticket",
                   max_x=20, tolerance=0.5)
    assert result.threshold == pytest.approx(87.6)
    assert "88.10 − 0.5" in result.detail and "reached at x = 16.8" in result.detail


# winning ticket − reinit: +2.0 at 10%, +0.5 at 20%, +1.5 at 50%, and only the ticket has 100%
TICKET_VS_REINIT = {"ticket": {100: [90.0], 50: [89.5], 20: [89.0], 10: [88.0]},
                    "reinit": {50: [88.0], 20: [88.5], 10: [86.0]}}


@pytest.mark.parametrize(
    "at, passed, ours",
    [("lowest_x", True, 2.0), ("highest_x", True, 1.5), ("all", False, 0.5), ("any", True, 2.0),
     ("mean", True, 4.0 / 3)],
)
def test_exceeds_aggregates_the_common_x_values(tmp_path, at, passed, ours):
    result = claim(tmp_path, LEVELS_TABLE, cells_of(TICKET_VS_REINIT), kind="exceeds", series="ticket",
                   than="reinit", margin=1.0, at=at)
    assert (result.passed, result.threshold) == (passed, 1.0), result.detail
    assert result.ours == pytest.approx(ours)


# A table without x: the nasty-teacher shape (student alone > skeptical > KD from a nasty teacher).
GAP_TABLE = {**{k: v for k, v in LEVELS_TABLE.items() if k not in ("points", "x")},
             "series": [{"key": "alone"}, {"key": "nasty"}, {"key": "skeptical"}], "reference": {"series": "alone"}}
GAP_CELLS = {"alone": {None: [90.0, 90.2]}, "nasty": {None: [80.0, 80.2]}, "skeptical": {None: [88.0, 88.2]}}


@pytest.mark.parametrize("min_fraction, passed", [(0.5, True), (0.8, True), (0.85, False)])
def test_recovers_measures_the_closed_fraction_of_the_gap(tmp_path, min_fraction, passed):
    result = claim(tmp_path, GAP_TABLE, cells_of(GAP_CELLS), kind="recovers", series="skeptical",
                   than="nasty", min_fraction=min_fraction)
    assert result.passed is passed and result.ours == pytest.approx(0.8), result.detail


def test_recovers_fails_when_there_is_no_gap(tmp_path):
    cells = cells_of({**GAP_CELLS, "nasty": {None: [91.0]}})
    result = claim(tmp_path, GAP_TABLE, cells, kind="recovers", series="skeptical", than="nasty", min_fraction=0.5)
    assert not result.passed and "no gap" in result.detail


@pytest.mark.parametrize("value, passed", [(85.0, True), (88.2, False)])
def test_above_compares_with_a_fixed_bar(tmp_path, value, passed):
    result = claim(tmp_path, GAP_TABLE, cells_of(GAP_CELLS), kind="above", series="skeptical", value=value)
    assert result.passed is passed and result.ours == pytest.approx(88.1)


@pytest.mark.parametrize("value, passed", [(50.0, True), (55.0, False)])
def test_above_on_an_also_quantity_reads_that_quantity(tmp_path, value, passed):
    """The sparsity measured in the same runs as the accuracy: ``quantity`` names one of ``also``."""
    table = {**GAP_TABLE, "also": [{"key": "sparsity", "label": "sparsity (%)", "scale": 100}]}
    cells = tables.aggregate(Point("skeptical", seed, None, 88.0, (("sparsity", s),))
                             for seed, s in enumerate([52.0, 54.0]))
    result = claim(tmp_path, table, cells, kind="above", series="skeptical", quantity="sparsity", value=value)
    assert result.passed is passed and result.ours == pytest.approx(53.0), result.detail
    assert "skeptical's sparsity (%) best 53.00" in result.detail
    no_quantity = claim(tmp_path, table, cells_of(GAP_CELLS), kind="above", series="skeptical", quantity="sparsity",
                        value=1)
    assert not no_quantity.passed and "no result for skeptical" in no_quantity.detail
    with pytest.raises(EffmlError, match="quantity 'speed' is not one of the table's also keys"):
        spec_of(tmp_path, table, claims=[{"name": "c", "kind": "above", "series": "nasty", "quantity": "speed",
                                          "value": 1}])


@pytest.mark.parametrize("max_ratio, passed", [(1.0, True), (0.1, False)])
def test_steadier_compares_the_spread_over_seeds(tmp_path, max_ratio, passed):
    """Switch Transformers' Table 3 as a claim: std over seeds of one series against another's."""
    cells = cells_of({**GAP_CELLS, "nasty": {None: [78.0, 80.0, 82.0]}, "skeptical": {None: [88.0, 88.5, 89.0]}})
    result = claim(tmp_path, GAP_TABLE, cells, kind="steadier", series="skeptical", than="nasty", max_ratio=max_ratio)
    assert result.passed is passed and result.ours == pytest.approx(0.5) and result.threshold == pytest.approx(2.0 * max_ratio)
    one_seed = claim(tmp_path, GAP_TABLE, cells_of({**GAP_CELLS, "nasty": {None: [80.0]}}), kind="steadier",
                     series="skeptical", than="nasty")
    assert not one_seed.passed and "2 or more seeds" in one_seed.detail


@pytest.mark.parametrize("value, passed", [(88.15, True), (88.05, False)])
def test_below_compares_the_highest_cell_with_a_fixed_ceiling(tmp_path, value, passed):
    result = claim(tmp_path, GAP_TABLE, cells_of(GAP_CELLS), kind="below", series="skeptical", value=value)
    assert result.passed is passed and result.ours == pytest.approx(88.1) and "needs <=" in result.detail
    with pytest.raises(EffmlError, match="below needs a value"):
        spec_of(tmp_path, GAP_TABLE, claims=[{"name": "c", "kind": "below", "series": "nasty"}])


def test_new_claim_kinds_need_their_fields(tmp_path):
    with pytest.raises(EffmlError, match="above needs a value"):
        spec_of(tmp_path, GAP_TABLE, claims=[{"name": "c", "kind": "above", "series": "nasty"}])
    with pytest.raises(EffmlError, match="recovers needs 'than'"):
        spec_of(tmp_path, GAP_TABLE, claims=[{"name": "c", "kind": "recovers", "series": "nasty"}])


def test_exceeds_respects_the_x_range(tmp_path):
    result = claim(tmp_path, LEVELS_TABLE, cells_of(TICKET_VS_REINIT), kind="exceeds", series="ticket",
                   than="reinit", margin=1.0, min_x=15, at="lowest_x")
    assert not result.passed and result.ours == pytest.approx(0.5) and "x=20" in result.detail


def test_claims_on_missing_cells_fail_and_say_so(tmp_path):
    cells = cells_of({"ticket": {50: [89.0]}, "reinit": {20: [88.0]}})
    exceeds = claim(tmp_path, LEVELS_TABLE, cells, kind="exceeds", series="ticket", than="reinit")
    assert not exceeds.passed and exceeds.ours is None and "no x where both" in exceeds.detail
    reaches = claim(tmp_path, LEVELS_TABLE, cells, kind="reaches", series="ticket", tolerance=1)
    assert not reaches.passed and "no result for reference ticket at x=100" in reaches.detail


def test_one_point_tables_compare_series_means(tmp_path):
    cells = cells_of({"dense": {None: [88.0, 88.4]}, "pruned": {None: [87.9, 88.1]}})
    assert claim(tmp_path, TINY_TABLE, cells, kind="reaches", series="pruned", tolerance=0.2).passed
    assert not claim(tmp_path, TINY_TABLE, cells, kind="reaches", series="pruned", tolerance=0.1).passed
    kd = claim(tmp_path, TINY_TABLE, cells, kind="exceeds", series="dense", than="pruned", margin=0.2)
    assert kd.passed and kd.ours == pytest.approx(0.2)
    assert "88.20 − 88.00 = +0.20" in kd.detail


# --------------------------------------------------------------------------- points and cells


def test_points_of_every_seed_group_by_level_and_give_mean_and_std(tmp_path):
    spec = spec_of(tmp_path, LEVELS_TABLE)
    points = []
    for seed, (acc_dense, acc_level) in enumerate([(0.88, 0.86), (0.90, 0.87)]):
        noisy = 0.512 + seed * 1e-12  # the same level, recomputed
        levels = [{"level": 0, "weights_remaining": 1.0, "test_acc": acc_dense},
                  {"level": 3, "weights_remaining": noisy, "test_acc": acc_level}]
        points += tables.read_points(spec, "ticket", seed, {"compressors": {"imp": {"levels": levels}}})
    cells = tables.aggregate(points)["ticket"]
    assert sorted(cells) == [51.2, 100.0]
    assert cells[51.2].mean == pytest.approx(86.5) and cells[51.2].n == 2
    assert cells[100.0].std == pytest.approx(statistics.stdev([88.0, 90.0]))


def test_one_point_per_run_reads_the_compressed_value(tmp_path):
    spec = spec_of(tmp_path, TINY_TABLE)
    [point] = tables.read_points(spec, "dense", 0, {"test_acc": {"dense": 0.9, "compressed": 0.8}})
    assert (point.x, point.y) == (None, pytest.approx(80.0))
    levels = spec_of(tmp_path, LEVELS_TABLE)
    with pytest.raises(ValueError, match="metrics.json has no 'compressors.imp.levels'"):
        tables.read_points(levels, "ticket", 0, {"test_acc": 0.8})
    with pytest.raises(ValueError, match="a point in metrics.json has no 'weights_remaining'"):
        tables.read_points(levels, "ticket", 0, {"compressors": {"imp": {"levels": [{"test_acc": 0.8}]}}})


def test_points_without_a_value_are_skipped(tmp_path):
    """IMP's level 0 has no Hamming distance to a previous mask: it is no point of a hamming plot."""
    spec = spec_of(tmp_path, LEVELS_TABLE, y={"key": "hamming"})
    levels = [{"weights_remaining": 1.0, "hamming": None}, {"weights_remaining": 0.8, "hamming": 0.2}]
    points = tables.read_points(spec, "ticket", 0, {"compressors": {"imp": {"levels": levels}}})
    assert [(p.x, p.y) for p in points] == [(80.0, 0.2)]


def test_paper_numbers_sit_in_the_nearest_row(tmp_path):
    paper = {"values": {"ticket": {100: 98.0, 51.3: 98.3, 7.0: 98.1}}}
    spec = spec_of(tmp_path, LEVELS_TABLE, paper_numbers=paper)
    cells = cells_of({"ticket": {100: [88.0], 51.2: [88.5], 10.7: [87.0]}})
    rows = tables.row_xs(spec, cells)
    assert rows == [100, 51.2, 10.7, 7.0]  # reverse: decreasing weights remaining
    assert tables.paper_by_row(spec, rows)["ticket"] == {100: 98.0, 51.2: 98.3, 7.0: 98.1}


def test_a_points_table_renders_lines_with_the_paper_beside_ours(tmp_path):
    paper = {"values": {"ticket": {100: 98.0, 51.3: 98.3, 7.0: 98.1}}}
    claims = [{"name": "ticket reaches dense", "kind": "reaches", "series": "ticket", "max_x": 20, "tolerance": 1}]
    spec = spec_of(tmp_path, LEVELS_TABLE, paper_numbers=paper, claims=claims)
    cells = cells_of({"ticket": {100: [88.0, 88.2], 51.2: [88.5, 88.3], 10.7: [87.6, 87.4]},
                      "reinit": {51.2: [87.0, 87.2], 10.7: [85.0, 85.4]}})
    outcome = tables.Outcome(spec, cells, tables.check_claims(spec, cells), [], [0, 1], "effml reproduce t")
    files = tables.write_outputs(outcome, tmp_path / "out")
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(files["csv"].open()))
    assert [(r["series"], r["x"], r["n"], r["paper"]) for r in rows] == [
        ("ticket", "100", "2", "98"), ("ticket", "51.2", "2", "98.3"), ("ticket", "10.7", "2", ""),
        ("ticket", "7", "0", "98.1"), ("reinit", "51.2", "2", ""), ("reinit", "10.7", "2", ""),
    ]
    markdown = files["markdown"].read_text()
    assert "| 51.2 | 88.40 ± 0.14 (2) | 98.30 | 87.10 ± 0.14 (2) |" in markdown
    assert "**PASS** ticket reaches dense" in markdown
    assert json.loads(files["summary"].read_text())["passed"] is True


def test_also_quantities_are_columns_panels_and_summary_entries(tmp_path):
    """``also``: what else each run measured (dropped tokens, tokens/s) beside the claim's y."""
    also = [{"key": "compressors.switch_moe.dropped", "label": "dropped (%)", "scale": 100, "decimals": 1},
            {"key": "speed.compressed.tokens_per_s", "label": "tokens/s", "decimals": 0}]
    spec = spec_of(tmp_path, TINY_TABLE, also=also)
    points = []
    for seed, (acc, dropped, speed) in enumerate([(0.9, 0.30, 6000), (0.8, 0.20, 6200)]):
        run = {"test_acc": acc, "compressors": {"switch_moe": {"dropped": dropped}},
               "speed": {"compressed": {"tokens_per_s": speed}}}
        points += tables.read_points(spec, "pruned", seed, run)
    points += tables.read_points(spec, "dense", 0, {"test_acc": 0.95})  # measured neither: dashes
    cells = tables.aggregate(points)
    assert cells["pruned"][None].also["compressors.switch_moe.dropped"] == pytest.approx(
        (25.0, statistics.stdev([30.0, 20.0]), 2))
    assert cells["dense"][None].also == {}
    outcome = tables.Outcome(spec, cells, tables.check_claims(spec, cells), [], [0, 1], "effml reproduce t")
    files = tables.write_outputs(outcome, tmp_path / "out")
    markdown = files["markdown"].read_text()
    assert "| dropped (%) | tokens/s |" in markdown
    assert "| 85.00 ± 7.07 (2) | 88.70 | 25.0 ± 7.1 | 6100 ± 141 |" in markdown and "| — | — |" in markdown
    summary = json.loads(files["summary"].read_text())
    pruned = next(c for c in summary["cells"] if c["series"] == "pruned")
    assert pruned["also"]["speed.compressed.tokens_per_s"]["mean"] == pytest.approx(6100)
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(EffmlError, match="also: extra quantities are shown for tables without x"):
        spec_of(tmp_path, LEVELS_TABLE, also=also)


# Accuracy against each run's own measured latency (issue 22's frontier): a marker per series.
FRONTIER_TABLE = {
    "title": "frontier",
    "paper": "a paper",
    "recipe": "magnitude_lenet",
    "seeds": [0, 1],
    "series": [
        {"key": "dense", "label": "dense", "recipe": "dense_lenet"},
        {"key": "pruned", "label": "pruned"},
        {"key": "sub", "label": "a subnetwork", "points": "compressors.multi.subnets.a"},
    ],
    "x": {"key": "speed.compressed.latency_ms", "label": "latency (ms)", "measured": True},
    "y": {"key": "test_acc", "label": "test accuracy (%)", "scale": 100},
    "reference": {"series": "dense", "label": "dense"},
}


def _timed(acc: float, ms: float) -> dict:
    return {"test_acc": acc, "speed": {"compressed": {"latency_ms": ms}}}


def test_a_measured_x_is_one_marker_per_series_with_error_bars_both_ways(tmp_path):
    spec = spec_of(tmp_path, FRONTIER_TABLE)
    points = []
    for seed, (dense, pruned, sub) in enumerate([((0.90, 10.0), (0.85, 4.0), (0.80, 2.0)),
                                                 ((0.92, 13.0), (0.87, 5.0), (0.86, 3.0))]):
        points += tables.read_points(spec, "dense", seed, _timed(*dense))
        points += tables.read_points(spec, "pruned", seed, _timed(*pruned))
        # the subnetwork's own accuracy and latency, not those of the run that holds it
        run = _timed(0.5, 99.0) | {"compressors": {"multi": {"subnets": {"a": _timed(*sub)}}}}
        points += tables.read_points(spec, "sub", seed, run)
    cells = tables.aggregate(points)
    assert {series: list(by_x) for series, by_x in cells.items()} == {"dense": [None], "pruned": [None], "sub": [None]}
    outcome = tables.Outcome(spec, cells, tables.check_claims(spec, cells), [], [0, 1], "effml reproduce t")

    markers = tables.scatter_markers(outcome)
    assert [(m.series, m.n, m.reference) for m in markers] == [("dense", 2, True), ("pruned", 2, False), ("sub", 2, False)]
    expected = {"dense": ([10.0, 13.0], [90.0, 92.0]), "pruned": ([4.0, 5.0], [85.0, 87.0]), "sub": ([2.0, 3.0], [80.0, 86.0])}
    for m in markers:
        xs, ys = expected[m.series]
        assert (m.x, m.x_std) == (pytest.approx(statistics.fmean(xs)), pytest.approx(statistics.stdev(xs)))
        assert (m.y, m.y_std) == (pytest.approx(statistics.fmean(ys)), pytest.approx(statistics.stdev(ys)))

    # the figure draws exactly these: each errorbar's marker and the ends of its x and y bars
    from effml.tables.plot import plot

    figure = plot(outcome, tmp_path / "frontier.png")
    drawn = figure.axes[0].containers
    assert len(drawn) == len(markers)
    for container, m in zip(drawn, markers, strict=True):
        assert container.lines[0].get_xydata().tolist() == [[pytest.approx(m.x), pytest.approx(m.y)]]
        x_bar, y_bar = (c.get_segments()[0] for c in container.lines[2])
        assert x_bar.tolist() == [[pytest.approx(m.x - m.x_std), pytest.approx(m.y)],
                                  [pytest.approx(m.x + m.x_std), pytest.approx(m.y)]]
        assert y_bar.tolist() == [[pytest.approx(m.x), pytest.approx(m.y - m.y_std)],
                                  [pytest.approx(m.x), pytest.approx(m.y + m.y_std)]]
    assert drawn[0].lines[0].get_marker() == "*" and drawn[1].lines[0].get_marker() != "*"

    files = tables.write_outputs(outcome, tmp_path / "out")
    markdown = files["markdown"].read_text()
    assert "| series | ours: test accuracy (%) (n) | ours: latency (ms) |" in markdown
    assert "| a subnetwork | 83.00 ± 4.24 (2) | 2.50 ± 0.71 |" in markdown
    rows = list(csv.DictReader(files["csv"].open()))
    assert [(r["series"], r["x"], r["mean"], r["x_std"]) for r in rows] == [
        ("dense", "11.5", "91", "2.12132"), ("pruned", "4.5", "86", "0.707107"), ("sub", "2.5", "83", "0.707107")]
    summary = json.loads(files["summary"].read_text())
    assert summary["x"]["measured"] is True
    with pytest.raises(ValueError, match="a point in metrics.json has no 'speed'"):
        tables.read_points(spec, "pruned", 0, {"test_acc": 0.9})  # a run that did not time itself


def test_ticks_keep_the_dense_and_the_sparsest_level_and_prefer_ours():
    assert tables.pick_ticks([100, 51.2], [100, 51.3, 7.0], log=True) == [7.0, 51.2, 100]
    crowded = tables.pick_ticks([100, 80, 64, 51.2, 10.7], [51.3, 1.9], log=True)
    assert {100, 10.7, 1.9} <= set(crowded) and 51.3 not in crowded and 80 not in crowded  # 80 crowds 100


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"serie": []}, "Key 'serie' not in"),
        ({"seeds": ["a"]}, "seeds[0]"),
        ({"title": None}, "title"),
        ({"series": []}, "needs at least one series"),
        ({"series": [{"key": "a"}, {"key": "a"}]}, "keys must be unique"),
        ({"reference": {"series": "nope"}}, "reference.series: unknown series 'nope'"),
        ({"paper_numbers": {"values": {"nope": 1.0}}}, "paper_numbers.values: unknown series 'nope'"),
        ({"claims": [{"name": "c", "kind": "beats", "series": "dense"}]}, "kind must be one of reaches"),
        ({"claims": [{"name": "c", "kind": "exceeds", "series": "dense"}]}, "needs 'than'"),
        ({"claims": [{"name": "c", "kind": "exceeds", "series": "d", "than": "x"}]}, "unknown series 'd'"),
        ({"claims": [{"name": "c", "kind": "reaches", "series": "dense"}]}, "tolerance and/or a min_ratio"),
        ({"claims": [{"name": "c", "kind": "exceeds", "series": "dense", "than": "pruned", "at": "best"}]},
         "at must be one of"),
        ({"points": "a.b"}, "needs an x axis"),
        ({"points": "a.b", "x": {"key": "ms", "measured": True}}, "needs an x axis (x.key) that is not measured"),
        ({"x": {"key": "ms", "measured": True}, "reference": {"series": "dense", "x": 3}},
         "reference.x: only a table with x levels"),
    ],
)
def test_bad_spec_is_one_line_naming_the_file(tmp_path, changes, message):
    with pytest.raises(EffmlError) as raised:
        spec_of(tmp_path, TINY_TABLE, **changes)
    text = str(raised.value)
    assert message in text and "\n" not in text and text.startswith(f"table {tmp_path}"), text


def test_shipped_tables_are_valid_and_name_existing_recipes():
    from effml.config import recipe_files

    shipped = {name: path for name, path in tables.table_files().items() if "site-packages" not in str(path)}
    assert "lth_lenet" in shipped
    for path in shipped.values():
        spec = tables.load_spec(path)
        assert len(spec.seeds) >= 3 and (spec.claims or spec.points or spec.measured_x)  # claims, or a curve to look at
        for series in spec.series:
            assert (series.recipe or spec.recipe) in recipe_files()


# --------------------------------------------------------------------------- the command, fast paths


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny table in $EFFML_RECIPES/tables (cwd is tmp_path, see the effml fixture)."""
    write_table(tmp_path / "recipes", "tiny", TINY_TABLE)
    monkeypatch.setenv("EFFML_RECIPES", str(tmp_path / "recipes"))
    return tmp_path


def test_list_shows_the_tables(effml, tiny, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # Rich wraps at 80 columns when not on a terminal
    write_table(tiny / "recipes", "broken", {"title": "x"})
    code, out, _ = effml("reproduce", "--list")
    assert code == 0
    assert "tiny" in out and "Tiny pruning table" in out and "2 × 2 = 4" in out
    assert "lth_lenet" in out and "broken" in out and "invalid" in out  # one bad file spoils no listing


def test_dry_run_prints_one_command_per_series_and_runs_nothing(effml, tiny):
    code, out, _ = effml("reproduce", "tiny", "--dry-run", *TINY)
    assert code == 0
    commands = [line for line in out.splitlines() if " train -m " in line]
    assert len(commands) == 2
    assert "recipe=dense_lenet seed=0,1" in commands[0] and TINY[0] in commands[0]
    assert "recipe=magnitude_lenet seed=0,1 compressor.sparsity=0.5" in commands[1]
    assert "2 runs, 0 finished already" in out
    assert not (tiny / "outputs").exists()


@pytest.mark.parametrize("launcher, config", [("local", "submitit_local"), ("slurm", "slurm")])
def test_a_launcher_goes_into_every_series_command(effml, tiny, launcher, config):
    code, out, _ = effml("reproduce", "tiny", "--dry-run", f"--launcher={launcher}", *TINY)
    assert code == 0
    commands = [line for line in out.splitlines() if " train -m " in line]
    assert len(commands) == 2 and all(f"train -m hydra/launcher={config} recipe=" in c for c in commands)
    assert not (tiny / "outputs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["reproduce", "nope"], "unknown table 'nope'; choose from: "),
        (["reproduce"], "effml reproduce needs a table"),
        (["reproduce", "tiny", "compressor.sparsty=0.5"], "sparsty"),
        (["reproduce", "tiny", "seed=3"], "--seeds"),
        (["reproduce", "tiny", "--seeds", "a,b"], "--seeds needs distinct integers"),
        (["reproduce", "tiny", "--frobnicate"], "unknown option '--frobnicate'"),
        (["reproduce", "tiny", "--launcher", "pbs"], "--launcher must be one of local, slurm; got 'pbs'"),
        (["reproduce", "tiny", "--launcher"], "--launcher must be one of local, slurm; got ''"),
        (["reproduce", "broken"], "table "),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_run(effml, tiny, args, message):
    write_table(tiny / "recipes", "broken", {**TINY_TABLE, "seeds": []})
    code, out, err = effml(*args)
    one_line_error(code, err, message)
    assert "Traceback" not in out + err and not (tiny / "outputs").exists()


def test_every_series_is_validated_before_the_first_runs(effml, tiny):
    second_bad = {**TINY_TABLE, "series": [TINY_TABLE["series"][0],
                                           {"key": "pruned", "overrides": ["compressor.sparsity=1.5"]}]}
    write_table(tiny / "recipes", "tiny", second_bad)
    code, out, err = effml("reproduce", "tiny", *TINY)
    one_line_error(code, err, "series 'pruned': compressor.sparsity must be in [0, 1)")
    assert not (tiny / "outputs").exists()  # the valid first series did not start


# --------------------------------------------------------------------------- end to end (real runs)


class Finished:
    """The tiny table, run once for the module: its folder, environment and the CLI's answer."""

    def __init__(self, root: Path, env: dict, result):
        self.root, self.env, self.result = root, env, result
        self.folder = root / "outputs" / "tables" / "tiny"

    def metrics(self, recipe: str) -> list[dict]:
        files = sorted((self.root / "outputs" / recipe).glob("*/seed_*/metrics.json"))
        return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    write_table(root / "recipes", "tiny", TINY_TABLE)
    env = {"EFFML_RECIPES": str(root / "recipes")}
    return Finished(root, env, run_cli(["reproduce", "tiny", *TINY], cwd=root, env=env))


@pytest.mark.e2e
@pytest.mark.xdist_group("reproduce")
def test_table_matches_the_runs_and_checks_the_claims(finished):
    result = finished.result
    assert result.returncode == 1, result.stderr[-3000:]  # the second claim cannot hold
    assert "PASS pruning keeps the accuracy" in result.stdout
    assert "FAIL pruning adds 50 points" in result.stdout
    for name in ("table.md", "table.csv", "summary.json", "tiny.png"):
        assert (finished.folder / name).stat().st_size > 0, name
    assert (finished.folder / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    rows = {row["series"]: row for row in csv.DictReader((finished.folder / "table.csv").open())}
    for series, recipe in (("dense", "dense_lenet"), ("pruned", "magnitude_lenet")):
        accs = [100 * m["test_acc"] for m in finished.metrics(recipe)]
        assert len(accs) == 2
        assert float(rows[series]["mean"]) == pytest.approx(statistics.fmean(accs), rel=1e-5)
        assert float(rows[series]["std"]) == pytest.approx(statistics.stdev(accs), rel=1e-4, abs=1e-6)
        assert rows[series]["n"] == "2"
    assert rows["dense"]["paper"] == "88.5"
    summary = json.loads((finished.folder / "summary.json").read_text())
    assert [c["passed"] for c in summary["claims"]] == [True, False] and not summary["missing"]
    assert summary["claims"][1]["threshold"] == 50
    gain = float(rows["pruned"]["mean"]) - float(rows["dense"]["mean"])
    assert summary["claims"][1]["ours"] == pytest.approx(gain, abs=1e-4)
    assert "| dense |" in (finished.folder / "table.md").read_text()


@pytest.mark.e2e
@pytest.mark.xdist_group("reproduce")
def test_rerun_reuses_every_finished_run(finished, effml, monkeypatch):
    monkeypatch.chdir(finished.root)
    monkeypatch.setenv("EFFML_RECIPES", finished.env["EFFML_RECIPES"])
    files = sorted((finished.root / "outputs").rglob("metrics.json"))
    before = [f.stat().st_mtime_ns for f in files]
    code, out, _ = effml("reproduce", "tiny", *TINY)
    assert code == 1
    assert out.count("all 2 runs finished already; nothing to run") == 2 and " train -m " not in out
    assert sorted((finished.root / "outputs").rglob("metrics.json")) == files
    assert [f.stat().st_mtime_ns for f in files] == before


@pytest.mark.e2e
@pytest.mark.xdist_group("reproduce")
def test_report_only_aggregates_what_is_there(finished, effml, monkeypatch, tmp_path):
    monkeypatch.chdir(finished.root)
    passing = write_table(tmp_path / "more", "tiny_pass", {**TINY_TABLE, "claims": TINY_TABLE["claims"][:1]})
    monkeypatch.setenv("EFFML_RECIPES", f"{finished.env['EFFML_RECIPES']}:{passing.parents[1]}")
    code, out, _ = effml("reproduce", "tiny_pass", "--report", *TINY)
    assert code == 0 and "every claim holds" in out and "finished already" not in out
    assert (finished.root / "outputs" / "tables" / "tiny_pass" / "table.md").exists()
    code, out, _ = effml("reproduce", "tiny_pass", "--report")  # without TINY: other run ids, none finished
    assert code == 1 and out.count("missing: ") == 4 and "not run yet" in out and "failed" not in out


@pytest.mark.e2e
@pytest.mark.xdist_group("reproduce")
def test_a_failed_run_is_missing_and_the_others_are_kept(finished, effml, monkeypatch, tmp_path):
    from effml import runner
    from effml.cli.compose import compose_config

    shutil.copytree(finished.root / "outputs", tmp_path / "outputs")  # the finished seeds 0 and 1
    monkeypatch.setenv("EFFML_RECIPES", finished.env["EFFML_RECIPES"])
    pruned_seed_2 = ["recipe=magnitude_lenet", "seed=2", "compressor.sparsity=0.5", *TINY]
    broken = runner.plan(compose_config(pruned_seed_2))
    checkpoint = broken.run_dir.stage(0, "train").last_checkpoint
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")  # pruned seed 2 fails when it starts training
    code, out, _ = effml("reproduce", "tiny", "--seeds", "0,1,2", *TINY)
    assert code == 1
    assert out.count("finished already") == 4  # seeds 0 and 1 of both series, skipped by effml train
    assert "corrupt" in out  # the failed job's own message, streamed
    assert f"missing: pruned seed 2: no {broken.run_dir.metrics}" in out.replace("\n", "")
    assert "failed or killed" in out.replace("\n", " ")  # it started: its folder is there, no process holds it
    summary = json.loads((tmp_path / "outputs" / "tables" / "tiny" / "summary.json").read_text())
    n = {cell["series"]: cell["n"] for cell in summary["cells"]}
    assert n == {"dense": 3, "pruned": 2}  # dense seed 2 ran; pruned kept its two finished seeds
    assert [m["series"] for m in summary["missing"]] == ["pruned"]


def test_a_missing_result_says_whether_the_run_never_started_is_running_or_failed(tmp_path):
    from effml.paths import RunDir
    from effml.run_record import missing_state, run_lock
    from effml.tables.render import Missing, series_cell_text

    run = RunDir.of(tmp_path, "recipe", "abc", 0)
    assert missing_state(run) == "not run"
    run.path.mkdir(parents=True)
    with run_lock(run):
        assert missing_state(run) == "running"  # the lock is held by a live process
    assert missing_state(run) == "failed"  # started, released its lock, wrote no metrics.json
    outcome = SimpleNamespace(cells={}, missing=[Missing("a", 0, "", "running"), Missing("b", 0, "", "not run"),
                                                 Missing("b", 1, "", "failed")])
    assert [series_cell_text(outcome, s, None) for s in ("a", "b", "c")] == ["running", "failed", "—"]


# --------------------------------------------------------------------------- the claim registry


@pytest.mark.parametrize("claim_type", list(tables.claims.CHECKS), ids=lambda claim_type: claim_type.kind)
def test_every_claim_type_has_its_kind_a_check_and_a_validation(tmp_path, claim_type):
    registry = tables.claims
    assert registry.CLAIM_TYPES[claim_type.kind] is claim_type and claim_type in registry.PROBLEMS
    spec = spec_of(tmp_path, GAP_TABLE)
    result = tables.check_claim(claim_type(name="c", series="alone"), spec, {})  # dispatched on the type
    assert (result.kind, result.passed) == (claim_type.kind, False) and "\n" not in result.detail


def test_every_shipped_claim_kind_loads_as_its_dataclass():
    registry = tables.claims
    for path in tables.table_files().values():
        raw = yaml.safe_load(path.read_text()).get("claims") or []
        spec = tables.load_spec(path)
        assert [type(c) for c in spec.claims] == [registry.CLAIM_TYPES[c["kind"]] for c in raw], path
        assert all(type(c) in registry.CHECKS for c in spec.claims)


@pytest.mark.parametrize(
    "claim, message",
    [
        ({"name": "c", "kind": "beats", "series": "alone"},
         "claim 'c': kind must be one of reaches, exceeds, above, recovers, steadier, below; got 'beats'"),
        ({"name": "c", "series": "alone"}, "claim 'c': kind must be one of reaches, exceeds, above, recovers"),
        ({"name": "c", "kind": "above", "series": "alone", "value": 20, "margin": 1},
         "claim 'c': Key 'margin' not in 'AboveClaim'"),  # a field of another kind is no silent no-op
    ],
)
def test_an_unknown_kind_or_field_is_one_line(tmp_path, claim, message):
    with pytest.raises(EffmlError) as raised:
        spec_of(tmp_path, GAP_TABLE, claims=[claim])
    text = str(raised.value)
    assert message in text and "\n" not in text and text.startswith(f"table {tmp_path}"), text


@pytest.mark.slow  # ~50 s on 2 busy cores: a process per series and per job, each importing torch
def test_a_table_runs_its_series_through_the_submitit_launcher(tmp_path):
    """--launcher local: each series' jobs are submitit jobs (processes of their own), the series in order."""
    write_table(tmp_path / "recipes", "tiny", TINY_TABLE)
    env = {"EFFML_RECIPES": str(tmp_path / "recipes"), "OMP_NUM_THREADS": "1"}
    result = run_cli(["reproduce", "tiny", "--launcher", "local", "--seeds", "0", *TINY], cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # the second claim cannot hold
    assert "PASS pruning keeps the accuracy" in result.stdout and "results missing" not in result.stdout
    sweeps = sorted((tmp_path / "outputs" / "multirun").glob("*"))
    assert len(sweeps) == 2 and all(list(s.glob(".submitit/*")) for s in sweeps)  # a submitit sweep per series
    runs = {recipe: sorted((tmp_path / "outputs" / recipe).glob("*/seed_*/metrics.json"))
            for recipe in ("dense_lenet", "magnitude_lenet")}
    assert [len(r) for r in runs.values()] == [1, 1]
    # the series in order: the base series had ended before the next one's runs began
    submitted = [min(f.stat().st_mtime for f in sweep.glob(".submitit/*/*_submitted.pkl")) for sweep in sweeps]
    assert max(f.stat().st_mtime for f in runs["dense_lenet"]) < max(submitted)
