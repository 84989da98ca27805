"""benchmarks/mask_overhead.py and benchmarks/fp8_training.py (issue 25, items 4 and 5): their code paths on CPU.

Both scripts run on GPU machines that have torch, transformers, Lightning and (carried) torchao but not
Hydra, OmegaConf, datasets or wandb, so they run here in one subprocess with those blocked, at tiny
sizes and few rounds. What is checked is what must hold on any machine: every variant is timed, the
masked variants compute the dense model's function, effml's and ModelPruning's masks are the same,
fp8 selection on a CPU keeps every layer dense (so "selected" is the dense model), and both result
files carry the goal check. The timings of a shared 2-core machine are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"
# run both scripts in one interpreter (torch and transformers import once) with what the GPU node lacks blocked
DRIVER = (
    "import runpy, sys\n"
    "for name in ('omegaconf', 'hydra', 'datasets', 'wandb'):\n"
    "    sys.modules[name] = None\n"
    "out = sys.argv[1]\n"
    "for script, extra in (('mask_overhead.py', []), ('fp8_training.py', [])):\n"
    "    sys.argv = [script, '--quick', '--device', 'cpu', '--threads', '1', '--out', out, *extra]\n"
    f"    runpy.run_path({str(BENCH)!r} + '/' + script, run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 4, files

    def load(prefix: str) -> tuple[dict, str]:
        (path,) = out.glob(f"{prefix}_*.json")
        return json.loads(path.read_text()), path.with_suffix(".md").read_text()

    return load("mask_overhead"), load("fp8_training"), proc.stdout


def test_mask_overhead_times_every_variant_of_one_function(results):
    (data, md), _, stdout = results
    assert data["device_type"] == "cpu" and data["meaningful"] is False and data["sparsity"] == 0.9
    assert [r["case"] for r in data["rows"]] == ["bert_base", "resnet20"]
    for row in data["rows"]:
        v = row["variants"]
        assert set(v) == {"dense", "dense (again)", "effml", "effml (hook)", "ModelPruning", "ModelPruning (defaults)"}
        assert all(t["train_ms"] > 0 and t["rounds"] >= 3 for t in v.values())
        assert v["dense"]["overhead"] == 0 and v["dense"]["forward_pre_hooks"] == 0
        # the same weights masked the same way, identical masks and logits; effml's masks need no hook
        assert row["mask_entries_differing_effml_vs_modelpruning"] == 0
        assert v["effml"]["masked_tensors"] == v["ModelPruning"]["masked_tensors"] == v["effml (hook)"]["forward_pre_hooks"]
        assert v["ModelPruning (defaults)"]["masked_tensors"] > v["ModelPruning"]["masked_tensors"]
        assert v["effml"]["forward_pre_hooks"] == 0
        for key in ("dense (again)", "effml", "effml (hook)", "ModelPruning"):
            assert v[key]["logits_rel_diff"] < 1e-5, (row["case"], key)
        g = row["goal"]
        assert g["effml_overhead"] == v["effml"]["overhead"] and g["passed"] == (
            g["within_3_percent"] and g["at_most_half_of_modelpruning"])
    assert "## Goal check" in md and "(not a GPU run" in md and "| effml |" in md
    assert "mask overhead:" in stdout


def test_fp8_training_selects_nothing_on_a_cpu_and_reports_the_goal(results):
    _, (data, md), stdout = results
    assert data["device_type"] == "cpu" and data["meaningful"] is False
    (row,) = data["rows"]
    assert row["model"] == "bert_tiny" and (row["batch"], row["seq"]) == (4, 32)
    # selection never keeps what the device cannot run: the selected model is the dense one
    assert row["selected_kept"] == 0 and row["selected_ratio"] == 1.0 and "selected" not in row["eager"]
    assert all("fp8 needs a CUDA GPU" in d["reason"] for d in row["decisions"])
    # forced: every Linear with widths divisible by 16 (the 2-class classifier is not), timed
    assert row["forced_converted"] == row["linears"] - 1 and row["forced_ratio"] > 0
    goal = row["goal"]["eager"]
    assert goal == {"selected_ratio": 1.0, "kept_goal": None, "never_slower": True}
    assert data["passed"] is True and "compiled" not in row  # --quick: no torch.compile
    assert "n/a (nothing kept)" in md and "## Per-layer selection" in md
    assert "fp8 training: PASS" in stdout
