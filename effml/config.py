"""Typed config schema, stored in Hydra's ConfigStore so composition validates every value.

Layout (docs/ARCHITECTURE.md §4): ``conf/config.yaml`` picks one preset per group. A preset is either a
YAML file whose first defaults entry is the schema it extends (``/schema/<group>/<name>@_here_``), for
presets that set values (models, hardware, loggers), or, with no file, a registered config dataclass
itself (``compressor=kd`` is ``KDConfig``'s defaults; ``data=digits`` likewise; ``trainer=default``):
``register_schemas`` stores those as ``<group>/<name>`` (``generated_presets``). Either way a typo or a
wrong type fails at composition with the field named. Model, data and compressor schemas come from the
plug-in registries; the trainer, hardware, logger and measurement schemas live here.

A field whose value is one of a fixed set is typed with a ``Choice`` (``effml.choice``), which composition
checks; the typed dataclass holds its plain string, so hashes and saved files are as with a ``str``.
Fields that do not change results carry ``metadata={"hash": False}``: the run id skips them
(``effml.identity``).

Hydra and OmegaConf are imported where they are used, so this module (and ``HardwareConfig`` with
``effml.kernels.hardware.preset``) works where they are not installed (a GPU node running a benchmark).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effml.choice import check_choices, choice
from effml.errors import EffmlError
from effml.kernels.names import KernelName  # the alternatives a target may allow (effml.kernels.library)

MISSING = "???"  # omegaconf.MISSING, spelled out so that this module does not import OmegaConf
NOT_HASHED = {"hash": False}

Optimizer = choice("Optimizer", "adam adamw sgd")
LrSchedule = choice("LrSchedule", "constant cosine linear")  # cosine and linear with warmup
ProgressBar = choice("ProgressBar", "auto on off")  # auto: on a terminal only
Profiler = choice("Profiler", "none simple advanced")  # advanced: cProfile


@dataclass
class TrainerConfig:
    """Optimization of every stage: Adam at a constant learning rate; every stage trains for max_epochs
    unless its compressor says otherwise."""

    max_epochs: int = 10
    optimizer: Optimizer = Optimizer.adam
    lr: float = 1.2e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_schedule: LrSchedule = LrSchedule.constant
    warmup_fraction: float = 0.0
    label_smoothing: float = 0.0
    gradient_clip_val: float | None = None
    # torch's fused=True: one kernel updates every parameter (CUDA; Adam, AdamW and SGD on the CPU too),
    # instead of several per parameter tensor. Fewer launches, other last bits: hashed.
    fused_optimizer: bool = False
    limit_train_batches: float | None = None  # int-valued floats count batches, <1 a fraction
    limit_val_batches: float | None = None
    limit_test_batches: float | None = None
    val_check_interval: int | None = None  # validate every N training batches (None: once per epoch)
    checkpoint_every_n_steps: int | None = field(default=None, metadata=NOT_HASHED)
    keep_last: bool = field(default=False, metadata=NOT_HASHED)  # keep a finished stage's last.ckpt beside end.pt
    log_every_n_steps: int = field(default=20, metadata=NOT_HASHED)
    progress_bar: ProgressBar = field(default=ProgressBar.auto, metadata=NOT_HASHED)
    # Lightning's profile of each stage (time per hook: steps, data loading, validation, checkpoints),
    # in <stage>/fit-profile.txt
    profiler: Profiler = field(default=Profiler.none, metadata=NOT_HASHED)

    def __post_init__(self):
        check_choices(self, "trainer")
        if self.val_check_interval is not None and self.val_check_interval < 1:
            raise EffmlError(f"trainer.val_check_interval must be >= 1 batch; got {self.val_check_interval}")
        if self.max_epochs < 1:
            raise EffmlError(f"trainer.max_epochs must be >= 1; got {self.max_epochs}")
        if self.lr <= 0:
            raise EffmlError(f"trainer.lr must be > 0; got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise EffmlError(f"trainer.warmup_fraction must be in [0, 1); got {self.warmup_fraction}")


Accelerator = choice("Accelerator", "cpu gpu auto")  # auto: the `auto` preset resolves it
Precision = choice("Precision", "32-true 32 bf16-mixed 16-mixed bf16-true 16-true 64-true")  # Lightning's
MatmulPrecision = choice("MatmulPrecision", "highest high medium")  # high: TF32
SdpaBackend = choice("SdpaBackend", "cudnn flash efficient math")
# measure: time dense vs each alternative on the run's shapes, keep the fastest by `selection_margin`;
# force: the method's kernel, unmeasured (an error where the device cannot run it); off: stay dense
Selection = choice("Selection", "measure force off")
CompileMode = choice("CompileMode", "default reduce-overhead max-autotune max-autotune-no-cudagraphs")  # torch.compile's
# auto: one process, or DDP for more; ddp: Lightning's DDPStrategy; fsdp: its FSDPStrategy (GPUs only)
Strategy = choice("Strategy", "auto ddp fsdp")


@dataclass
class HardwareConfig:
    """Where and how to run: precision, matmul precision, attention backends, compilation."""

    name: str = field(default="cpu", metadata=NOT_HASHED)
    accelerator: Accelerator = Accelerator.cpu
    # Processes per node and nodes (effml.distributed): data.batch_size stays the global batch, so the
    # number of processes changes how a run is computed, not what it computes, and is not hashed.
    devices: int = field(default=1, metadata=NOT_HASHED)
    num_nodes: int = field(default=1, metadata=NOT_HASHED)
    strategy: Strategy = field(default=Strategy.auto, metadata=NOT_HASHED)
    precision: Precision = Precision["32-true"]
    matmul_precision: MatmulPrecision = MatmulPrecision.highest
    sdpa_backends: list[SdpaBackend] = field(default_factory=lambda: [SdpaBackend.flash, SdpaBackend.math])  # preference order
    compile: bool = False
    # torch.compile's mode under `compile`: reduce-overhead replays CUDA graphs (no per-kernel launch
    # cost, for launch-bound steps at fixed shapes: data.pad_to); max-autotune also tunes the kernels
    compile_mode: CompileMode = CompileMode.default
    channel_multiple: int = 1  # structured widths are rounded up to a multiple of this
    fp8_training: bool = False  # torchao float8 Linear layers in training (sm_89+), per `selection` (kernels.fp8_training)
    # Kernel selection (effml.kernels.select). None of it changes training, so none of it is hashed:
    # a sweep over `selection` compares kernels of the same trained model.
    kernels: list[KernelName] = field(default_factory=list, metadata=NOT_HASHED)  # alternatives allowed here
    selection: Selection = field(default=Selection.measure, metadata=NOT_HASHED)
    selection_margin: float = field(default=1.05, metadata=NOT_HASHED)  # kept only if >= this many x faster
    kernel_cache: str = field(default="~/.cache/effml/kernels.json", metadata=NOT_HASHED)  # "" : no cache

    def __post_init__(self):
        check_choices(self, "hardware")
        if self.selection_margin < 1:
            raise EffmlError(f"hardware.selection_margin must be >= 1 (an alternative must not be slower); got {self.selection_margin}")
        if self.channel_multiple < 1:
            raise EffmlError(f"hardware.channel_multiple must be >= 1; got {self.channel_multiple}")
        for name in ("devices", "num_nodes"):
            if getattr(self, name) < 1:
                raise EffmlError(f"hardware.{name} must be >= 1; got {getattr(self, name)}")


LoggerName = choice("LoggerName", "csv tensorboard wandb none")
WandbMode = choice("WandbMode", "offline online disabled")


@dataclass
class LoggerConfig:
    """Experiment loggers; none of this changes results, so none of it is hashed."""

    name: LoggerName = LoggerName.csv
    project: str = "effml"
    wandb_mode: WandbMode = WandbMode.offline
    entity: str | None = None

    def __post_init__(self):
        check_choices(self, "logger")


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
GENERATED_GROUPS = ("compressor", "data", "trainer")  # groups with presets made from schemas (generated_presets)


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


@dataclass(frozen=True)
class GeneratedPreset:
    """A preset without a file: the defaults of the schema ``node``, stored in Hydra's ConfigStore as
    ``<group>/<name>``. ``read_text()`` is the YAML file it stands for (what ``effml list`` reads)."""

    group: str
    name: str
    schema: str  # its schema in the ConfigStore, e.g. schema/compressor/kd
    node: type
    description: str

    @property
    def stem(self) -> str:
        return self.name

    def read_text(self) -> str:
        return f"# {self.description}\ndefaults:\n  - /{self.schema}@_here_\n  - _self_\n"


def config_description(config: type, fallback: str = "") -> str:
    """The first paragraph of a config dataclass's own docstring on one line (the paper and its
    defaults), else ``fallback``."""
    doc = config.__doc__ or ""
    if not doc or doc.startswith(f"{config.__name__}("):  # none written: dataclass made one from the fields
        return fallback
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def generated_presets(group: str) -> dict[str, GeneratedPreset]:
    """The presets of ``group`` that no file holds: one per registered compressor and dataset (its config
    dataclass's defaults), and ``trainer=default``. A YAML file of the same name in ``conf/<group>/``
    (a preset that sets values) is the preset instead."""
    from effml.registry import COMPRESSORS, DATASETS

    if group == "trainer":
        made = [GeneratedPreset("trainer", "default", "schema/trainer/base", TrainerConfig,
                                config_description(TrainerConfig))]
    elif group in (COMPRESSORS.kind, DATASETS.kind):
        registry = COMPRESSORS if group == COMPRESSORS.kind else DATASETS
        made = [GeneratedPreset(group, e.name, f"schema/{group}/{e.name}", e.config,
                                config_description(e.config, e.description)) for e in registry.entries()]
    else:
        return {}
    files = {path.stem for path in (conf_dir() / group).glob("*.yaml")}
    return {preset.name: preset for preset in made if preset.name not in files}


def preset_values(group: str, name: str) -> dict[str, Any]:
    """A YAML preset's own values: ``conf/<group>/<name>.yaml`` without its defaults list, read with
    PyYAML (no Hydra or OmegaConf; ``effml.kernels.hardware.preset`` types and validates them)."""
    import yaml

    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise EffmlError(f"no {group} preset '{name}' ({path} does not exist)")
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("defaults", None)
    return values


def register_schemas() -> None:
    """Put every schema, generated preset and recipe into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from effml.registry import COMPRESSORS, DATASETS, MODELS

    store = ConfigStore.instance()
    for registry in (MODELS, DATASETS, COMPRESSORS):  # entries() imports every plug-in first
        for entry in registry.entries():
            store.store(group=f"schema/{registry.kind}", name=entry.name, node=entry.config)
    store.store(name="effml_schema", node=Config)
    for group, schema in CORE_SCHEMAS.items():
        store.store(group=f"schema/{group}", name="base", node=schema)
    for group in GENERATED_GROUPS:
        for preset in generated_presets(group).values():
            store.store(group=group, name=preset.name, node=preset.node)
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
    from omegaconf import OmegaConf

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
    from omegaconf import OmegaConf

    from effml.registry import COMPRESSORS, DATASETS, MODELS

    _reject_unknown(cfg, Config, "", extra={"hydra"})
    sections = {"model": MODELS.get(cfg.model.name).config, "data": DATASETS.get(cfg.data.name).config,
                "compressor": COMPRESSORS.get(cfg.compressor.name).config}
    sections |= {f"compose.{key}": COMPRESSORS.get(node.name).config
                 for key, node in cfg.get("compose", {}).items() if hasattr(node, "get") and node.get("name")}
    for path, schema in sections.items():
        _reject_unknown(OmegaConf.select(cfg, path), schema, f"{path}.")


def _reject_unknown(node: Any, schema: type, prefix: str, extra: frozenset | set = frozenset()) -> None:
    from omegaconf import OmegaConf

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
