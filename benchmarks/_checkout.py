"""Let a benchmark import ``effml`` from this checkout when it is not installed.

A GPU node often has torch and transformers but not effml (nor Hydra). The repository's top-level
folders are then mapped into the ``effml`` package, as pyproject's package-dir does at install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    if importlib.util.find_spec("effml") is None:  # not installed: this checkout
        sys.path.insert(0, str(REPO))
    import effml

    if importlib.util.find_spec("effml.compressors") is None:  # checkout on sys.path: map its folders
        effml.__path__.append(str(REPO))
