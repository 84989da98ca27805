"""benchmarks/structured_bert.py: the structured-pruning GPU benchmark's code path, on CPU in seconds.

The script runs on GPU machines that have torch, transformers and Lightning but not Hydra, OmegaConf,
datasets or wandb, so the CPU run here has those blocked; widths must be what
``bert_surgery.round_up`` says, FLOPs must fall, both files written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO
from effml.models import bert_surgery as surgery

SCRIPT = REPO / "benchmarks" / "structured_bert.py"
# run the script with what the GPU machine lacks unimportable
NO_HYDRA = (
    "import runpy, sys\n"
    "for name in ('omegaconf', 'hydra', 'datasets', 'wandb'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("structured_bert", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-c", NO_HYDRA, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and all(f.startswith("structured_bert_") for f in files), files
    data = json.loads(next(out.glob("*.json")).read_text())
    return data, next(out.glob("*.md")).read_text(), proc.stdout


def test_bert_base_widths(bench):
    """The GPU run's widths: 40% of 12 heads x 64 and of 3072 neurons, rounded to each multiple."""
    base = bench.MODELS["bert-base"]
    assert [bench.kept_widths(base, 0.4, m) for m in (1, 8, 64, 128)] == [(7, 1843), (7, 1848), (7, 1856), (8, 1920)]
    assert bench.kept_widths(base, 0.2, 1) == (10, 2458)
    assert bench.kept_widths(base, 0.6, 128) == (6, 1280)  # 5 x 64 = 320 -> 384


def test_cpu_quick_run_reports_every_case(result, bench):
    data, md, stdout = result
    shape = bench.MODELS["tiny"]
    assert data["model"] == "tiny" and data["dtype"] == "float32" and data["device_type"] == "cpu"
    assert data["torch"] and data["device"] and data["preset"]["name"] == "cpu"
    cases = {(r["level"], r["multiple"]) for r in data["rows"]}
    assert cases == {(lv, m) for lv in (0.2, 0.4, 0.6) for m in (1, 8, 64, 128)}
    for r in data["rows"]:
        heads = max(1, shape.heads - round(shape.heads * r["level"]))
        ffn = round(shape.ffn * (1 - r["level"]))
        assert r["heads_kept"] == surgery.round_up(heads, r["multiple"], shape.head_size, shape.heads)
        assert r["ffn_kept"] == surgery.round_up(ffn, r["multiple"], 1, shape.ffn)
        assert r["attention_width"] == r["heads_kept"] * shape.head_size
        assert r["flops_ratio"] > 1 and r["params"] < data["dense"][0]["params"]
        assert r["train_ms"] > 0 and r["latency_ms"] > 0 and r["train_speedup"] > 0 and r["latency_speedup"] > 0
    target = {r["multiple"]: r for r in data["rows"] if r["level"] == 0.4}
    assert (target[1]["heads_kept"], target[1]["ffn_kept"]) == (7, 461)  # 40% of 12 heads -> 7 kept raw
    assert target[128]["heads_kept"] == 8 and target[128]["ffn_kept"] == 512  # 8 x 16 = 128
    goal = data["goal"]
    assert goal["multiple"] == 1 and goal["meaningful"] is False and goal["fastest_multiple_target"] in (1, 8, 64, 128)
    assert set(goal) >= {"target_met", "never_slower_train", "never_slower_inference", "passed"}
    assert data["compiled"] == []  # --quick: no torch.compile
    assert "| 40% / 40% | 128 | 8 (128) | 512 |" in md and "## Goal check" in md
    assert "goal:" in stdout and "results:" in stdout
