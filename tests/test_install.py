"""A NON-editable ``pip install .`` into a fresh virtualenv gives a working ``effml`` in any
directory: configs and recipes ship inside the package."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import REPO

IGNORE = shutil.ignore_patterns(".venv", ".git", "outputs", "wheelhouse", "build", "*.egg-info", "__pycache__")


@pytest.mark.e2e
def test_non_editable_install_runs_from_anywhere(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=IGNORE)
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    # The dependencies come from this environment (a .pth line adds its site-packages after the fresh
    # one's); effml itself is built and installed from a copy of the source, not linked to it.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(source)],
                   check=True, capture_output=True)
    shutil.rmtree(source)  # nothing may still point at the source tree

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    effml = env_dir / "bin" / "effml"
    where = subprocess.check_output([python, "-c", "import effml.conf, effml.cli; print(effml.conf.__file__)"],
                                    cwd=elsewhere, text=True)
    assert where.startswith(site), where
    listing = subprocess.run([effml, "list", "recipes"], cwd=elsewhere, capture_output=True, text=True)
    assert listing.returncode == 0 and "magnitude_lenet" in listing.stdout, listing.stderr
    train = subprocess.run(
        [effml, "train", "recipe=magnitude_lenet", "data=digits", "trainer.max_epochs=1", "trainer.progress_bar=off",
         "measure.iters=2", "measure.min_time_s=0"],
        cwd=elsewhere, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert list((elsewhere / "outputs" / "magnitude_lenet").rglob("metrics.json"))
    bad = subprocess.run([effml, "train", "recipe=nope"], cwd=elsewhere, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1




def test_wheelhouse_leaves_out_only_the_nodes_own_torch_stack():
    """torch-pruning, torchao and torchmetrics start with "torch" but are dependencies the node lacks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wheelhouse", Path(__file__).parents[1] / "tools" / "wheelhouse.py")
    wheelhouse = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheelhouse)
    assert all(map(wheelhouse.skipped, ["torch", "triton", "nvidia-cublas-cu12", "pytest-xdist", "effml"]))
    assert not any(map(wheelhouse.skipped, ["torch-pruning", "torch_pruning", "torchao", "torchmetrics", "lightning"]))
