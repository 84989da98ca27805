"""benchmarks/earlybert_time.py: the end-to-end saving it reports, measured and FLOP-bound."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "earlybert_time.py"


def load():
    spec = importlib.util.spec_from_file_location("earlybert_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flop_bound_saving_counts_the_search_at_dense_cost():
    bench = load()
    assert bench.flops_saving(0, 120, 120, 2.0) == 0.5  # a free search: the FLOP ratio alone
    assert abs(bench.flops_saving(28, 120, 120, 1.59) - (1 - (28 + 120 / 1.59) / 120)) < 1e-12
    assert bench.flops_saving(120, 120, 120, 1.59) < 0  # a search as long as training costs more than it saves


def test_the_committed_h200_result_reports_both_savings():
    bench = load()
    result = json.loads((REPO / "benchmarks" / "results" / "earlybert_time_nvidia_h200.json").read_text())
    overrides = result.pop("overrides")
    text = bench.markdown(result, overrides)
    assert f"**{result['time_saving']:.1%}**" in text and f"if time followed FLOPs: {result['flops_saving']:.1%}" in text


def test_the_schedule_alone_saving_prices_every_step_as_a_dense_one():
    bench = load()
    # the official schedule: search 28 steps, ticket 2 of dense's 3 epochs (80 of 120 steps)
    assert abs(bench.flops_saving(28, 80, 120, 1.0) - 0.1) < 1e-12
    result = json.loads((REPO / "benchmarks" / "results" / "earlybert_time_official_nvidia_h200.json").read_text())
    assert result["epochs"] == {"dense": 3, "ticket": 2} and result["ticket_steps"] == 80
    text = bench.markdown(result, result.pop("overrides"))
    assert "trains 2 epochs against dense fine-tuning's 3" in text and f"saves {result['schedule_saving']:.1%}" in text
