"""Registries of models, datasets and compressors.

Every plug-in registers itself with a typed config dataclass. ``effml.config.register_schemas`` puts
those dataclasses into Hydra's ConfigStore (group ``schema/<kind>``), so the YAML presets in
``conf/<kind>/`` are validated against them at composition time: a typo or a wrong type fails before
any work. A registered compressor or dataset is also a preset of its own group (``compressor=<name>``,
``data=<name>``: its dataclass's defaults), with no file (``effml.config.generated_presets``). The
registries themselves do not import Hydra or OmegaConf, so a model or a compressor can be used from
code where they are not installed (a GPU node running a benchmark).

Lookups import every plug-in module first (``load_plugins``), so nothing depends on an import
having happened somewhere else.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from effml import choice
from effml.errors import EffmlError

PLUGIN_PACKAGES = ("effml.models", "effml.data", "effml.compressors")


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any  # the class or builder function
    config: type  # the config dataclass
    description: str
    kind: str = ""  # the registry's: model, data or compressor (names a config's fields in errors)

    def make_config(self, values: Any = None) -> Any:
        """The typed config from a (Dict)Config or dict; runs the dataclass validation."""
        from omegaconf import OmegaConf

        if values is None:
            return self.config()
        if dataclasses.is_dataclass(values) and not isinstance(values, type):
            return values
        try:
            merged = OmegaConf.merge(OmegaConf.structured(self.config), values)
        except ValueError as e:  # OmegaConf's ValidationError: a value outside a field's choices
            if message := choice.explain(e, prefix=f"{self.kind}."):
                raise EffmlError(message) from None
            raise
        return OmegaConf.to_object(merged)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type, description: str | None = None):
        """Decorator: ``@MODELS.register("lenet_300_100", LeNetConfig)``."""

        def wrap(target):
            if name in self._entries and self._entries[name].target is not target:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            summary = description or next(iter((target.__doc__ or "").strip().splitlines()), "")
            self._entries[name] = Entry(name, target, config, summary, self.kind)
            return target

        return wrap

    def get(self, name: str) -> Entry:
        load_plugins()
        if name not in self._entries:
            raise EffmlError(f"unknown {self.kind} '{name}'; choose from: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]


MODELS = Registry("model")
DATASETS = Registry("data")
COMPRESSORS = Registry("compressor")

_loaded = False


def load_plugins() -> None:
    """Import every module of the plug-in packages once, so each registers itself."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package_name in PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
