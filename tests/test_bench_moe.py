"""benchmarks/moe_dispatch.py (issue 19): the MoE dispatch benchmark's code path on CPU, tiny shapes.

Timings of a shared CPU are not asserted (the committed results hold the measured ratios); what is
checked: every variant is timed and sized, the Switch paths compute one function, the FLOPs and
parameter counts that define "equal FLOPs" and "equal params" hold, and the tables are written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.e2e
def test_smoke_run_times_every_variant_of_one_function(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "moe_dispatch.py"), "--smoke", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("moe_dispatch_*.json")
    result = json.loads(path.read_text())
    assert result["threads"] == 1 and "(1 threads)" in result["device"]
    assert [r["case"] for r in result["rows"]] == ["gpt2_smoke", "llama_smoke"]
    for row in result["rows"]:
        v = row["variants"]
        expected = {"switch (padded bmm)", "switch (loop over experts)", "dense, equal FLOPs/token", "dense, equal params"}
        assert expected <= set(v) and ("switch (grouped_mm)" in v) == result["grouped_mm"]
        for key, variant in v.items():
            for phase in ("train", "inference"):
                assert variant[phase]["tokens_per_s"] > 0 and variant[phase]["peak_mem_bytes"] > 0, (key, phase)
        for diff in row["rel_diff_vs_loop_train"].values():
            assert diff < 1e-5
        dense_flops, dense_params = v["dense, equal FLOPs/token"], v["dense, equal params"]
        switch = v["switch (padded bmm)"]
        router = 2 * row["d"] * row["experts"]
        assert switch["flops_per_token"] == dense_flops["flops_per_token"] + router
        assert abs(switch["params"] - dense_params["params"]) / dense_params["params"] < 0.05
        assert row["ratios"]["train tokens/s vs dense, equal params"]["dense, equal params"] == pytest.approx(1.0)
    text = path.with_suffix(".md").read_text()
    assert "| switch (loop over experts) |" in text and "Ratios of tokens/s" in text
