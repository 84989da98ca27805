"""benchmarks/kernels_bert.py: the kernel-selection benchmark's code path on CPU (tiny BERT, fp32).

What CI can check without a GPU: the kernels a CPU cannot run are reported as such (forced: n/a with
the reason), every row that runs has a measured ratio, and the goal lines are written. The ratios
themselves are timings of a shared 2-core machine, so they are not asserted here (a loaded CI box
once measured a selected model at 0.83x): the decision logic is tested with injected timings in
test_kernel_select.py, and the real ratios live in the committed benchmark results.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_cpu_run_reports_forced_costs_and_never_selects_a_slowdown(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels_bert.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = tmp_path.glob("kernels_bert_*.json")
    (row,) = json.loads(result.read_text())["rows"]
    assert row["model"] == "bert_tiny" and row["dense_ms"] > 0
    assert row["fp8 forced"]["ratio"] is None and "fp8 needs a CUDA GPU" in row["fp8 forced"]["note"]
    assert row["2:4 forced"]["ratio"] is None and "needs a CUDA GPU" in row["2:4 forced"]["note"]
    assert row["int8 forced"]["ratio"] > 0 and row["int8 forced"]["kernels"] == {"int8_dynamic": 12}  # 2 layers x 6 Linears
    for method in ("fp8", "int8", "int8_wo", "2:4"):
        selected = row[f"{method} selected"]
        assert selected["ratio"] > 0 and sum(selected["kernels"].values()) >= 12  # per Linear, + the whole model
    assert "math" in row["sdpa order"] and row["sdpa decision"]["kernel"] == row["sdpa order"][0]
    text = (tmp_path / result.name.replace(".json", ".md")).read_text()
    assert ": every selected model >= 1.00x dense" in text and "| bert_tiny | 4×64 |" in text
