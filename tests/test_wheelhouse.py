"""``make wheelhouse``, then an install from it into a fresh venv with no index (how an air-gapped
cluster node gets effml), then a tiny run there. The node brings its own torch (the wheelhouse leaves
torch out): here, this environment's torch, seen by the new venv through a .pth file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # minutes: ~120 downloads, then an install of them


def registry_reachable(tmp_path: Path) -> bool:
    probe = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "-d", str(tmp_path / "probe"), "idna"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def node_torch(folder: Path) -> Path:
    """The node's own torch build and what it needs at import (its setuptools requirement), as links."""
    folder.mkdir()
    site = Path(torch.__file__).parent.parent
    names = ["torch", "torchgen", "functorch", "setuptools", "_distutils_hack", "pkg_resources"]
    found = [site / n for n in names] + list(site.glob("torch-*.dist-info")) + list(site.glob("setuptools-*.dist-info"))
    for path in found:
        if path.exists():
            (folder / path.name).symlink_to(path)
    return folder


def make_wheelhouse(tmp_path: Path) -> Path:
    """``make wheelhouse`` for this Python, or the one $EFFML_WHEELHOUSE names (made already, e.g. offline)."""
    if os.environ.get("EFFML_WHEELHOUSE"):
        return Path(os.environ["EFFML_WHEELHOUSE"])
    if not (Path(sys.prefix) / ".installed").exists():
        pytest.skip("make wheelhouse needs the venv that make setup made")
    if not registry_reachable(tmp_path):
        pytest.skip("the package registry is unreachable: make wheelhouse downloads the wheels from it "
                    "(or set EFFML_WHEELHOUSE to a wheelhouse made already)")
    wheelhouse = tmp_path / "wheelhouse"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run(["make", "-C", str(REPO), "wheelhouse", f"VENV={sys.prefix}", f"WHEELHOUSE={wheelhouse}",
                           f"WHEEL_PYTHON={python}"], capture_output=True, text=True, timeout=1800)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert "the node needs it from elsewhere" not in made.stdout, made.stdout  # every package has its wheel
    return wheelhouse


def test_an_offline_venv_installs_effml_from_the_wheelhouse_and_trains(tmp_path):
    wheelhouse = make_wheelhouse(tmp_path)
    assert list(wheelhouse.glob("effml-*.whl")) and not list(wheelhouse.glob("torch-*.whl"))

    venv = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    node_python = venv / "bin" / "python"
    purelib = subprocess.run([str(node_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "node_torch.pth").write_text(str(node_torch(tmp_path / "node_torch")) + "\n")
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PYTHONPATH": ""}
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(node_python), "install", "-q",
                                "--no-index", "--find-links", str(wheelhouse), "effml[embedded]"],
                               capture_output=True, text=True, env=offline, timeout=1800)
    assert installed.returncode == 0, installed.stderr[-3000:]

    # the installed effml, not this checkout: run from elsewhere, with no PYTHONPATH
    where = subprocess.run([str(node_python), "-c", "import effml, torch_pruning, torchao, torchmetrics; "
                            "print(effml.__file__)"], capture_output=True, text=True, cwd=tmp_path, env=offline)
    assert where.returncode == 0 and where.stdout.startswith(purelib), where.stdout + where.stderr[-2000:]
    run = subprocess.run([str(venv / "bin" / "effml"), "train", "recipe=magnitude_lenet", "data=digits",
                          "data.train_subset=256", "trainer.max_epochs=1", "trainer.progress_bar=off",
                          "measure.enabled=false", "trainer.limit_test_batches=2"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900,
                         env={**offline, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert list((tmp_path / "outputs").rglob("metrics.json"))
