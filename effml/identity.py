"""Run identity: ``<output_root>/<recipe>/<hash>/seed_<n>``.

The hash covers the values that change results (model, data, compressor, training, kernel
choices), counting only values that differ from their schema's defaults, so adding a field with a
default renames no existing run (open_lth's scheme). Fields marked ``metadata={"hash": False}``
(paths, workers, loggers, device count) never count; the seed is its own path level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from effml.paths import RunDir

HASHED_SECTIONS = ("model", "data", "compressor", "trainer", "hardware")


def non_default_values(obj: Any) -> dict[str, Any]:
    """The dataclass's hashed fields whose values differ from the class defaults; the ``name``
    field always counts, because it selects the schema."""
    defaults = type(obj)()
    diff = {}
    for f in dataclasses.fields(obj):
        if not f.metadata.get("hash", True):
            continue
        value = getattr(obj, f.name)
        if f.name == "name" or value != getattr(defaults, f.name):
            diff[f.name] = _plain(value)
    return diff


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def identity(typed: dict[str, Any]) -> dict[str, Any]:
    """What the hash is computed from (saved as identity.json so a person can read it)."""
    ident = {section: non_default_values(typed[section]) for section in HASHED_SECTIONS}
    if typed.get("compose"):  # only when used, so runs without composed compressors keep their ids
        ident["compose"] = {key: non_default_values(cfg) for key, cfg in typed["compose"].items()}
    return ident


def config_hash(typed: dict[str, Any]) -> str:
    text = json.dumps(identity(typed), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_dir(output_root: str | Path, name: str, typed: dict[str, Any], seed: int) -> RunDir:
    return RunDir.of(output_root, name, config_hash(typed), seed)
