"""Typed config schema, stored in Hydra's ConfigStore so composition validates every value.

Layout (docs/ARCHITECTURE.md §4): ``conf/config.yaml`` picks one preset per group; each preset's first
defaults entry is the schema it extends (``/schema/<group>/<name>@_here_``), so a typo or a
wrong type fails at composition with the field named. Model, data and compressor schemas come
from the plug-in registries; the trainer, hardware, logger and measurement schemas live here.

Fields that do not change results carry ``metadata={"hash": False}``: the run id skips them
(``effml.identity``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from effml.errors import EffmlError
from effml.kernels.names import KERNELS  # the alternatives a target may allow (effml.kernels.library)

NOT_HASHED = {"hash": False}


def _one_of(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise EffmlError(f"{section}.{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class TrainerConfig:
    """Optimization of every stage (a compressor's stage may override epochs)."""

    max_epochs: int = 10
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1.2e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear (both with warmup)
    warmup_fraction: float = 0.0
    label_smoothing: float = 0.0
    gradient_clip_val: float | None = None
    limit_train_batches: float | None = None  # int-valued floats count batches, <1 a fraction
    limit_val_batches: float | None = None
    limit_test_batches: float | None = None
    val_check_interval: int | None = None  # validate every N training batches (None: once per epoch)
    checkpoint_every_n_steps: int | None = field(default=None, metadata=NOT_HASHED)
    log_every_n_steps: int = field(default=20, metadata=NOT_HASHED)
    progress_bar: str = field(default="auto", metadata=NOT_HASHED)  # auto (tty only) | on | off
    # Lightning's profile of each stage (time per hook: steps, data loading, validation, checkpoints),
    # in <stage>/fit-profile.txt: none | simple | advanced (cProfile)
    profiler: str = field(default="none", metadata=NOT_HASHED)

    def __post_init__(self):
        _one_of("trainer", "optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        _one_of("trainer", "lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        _one_of("trainer", "progress_bar", self.progress_bar, ("auto", "on", "off"))
        _one_of("trainer", "profiler", self.profiler, ("none", "simple", "advanced"))
        if self.val_check_interval is not None and self.val_check_interval < 1:
            raise EffmlError(f"trainer.val_check_interval must be >= 1 batch; got {self.val_check_interval}")
        if self.max_epochs < 1:
            raise EffmlError(f"trainer.max_epochs must be >= 1; got {self.max_epochs}")
        if self.lr <= 0:
            raise EffmlError(f"trainer.lr must be > 0; got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise EffmlError(f"trainer.warmup_fraction must be in [0, 1); got {self.warmup_fraction}")


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
SELECTION = ("measure", "force", "off")


@dataclass
class HardwareConfig:
    """Where and how to run: precision, matmul precision, attention backends, compilation."""

    name: str = field(default="cpu", metadata=NOT_HASHED)
    accelerator: str = "cpu"  # cpu | gpu | auto (auto: the `auto` preset resolves it)
    devices: int = field(default=1, metadata=NOT_HASHED)
    precision: str = "32-true"  # Lightning precision: 32-true | bf16-mixed | 16-mixed | bf16-true
    matmul_precision: str = "highest"  # highest | high (TF32) | medium
    sdpa_backends: list[str] = field(default_factory=lambda: ["flash", "math"])  # preference order
    compile: bool = False
    channel_multiple: int = 1  # structured widths are rounded up to a multiple of this
    fp8_training: bool = False  # torchao float8 Linear layers in training (sm_89+), per `selection` (kernels.fp8_training)
    # Kernel selection (effml.kernels.select). None of it changes training, so none of it is hashed:
    # a sweep over `selection` compares kernels of the same trained model.
    kernels: list[str] = field(default_factory=list, metadata=NOT_HASHED)  # alternatives allowed here
    # measure: time dense vs each alternative on the run's shapes, keep the fastest by `selection_margin`;
    # force: the method's kernel, unmeasured (an error where the device cannot run it); off: stay dense
    selection: str = field(default="measure", metadata=NOT_HASHED)
    selection_margin: float = field(default=1.05, metadata=NOT_HASHED)  # kept only if >= this many x faster
    kernel_cache: str = field(default="~/.cache/effml/kernels.json", metadata=NOT_HASHED)  # "" : no cache

    def __post_init__(self):
        _one_of("hardware", "accelerator", self.accelerator, ("cpu", "gpu", "auto"))
        _one_of("hardware", "selection", self.selection, SELECTION)
        for kernel in self.kernels:
            _one_of("hardware", "kernels", kernel, KERNELS)
        if self.selection_margin < 1:
            raise EffmlError(f"hardware.selection_margin must be >= 1 (an alternative must not be slower); got {self.selection_margin}")
        _one_of("hardware", "matmul_precision", self.matmul_precision, ("highest", "high", "medium"))
        _one_of(
            "hardware", "precision", self.precision,
            ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
        )
        for backend in self.sdpa_backends:
            _one_of("hardware", "sdpa_backends", backend, SDPA_BACKENDS)
        if self.channel_multiple < 1:
            raise EffmlError(f"hardware.channel_multiple must be >= 1; got {self.channel_multiple}")


@dataclass
class LoggerConfig:
    """Experiment loggers; none of this changes results, so none of it is hashed."""

    name: str = "csv"  # csv | tensorboard | wandb | none
    project: str = "effml"
    wandb_mode: str = "offline"  # offline | online | disabled
    entity: str | None = None

    def __post_init__(self):
        _one_of("logger", "name", self.name, ("csv", "tensorboard", "wandb", "none"))
        _one_of("logger", "wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


@dataclass
class MeasureConfig:
    """The dense-vs-compressed speed measurement that ends every run."""

    enabled: bool = True
    batch_size: int = 64
    warmup: int = 3
    iters: int = 20
    min_time_s: float = 0.5
    train_step: bool = True  # also time forward + backward + optimizer step, dense vs compressed


@dataclass
class Config:
    """The whole run. ``name`` is the recipe's name (set by ``recipe=NAME``)."""

    name: str = "custom"
    seed: int = 0
    output_root: str = "outputs"
    model: Any = MISSING
    data: Any = MISSING
    compressor: Any = MISSING
    # more compressors that act together with `compressor`, in this order (docs/ARCHITECTURE.md §3), e.g. in a
    # recipe's defaults `- /compressor@compose.kd: kd`, on the command line `+compressor@compose.kd=kd`
    compose: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)


CORE_SCHEMAS = {"trainer": TrainerConfig, "hardware": HardwareConfig, "logger": LoggerConfig}


def conf_dir() -> Path:
    import effml.conf

    return Path(effml.conf.__file__).parent


def recipes_dir() -> Path:
    import effml.recipes

    return Path(effml.recipes.__file__).parent


def recipe_files() -> dict[str, Path]:
    """Recipe name → file: the shipped ``recipes/`` plus directories in ``$EFFML_RECIPES``."""
    import os

    dirs = [recipes_dir()] + [Path(p) for p in os.environ.get("EFFML_RECIPES", "").split(os.pathsep) if p]
    files = {}
    for d in dirs:
        for path in sorted(d.glob("*.yaml")):
            files[path.stem] = path
    return files


def recipe_problem(path: Path) -> str | None:
    """Why a recipe file cannot be a recipe, in one line naming the file (and the line), or None.

    A broken file in an ``$EFFML_RECIPES`` folder must not break the other recipes: it is left out
    of the store, named when asked for, and flagged by ``effml list recipes``."""
    import yaml

    try:
        node = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        return f"{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})"
    if node is None:
        return f"{path}: empty; a recipe sets at least its defaults"
    if not isinstance(node, dict):
        return f"{path}: a recipe is a mapping of fields (`key: value` lines), not a {type(node).__name__}"
    if "hydra" in node:  # hydra.callbacks / job_logging name classes that Hydra instantiates: code from a file
        return f"{path}: a recipe may not set hydra: options (they can run code); give them on the command line"
    return None


def register_schemas() -> None:
    """Put every schema and recipe into Hydra's ConfigStore (idempotent)."""
    from effml.registry import COMPRESSORS, DATASETS, MODELS

    store = ConfigStore.instance()
    for registry in (MODELS, DATASETS, COMPRESSORS):  # entries() imports every plug-in first
        for entry in registry.entries():
            store.store(group=f"schema/{registry.kind}", name=entry.name, node=entry.config)
    store.store(name="effml_schema", node=Config)
    for group, schema in CORE_SCHEMAS.items():
        store.store(group=f"schema/{group}", name="base", node=schema)
    # Recipes live in recipes/ (not conf/recipe/), so they enter the `recipe` group from here.
    for name, path in recipe_files().items():
        if recipe_problem(path):
            continue  # said when the recipe is asked for (cli.compose.check_choices)
        node = OmegaConf.load(path)
        if "name" not in node:
            node.name = name
        store.store(group="recipe", name=name, node=node, package="_global_")


def to_typed(cfg) -> dict[str, Any]:
    """The composed config's sections as validated dataclasses (runs every ``__post_init__``)."""
    from effml.registry import COMPRESSORS, DATASETS, MODELS

    reject_unknown_keys(cfg)
    for section in ("model", "data", "compressor", "compose", "trainer", "hardware", "measure"):
        if (node := cfg.get(section)) is not None:
            reject_non_finite(OmegaConf.to_container(node, resolve=True), section)
    typed = {
        "model": MODELS.get(cfg.model.name).make_config(cfg.model),
        "data": DATASETS.get(cfg.data.name).make_config(cfg.data),
        "compressor": COMPRESSORS.get(cfg.compressor.name).make_config(cfg.compressor),
        "compose": {key: _composed(key, node) for key, node in cfg.get("compose", {}).items()},
    }
    for section, schema in CORE_SCHEMAS.items():
        typed[section] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg[section]))
    typed["measure"] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MeasureConfig), cfg.measure))
    return typed


def reject_unknown_keys(cfg) -> None:
    """A key that no schema has (``+trainer.max_epoch=1``, ``+compresor=kd``; Hydra's ``+`` adds any
    key) would be silently ignored: one line naming it, with the nearest field."""
    from effml.registry import COMPRESSORS, DATASETS, MODELS

    _reject_unknown(cfg, Config, "", extra={"hydra"})
    sections = {"model": MODELS.get(cfg.model.name).config, "data": DATASETS.get(cfg.data.name).config,
                "compressor": COMPRESSORS.get(cfg.compressor.name).config}
    sections |= {f"compose.{key}": COMPRESSORS.get(node.name).config
                 for key, node in cfg.get("compose", {}).items() if hasattr(node, "get") and node.get("name")}
    for path, schema in sections.items():
        _reject_unknown(OmegaConf.select(cfg, path), schema, f"{path}.")


def _reject_unknown(node: Any, schema: type, prefix: str, extra: frozenset | set = frozenset()) -> None:
    if not OmegaConf.is_dict(node) or not dataclasses.is_dataclass(schema):
        return
    names = {f.name for f in dataclasses.fields(schema)} | set(extra)
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: check this level only
        hints = {}
    for key in node:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            raise EffmlError(f"{prefix}{key} is not a setting of effml{hint}")
        if dataclasses.is_dataclass(hints.get(key)):
            _reject_unknown(node[key], hints[key], f"{prefix}{key}.")


def reject_non_finite(value: Any, path: str) -> None:
    """NaN and infinity are no setting of any field (``trainer.lr=nan`` would train to NaN and
    ``temperature=inf`` would be saved as a finished run): one line naming the field as typed."""
    if isinstance(value, dict):
        for key, item in value.items():
            reject_non_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            reject_non_finite(item, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise EffmlError(f"{path} must be a finite number; got {value}")


def _composed(key: str, node) -> Any:
    """The typed config of ``compose.<key>``: a compressor preset like ``compressor`` itself."""
    from effml.registry import COMPRESSORS

    if not hasattr(node, "get") or not node.get("name"):
        raise EffmlError(f"compose.{key} must be a compressor config with a name (e.g. +compressor@compose.{key}=kd)")
    try:
        return COMPRESSORS.get(node.name).make_config(node)
    except EffmlError as e:  # a config validates as `compressor.<field>`: name the field the user typed
        raise EffmlError(str(e).replace("compressor.", f"compose.{key}.")) from None
