"""benchmarks/attention_scaling.py (issue 20): the scaling benchmark's code path on CPU, tiny shapes.

Timings of a shared CPU are not asserted (the committed results hold them); what is checked: every
exact backend the CPU runs and every variant is timed and sized at every length, the slopes and
crossovers are computed, and the tables and the plot are written. The slope fit itself is checked on
exact power laws.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_the_slope_of_a_power_law_is_its_exponent_and_the_crossover_is_where_it_stays_faster():
    import attention_scaling as bench

    assert bench.slope([(n, 3e-6 * n**2) for n in (128, 256, 512, 1024)]) == pytest.approx(2.0)
    assert bench.slope([(n, 5 + 0 * n) for n in (128, 256)]) == pytest.approx(0.0)
    rows = [{"length": n, "methods": {"dense (math)": {"ms": n**2 / 1e4}, "linear": {"ms": n / 10}}}
            for n in (256, 512, 1024, 2048)]
    result = {"rows": rows, "exact": ["dense (math)"]}
    assert bench.crossover(result, "linear") == 1024  # 0.1 n < n² / 10^4 from n > 1000 on
    rows[-1]["methods"]["dense (math)"] = {"oom": True}
    assert bench.crossover(result, "linear") == 1024


@pytest.mark.e2e
def test_smoke_run_times_every_method_at_every_length(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_scaling.py"), "--smoke", "--threads",
                           "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("attention_scaling_*_smoke.json")
    result = json.loads(path.read_text())
    assert "dense (math)" in result["exact"] and "dense (flex)" not in result["exact"]  # no flex backward on CPU
    assert [v.split()[0] for v in result["variants"]] == ["window", "linear", "performer", "linformer", "lsh"]
    for row in result["rows"]:
        for method in result["exact"] + result["variants"]:
            assert row["methods"][method]["ms"] > 0 and row["methods"][method]["peak_mem_bytes"] > 0, method
    assert set(result["slopes"]) == set(result["exact"] + result["variants"])
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()
