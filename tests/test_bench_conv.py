"""benchmarks/structured_conv.py: the channel-pruning CPU benchmark's code path, in seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.e2e  # CLI runs of seconds
def test_quick_run_writes_both_files_with_fewer_flops(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "structured_conv.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (result,) = tmp_path.glob("structured_conv_*.json")
    assert (tmp_path / result.name.replace(".json", ".md")).exists()
    rows = json.loads(result.read_text())["rows"]
    assert [r["multiple"] for r in rows] == [1, 8]
    assert all(r["channels_after"] < 1 and r["flops_ratio"] > 1 for r in rows)
    assert rows[1]["channels_after"] >= rows[0]["channels_after"]  # rounding up to 8 keeps more
