"""benchmarks/gqa_decode.py (issue 20, table gqa): the decode benchmark's code path on CPU, tiny shapes.

Timings of a shared CPU are not asserted (the committed results hold them); what is checked: every
variant decodes, its measured KV cache is the multi-head one times K/V heads / heads, and the tables
are written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # a subprocess of ~17 s on a loaded 2-core machine; the cache ratios are unit-tested in test_gqa.py
def test_smoke_run_decodes_every_variant_with_a_cache_shrunk_by_heads_over_kv_heads(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gqa_decode.py"), "--smoke", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("gqa_decode_*.json")
    result = json.loads(path.read_text())
    variants = result["cases"]["smoke"]["variants"]
    assert list(variants) == ["MHA", "GQA-2", "MQA"]
    # 2 layers x (K, V) x 2 sequences x (8 prompt + 4 decoded tokens) x 4 heads x head dim 8 x fp32
    assert variants["MHA"]["kv_cache_bytes"] == 2 * 2 * 2 * 12 * 4 * 8 * 4
    for v in variants.values():
        assert v["cache_vs_mha"] == v["kv_heads"] / 4 and v["decode_tokens_per_s"] > 0
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().startswith("# Decode-time KV cache")
