"""Code run from the repository root imports what an installed effml imports.

`python -m pytest`, `python -m effml.cli.main` and `python -c` put the working directory first on
``sys.path``, so a top-level folder with an ``__init__.py`` shadows any installed module of the same
name. A top-level ``kernels/`` once hid the PyPI package ``kernels`` that transformers 5 imports as
soon as a BERT model loads, and every BERT test failed on a fresh machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import packages_distributions

from conftest import REPO, TINY

# The card's top-level packages: effml itself, and the folders installed as effml.cli, ...
TOP_LEVEL_PACKAGES = {"effml", "cli", "compressors", "conf", "recipes"}


def importable_top_level() -> set[str]:
    """Names that ``import NAME`` would find in the repository root (regular packages and modules)."""
    packages = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in REPO.glob("*.py")}
    return packages | modules


def test_no_top_level_folder_shadows_an_installed_module():
    installed = packages_distributions()  # top-level module name -> distributions that provide it
    shadowing = {name: set(installed.get(name, [])) - {"effml"} for name in importable_top_level()}
    shadowing = {name: others for name, others in shadowing.items() if others}
    assert not shadowing, f"repository folders shadow installed modules: {shadowing}"


def test_only_the_cards_folders_are_importable_from_the_root():
    # Anything else (kernels/, models/, data/ once) belongs under effml/: a new top-level package
    # would shadow whatever PyPI package of that name a future dependency brings.
    assert importable_top_level() == TOP_LEVEL_PACKAGES


def test_bert_forward_through_python_m_from_the_repo_root(tmp_path):
    """transformers imports the PyPI ``kernels`` when a BERT model loads: from the root it must be
    the installed one. A real MiniLM-L6 fine-tuning run, shrunk to a few batches."""
    run = subprocess.run(
        [sys.executable, "-m", "effml.cli.main", "train", "recipe=bert_finetune", f"output_root={tmp_path}",
         *TINY, "data.train_subset=16", "data.batch_size=8", "data.max_length=32", "trainer.max_epochs=1",
         "measure.enabled=false"],  # the import path is the point, not the speed
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (metrics,) = tmp_path.rglob("metrics.json")
    assert json.loads(metrics.read_text())["test_acc"] > 0
    find = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    where = subprocess.run([sys.executable, "-c", find], cwd=REPO, capture_output=True, text=True, check=True)
    assert not where.stdout.startswith(str(REPO / "kernels")), where.stdout


def test_models_and_compressors_import_without_hydra():
    """A GPU node may have torch, transformers and Lightning but no Hydra: the benchmarks import the
    model and the compressors' helpers instead of copying them (benchmarks/structured_bert.py)."""
    code = ("import sys\n"
            "from effml.models.bert import BertClassifier\n"
            "from effml.compressors.earlybert import heads_kept\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'datasets', 'wandb'}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
