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

Claims (pure functions of the cells, see ``check_claim``). A claim's ``kind`` picks its dataclass,
which holds only the fields that kind uses (another field is an error); the check of each dataclass
is the handler registered for its type in ``claims.CHECKS``:

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
- ``steadier``: the sample std over seeds of ``series`` <= ``max_ratio`` × that of ``than``: "the
  0.1x init varies less across seeds than 1.0x" (Switch Transformers, Table 3).
- ``below``: every cell of ``series`` (within the x range) has a mean <= ``value``: "trains without a
  loss spike" (``value: 0`` on the spike count).

Tables without x (one point per run) use the same claims: every series has one cell, x is ignored.

A measured x (``x: {key: speed.compressed.latency_ms, label: ..., measured: true}``) is a quantity
each run measures itself, different in every seed (its latency), not a level the seeds share: the
table then groups as one without x (a cell per series, claims as there) and keeps x per run like an
``also`` quantity; the plot draws each series as one marker at (mean x, mean y) with ±std bars in both
directions, the reference series as a black star, and the table gives x's mean ± std in a column.

The package: ``spec`` (the spec dataclasses, finding and loading table files), ``cells`` (points
read from metrics.json, cells), ``claims`` (a dataclass and a check per kind), ``render`` (the
outcome, its Rich / Markdown / CSV / JSON renders) and ``plot`` (the figure). The names below are
its public surface: what ``effml reproduce`` (cli/reproduce.py) and its tests use.
"""

from effml.tables.cells import Cells, Point, aggregate, read_points, run_device
from effml.tables.claims import ClaimResult, check_claim, check_claims
from effml.tables.plot import Marker, pick_ticks, scatter_markers
from effml.tables.render import (
    Missing,
    Outcome,
    claim_lines,
    incomplete_cells,
    paper_by_row,
    rich_table,
    row_xs,
    write_outputs,
)
from effml.tables.spec import Series, TableSpec, find_table, load_spec, table_files

__all__ = [
    # the spec
    "TableSpec", "Series", "find_table", "load_spec", "table_files",
    # points and cells
    "Point", "Cells", "read_points", "aggregate", "run_device",
    # claims
    "ClaimResult", "check_claim", "check_claims",
    # the outcome and its renders
    "Missing", "Outcome", "incomplete_cells", "rich_table", "claim_lines", "write_outputs",
    "row_xs", "paper_by_row", "pick_ticks", "Marker", "scatter_markers",
]
