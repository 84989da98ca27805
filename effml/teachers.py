"""Teachers for distillation: where they come from, how they are called, how features are tapped.

A teacher is named in a distillation compressor's config (``compressor.teacher``):

- ``source: stage`` — trained in this run, as a ``prepare`` stage before the student's (architecture
  from ``teacher.model``, e.g. ``{name: conv, depth: 6}``); resumable like every stage;
- ``source: run`` — a finished effml run directory (``path``): its ``config.yaml`` gives the
  architecture, its ``model.pt`` (or ``model/`` export of a structurally pruned BERT) the weights;
- ``source: recipe`` — the finished run of ``recipe`` (``seed``, default the student's). When several
  configurations of the recipe finished, the one trained on the student's data with the recipe's own
  compressor is taken; ``hash`` names any other;
- ``source: checkpoint`` — a ``.ckpt`` (Lightning) or ``.pt`` (state dict, or an effml ``end.pt``)
  file at ``path``, architecture from ``teacher.model``;
- ``source: hf`` — a Hugging Face sequence classifier (hub id or directory at ``path``; ``minilm_l6``
  is the embedded MiniLM-L6). A checkpoint without a trained classification head (MiniLM-L6 is a
  sentence encoder) serves feature distillation only: methods that need its logits refuse it.

The teacher is frozen: ``Teacher.__call__`` runs it in eval mode under ``no_grad``. Intermediate
features of teacher or student are tapped by module path with forward hooks (``FeatureTap``) that
are removed when the tap closes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from effml import safe_load
from effml.errors import EffmlError
from effml.paths import RunDir, runs_of

SOURCES = ("stage", "run", "recipe", "checkpoint", "hf")


@dataclass
class TeacherConfig:
    source: str = "stage"  # stage | run | recipe | checkpoint | hf
    path: str | None = None  # run: run directory; checkpoint: file; hf: hub id or directory (or minilm_l6)
    recipe: str | None = None  # recipe: the recipe whose finished run is the teacher
    hash: str | None = None  # recipe: which configuration (outputs/<recipe>/<hash>), when several finished
    seed: int | None = None  # recipe: the teacher run's seed (None: the student's)
    model: Any = None  # stage | checkpoint: the architecture, a model config, e.g. {name: conv, depth: 6}
    epochs: int | None = None  # stage: teacher training epochs (None: trainer.max_epochs)
    lr_scale: float = 1.0  # stage: the teacher's learning rate is trainer.lr times this

    def __post_init__(self):
        if self.source not in SOURCES:
            raise EffmlError(f"compressor.teacher.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.epochs is not None and self.epochs < 1:
            raise EffmlError(f"compressor.teacher.epochs must be >= 1; got {self.epochs}")

    def check_complete(self) -> None:
        """The fields its source needs (not in ``__post_init__``: the defaults name no teacher yet)."""
        needs = {"run": "path", "checkpoint": "path", "hf": "path", "recipe": "recipe"}.get(self.source)
        if needs and not getattr(self, needs):
            raise EffmlError(f"compressor.teacher.{needs} is needed for teacher.source={self.source}")
        if self.source in ("stage", "checkpoint") and not (self.model or {}).get("name"):
            raise EffmlError(
                f"compressor.teacher.model needs the teacher's architecture for teacher.source={self.source}, "
                "e.g. compressor.teacher.model={name: conv, depth: 6}"
            )

    def describe(self) -> str:
        if self.source == "stage":
            return f"stage:{(self.model or {}).get('name')}"
        if self.source == "recipe":
            return f"recipe:{self.recipe}" + (f"/{self.hash}" if self.hash else "")
        return f"{self.source}:{self.path}"


# -- loading ---------------------------------------------------------------------------------
def build_teacher(cfg: TeacherConfig, datamodule, output_root: str | Path = "outputs", seed: int = 0,
                  data: Any = None) -> nn.Module:
    """The teacher module for ``cfg`` (trainable for ``stage``, frozen otherwise); one-line errors.
    ``data`` is the asking run's data config, which picks among several configs of a recipe."""
    cfg.check_complete()
    if cfg.source == "stage":
        return build_model(cfg.model, datamodule.info)
    if cfg.source == "hf":
        return frozen(HFClassifier.load(cfg.path, datamodule.info.num_classes))
    if cfg.source == "checkpoint":
        model = build_model(cfg.model, datamodule.info)
        load_weights(model, read_state_dict(Path(cfg.path)), cfg.path)
        return frozen(model)
    run = RunDir(Path(cfg.path)) if cfg.source == "run" else find_recipe_run(cfg, output_root, seed, data=data)
    return frozen(load_run(run, datamodule.info))


def build_model(values: Any, info) -> nn.Module:
    """A model from a model config (a dict or DictConfig with ``name``), shaped for ``info``'s data."""
    from effml.registry import MODELS

    values = OmegaConf.create(OmegaConf.to_container(values) if OmegaConf.is_config(values) else dict(values))
    entry = MODELS.get(values.name)
    return entry.target.from_config(entry.make_config(values), info)


def load_run(run: RunDir, info, who: str = "teacher") -> nn.Module:
    """The finalized model of a finished effml run (``who`` names it in errors)."""
    if not run.config.is_file():
        raise EffmlError(f"{who} run {run.path} not found (no config.yaml there)")
    model_cfg = OmegaConf.load(run.config).model
    if (run.export / "config.json").is_file():  # a structurally pruned BERT (EarlyBERT, ...) exports itself
        model_cfg.pretrained = str(run.export)
    weights = run.model
    if not weights.is_file():
        ends = run.finished_stages()
        if not run.finished or not ends:
            raise EffmlError(f"{who} run {run.path} has not finished; finish it first (rerun its command)")
        weights = ends[-1].end  # a run from before model.pt was written: its last stage's weights
    model = build_model(model_cfg, info)
    load_weights(model, read_state_dict(weights, who), str(weights), who)
    return model


def find_recipe_run(cfg: TeacherConfig, output_root: str | Path, seed: int, who: str = "teacher",
                    field: str = "teacher", data: Any = None) -> RunDir:
    """The finished run of ``cfg.recipe`` (``field`` is where ``cfg`` sits in the config, for the hint).
    When several configs of the recipe finished, ``data`` (the asking run's data config) picks the
    one trained on the same data with the recipe's own compressor (``recipe_as_written``)."""
    seed = seed if cfg.seed is None else cfg.seed
    runs = runs_of(output_root, cfg.recipe, seed, cfg.hash)
    if not runs:
        raise EffmlError(
            f"{who}: no finished run of recipe {cfg.recipe} (seed {seed}) under {output_root}/{cfg.recipe}; "
            f"train it first: effml train recipe={cfg.recipe} seed={seed}"
        )
    if len(runs) > 1 and data is not None:
        runs = recipe_as_written(runs, data)
    if len(runs) > 1:
        hashes = ", ".join(r.hash for r in runs)
        raise EffmlError(f"{who}: recipe {cfg.recipe} has finished runs of several configs ({hashes}); set {field}.hash")
    return runs[0]


def recipe_as_written(runs: list[RunDir], data: Any) -> list[RunDir]:
    """Of several finished configs of one recipe, those trained on ``data`` (by identity), and of
    those, the ones whose command left the recipe's compressor alone. A table's runs share one outputs
    folder: its QAT series must load the plain fine-tuned ``bert_finetune``, not the magnitude-pruned
    ``bert_finetune compressor=magnitude`` of another series, nor one fine-tuned on other data."""
    from effml.identity import non_default_values

    want = json.loads(json.dumps(non_default_values(data)))  # as run.json holds it (tuples become lists)
    records = [(run, _record(run)) for run in runs]  # each read once
    same_data = [(run, rec) for run, rec in records if rec.get("identity", {}).get("data") == want]
    as_written = [run for run, rec in same_data if not any(map(_sets_compressor, rec.get("command", "").split()))]
    return as_written or [run for run, _ in same_data] or runs


def _record(run: RunDir) -> dict:
    try:
        return json.loads(run.run_record.read_text())
    except (OSError, ValueError):
        return {}


def _sets_compressor(override: str) -> bool:
    return override.lstrip("+~").startswith(("compressor=", "compressor.", "compose.", "compose="))


def read_state_dict(path: Path, who: str = "teacher") -> dict[str, Tensor]:
    """Weights from a Lightning ``.ckpt``, an effml ``end.pt`` or a plain state dict; masks folded in."""
    if not path.is_file():
        raise EffmlError(f"{who} checkpoint {path} not found")
    state = safe_load.load(path, f"{who} checkpoint")  # tensors and plain data only: no code runs
    if isinstance(state, dict) and "state_dict" in state:  # Lightning: the task's keys, model.<...>
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):  # effml end.pt
        state = state["model"]
    if not isinstance(state, dict):
        raise EffmlError(f"{who} checkpoint {path} holds no state dict")
    return fold_masks(state)


def fold_masks(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``X_orig * X_mask`` → ``X``: a pruned model's weights as the plain model has them."""
    out = {}
    for key, value in state.items():
        if key.endswith("_mask") and key.removesuffix("_mask") + "_orig" in state:
            continue
        if key.endswith("_orig") and key.removesuffix("_orig") + "_mask" in state:
            out[key.removesuffix("_orig")] = value * state[key.removesuffix("_orig") + "_mask"]
        else:
            out[key] = value
    return out


def load_weights(model: nn.Module, state: dict[str, Tensor], where: str, who: str = "teacher") -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise EffmlError(
                f"{who} weights in {where} do not fit: {key} is {tuple(value.shape)}, the model's is "
                f"{tuple(own[key].shape)} (another architecture, or another number of classes?)"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise EffmlError(f"{who} weights in {where} do not fit the {who}'s architecture ({what})")


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_outputs(teacher: nn.Module, datamodule, what: str = "teacher") -> None:
    """The teacher's logits must have one entry per class of the student's data."""
    inputs = datamodule.example_inputs(2)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    with torch.no_grad():
        logits = teacher.eval()(**{k: v.to(device) for k, v in inputs.items()})
    teacher.train(was_training)
    classes = datamodule.info.num_classes
    if logits.shape[-1] != classes:
        raise EffmlError(f"{what} gives {logits.shape[-1]} outputs, but the data has {classes} classes")


class HFClassifier(nn.Module):
    """A transformers sequence classifier returning logits, with module paths as effml's BERT
    (``bert.encoder.layer.N``), so features tap the same way in teacher and student."""

    def __init__(self, hf_model: nn.Module, trained_head: bool):
        super().__init__()
        self.hf = hf_model
        self.trained_head = trained_head

    @classmethod
    def load(cls, name: str, num_classes: int) -> HFClassifier:
        import transformers
        from transformers import AutoModelForSequenceClassification

        from effml.models.bert import MINILM, _from_hub, _source

        source, local_only = _source(name, verify=name == MINILM)
        transformers.logging.set_verbosity_error()  # its load report: we say ourselves what a missing head means
        model, info = _from_hub(
            AutoModelForSequenceClassification.from_pretrained, name, source, local_only,
            num_labels=num_classes, output_loading_info=True, attn_implementation="eager",
        )
        head_missing = any("classifier" in k for k in info["missing_keys"]) or bool(info["mismatched_keys"])
        return cls(model, trained_head=not head_missing)

    @property
    def bert(self) -> nn.Module:
        return self.hf.base_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **extra) -> Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


# -- calling and tapping -----------------------------------------------------------------------
class Teacher:
    """A frozen teacher: called in eval mode under ``no_grad`` on the student's device."""

    def __init__(self, module: nn.Module):
        self.module = module

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor]) -> Tensor:
        device = next(iter(inputs.values())).device
        if next(self.module.parameters()).device != device:
            self.module.to(device)
        self.module.eval()
        return self.module(**inputs)


def find_module(model: nn.Module, path: str, who: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise EffmlError(f"{who} has no module '{path}'") from None


class FeatureTap:
    """Outputs of named submodules, captured by forward hooks on every forward until ``close()``.

    ``tap.features[path]`` is the module's output (the first element when it returns a tuple)."""

    def __init__(self, model: nn.Module, paths: list[str], who: str = "model"):
        self.features: dict[str, Any] = {}
        self.handles = [find_module(model, p, who).register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str):
        def capture(module, args, output):
            self.features[path] = output[0] if isinstance(output, tuple) else output

        return capture

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.features = {}

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- trained weights to start from (methods that compress a trained model: ptq, qat, nm_sparsity) --
WEIGHT_SOURCES = {"none": None, "run": "path", "recipe": "recipe", "checkpoint": "path"}  # → the field it needs


@dataclass
class TrainedWeightsConfig:
    """The finished model a method starts from, found as teachers are: ``none`` (trained in this
    run), ``run`` (a finished run directory, ``path``), ``recipe`` (the finished run of ``recipe``,
    this run's seed unless ``seed``; ``hash`` when several configs finished) or ``checkpoint`` (a
    ``.ckpt`` / ``end.pt`` / state-dict file at ``path``, of this run's architecture)."""

    source: str = "none"
    path: str | None = None
    recipe: str | None = None
    hash: str | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.source not in WEIGHT_SOURCES:
            raise EffmlError(f"compressor.weights.source must be one of {', '.join(WEIGHT_SOURCES)}; got {self.source!r}")
        needs = WEIGHT_SOURCES[self.source]
        if needs and not getattr(self, needs):
            raise EffmlError(f"compressor.weights.{needs} is needed for weights.source={self.source}")

    def describe(self) -> str:
        if self.source == "none":
            return "trained in this run"
        if self.source == "recipe":
            return f"recipe:{self.recipe}" + (f"/{self.hash}" if self.hash else "")
        return f"{self.source}:{self.path}"


def trained_state(cfg: TrainedWeightsConfig, output_root: str | Path, seed: int, info,
                  who: str, data: Any = None) -> tuple[dict[str, torch.Tensor], str, RunDir | None]:
    """The state dict of the model ``cfg`` names, where it came from, and its run directory (None
    for a checkpoint); ``who`` names it in errors ("dense model", "trained model")."""
    if cfg.source == "checkpoint":
        return read_state_dict(Path(cfg.path), who), cfg.path, None
    run = RunDir(Path(cfg.path)) if cfg.source == "run" else find_recipe_run(cfg, output_root, seed, who, "compressor.weights", data)
    return load_run(run, info, who).state_dict(), str(run.path), run

