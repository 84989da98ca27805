"""One run, top to bottom (docs/ARCHITECTURE.md §2):

    plan → build → for each stage: skip if finished, else fit (resuming from last.ckpt)
         → finalize → test → measure dense vs compressed → metrics.json

A stage is finished when ``stages/<NN_name>/end.pt`` exists (written atomically after its fit);
a run is finished when ``metrics.json`` exists, and is then never touched again.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import random
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, OmegaConf

from effml import identity, measure, report, safe_load
from effml.compressors.base import Compressor, RunContext, Stage, refuse_conflicts
from effml.config import to_typed
from effml.errors import EffmlError, Interrupted
from effml.kernels import fp8_training, select
from effml.kernels import hardware as hw
from effml.registry import COMPRESSORS, DATASETS, MODELS
from effml.task import ClassificationTask

log = logging.getLogger("effml")


@dataclass
class Plan:
    """Everything decided before any work: typed configs, the target, the run directory."""

    cfg: DictConfig
    typed: dict[str, Any]
    run_dir: Path
    group: str | None = None
    attention: dict[str, Any] | None = None  # the measured SDPA choice (effml.kernels.select)
    training_kernels: list[dict] = dataclasses.field(default_factory=list)  # fp8 training, layer by layer

    @property
    def name(self) -> str:
        return self.cfg.name

    def context(self) -> RunContext:
        t = self.typed
        return RunContext(name=self.name, seed=int(self.cfg.seed), run_dir=self.run_dir,
                          output_root=Path(self.cfg.output_root), hardware=t["hardware"], model=t["model"],
                          data=t["data"], trainer=t["trainer"], measure=t["measure"],
                          sections=MappingProxyType(dict(t)))


def plan(cfg: DictConfig, group: str | None = None) -> Plan:
    """Validate the composed config and decide where the run lives; writes nothing."""
    typed = to_typed(cfg)
    composed_configs(typed)  # a pair that cannot compose is refused here, before anything is written
    typed["hardware"] = hw.resolve(typed["hardware"])
    return Plan(cfg, typed, identity.run_dir(cfg.output_root, cfg.name, typed, cfg.seed), group)


def run(cfg: DictConfig, group: str | None = None) -> dict:
    p = plan(cfg, group)
    metrics_path = p.run_dir / "metrics.json"
    if metrics_path.exists():
        print(f"effml: {p.name} (seed {cfg.seed}) finished already; results in {metrics_path}")
        return report.load_metrics(metrics_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6 builds LeafSpec(), which torch 2.13 deprecates: nothing a user of effml can act on
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        built = build(p)  # data and model load before anything is written: a failure leaves no trace
        p.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(p.run_dir), run_log(p.run_dir):
            return execute(p, built)


@dataclass
class Built:
    datamodule: Any
    task: ClassificationTask
    compressors: list[Compressor]
    dense_reference: torch.nn.Module  # the uncompressed architecture, for side-by-side speed


def build(p: Plan) -> Built:
    t = p.typed
    L.seed_everything(p.cfg.seed, workers=True, verbose=False)
    model_entry = MODELS.get(t["model"].name)
    tokenizer_for = getattr(model_entry.target, "tokenizer_for", None)
    datamodule = DATASETS.get(t["data"].name).target(
        t["data"], seed=p.cfg.seed, tokenizer=tokenizer_for(t["model"]) if tokenizer_for else None
    )
    datamodule.setup()
    model = model_entry.target.from_config(t["model"], datamodule.info)
    dense_reference = copy.deepcopy(model)
    compressors = make_compressors(t)
    for compressor in compressors:
        model = compressor.attach(model)
    if t["hardware"].fp8_training:  # before any checkpoint loads: Float8Linear keeps the weights' names
        batch = datamodule.example_inputs(t["data"].batch_size)
        p.training_kernels = [d.as_dict() for d in fp8_training.apply(model, t["hardware"], batch)]
    context = p.context()
    for compressor in compressors:
        compressor.prepare(context, datamodule)
    return Built(datamodule, ClassificationTask(model, t["trainer"], compressors), compressors, dense_reference)


def composed_configs(typed: dict) -> list[Any]:
    """``compressor`` and then every ``compose`` entry, in order: each name at most once, and no two
    whose owned things conflict (``Compressor.owns``, ``compressors.base.CONFLICTS``)."""
    configs = [typed["compressor"], *typed.get("compose", {}).values()]
    configs = [c for c in configs if c.name != "none" or len(configs) == 1]
    names = [c.name for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EffmlError(f"compressor {twice[0]} appears twice (in compressor and compose); use it once")
    refuse_conflicts(names, [COMPRESSORS.get(name).target for name in names])
    return configs


def make_compressors(typed: dict) -> list[Compressor]:
    return [COMPRESSORS.get(c.name).target(c) for c in composed_configs(typed)]


def execute(p: Plan, b: Built) -> dict:
    select_attention(p, b)
    save_run_record(p)
    records = train_stages(p, b.task, b.datamodule, b.compressors)
    for compressor in b.compressors:
        b.task.model = compressor.finalize(b.task.model, p.typed["hardware"])
    deployed = b.task.model
    for compressor in b.compressors:
        deployed = compressor.deployable(deployed)
    save_model(p.run_dir, deployed)
    final = evaluate(p, b.task, b.datamodule)
    metrics = assemble_metrics(p, b, records, final, deployed)
    report.write_metrics(p.run_dir / "metrics.json", metrics)
    report.print_summary(metrics)
    return metrics


def select_attention(p: Plan, b: Built) -> None:
    """Under ``hardware.selection=measure``, order the SDPA backends by their measured time on this
    model's own attention call (training batch shape), fastest first; record why."""
    h = p.typed["hardware"]
    if h.selection != "measure":
        return
    call = select.capture_attention_call(b.task.model, b.datamodule.example_inputs(p.typed["data"].batch_size))
    if call is None:  # no attention in this model
        return
    order, decision = select.measured_sdpa_order(call, h, hw.sdpa_choice(h))
    p.typed["hardware"] = dataclasses.replace(h, sdpa_backends=order)
    p.attention = decision.as_dict()
    log.info("attention: %s (%s)", order, decision.reason)


def kernel_record(p: Plan, compressors: list[Compressor] = ()) -> dict[str, Any]:
    """The run's kernel choices: hardware settings, the attention decision, every converted layer."""
    record = hw.kernel_choices(p.typed["hardware"])
    if p.attention:
        record["attention"] = p.attention
    if p.training_kernels:
        record["training"] = p.training_kernels
    layers = [d for c in compressors for d in c.kernel_decisions]
    if layers:
        record["layers"] = layers
    return record


# -- the stage loop --------------------------------------------------------------------------
def stage_plan(compressors: list[Compressor]) -> list[Stage]:
    """Every compressor's stages by role: ``prepare`` stages, then ``train`` stages, in declaration
    order; ``plain`` stages (one per name) only when no compressor trains the model its own way."""
    declared = [s for c in compressors for s in c.stages()]
    stages = [s for s in declared if s.role == "prepare"] + [s for s in declared if s.role == "train"]
    if not any(s.role == "train" for s in declared):
        plain = [s for s in declared if s.role == "plain"]
        stages += [s for i, s in enumerate(plain) if s.key not in {q.key for q in plain[:i]}]
    # Labels name directories: the key alone, or owner_key for all when two keys collide (the names
    # run directories have always had). Keys stay as declared: compressors match on them.
    keys = [s.key for s in stages]
    if len(set(keys)) != len(keys):
        return [dataclasses.replace(s, label=f"{s.owner}_{s.key}") for s in stages]
    return [dataclasses.replace(s, label=s.key) for s in stages]


def train_stages(p: Plan, task: ClassificationTask, datamodule, compressors) -> list[dict]:
    stages = stage_plan(compressors)
    dirs = [p.run_dir / "stages" / f"{i:02d}_{s.label}" for i, s in enumerate(stages)]
    finished = list(itertools.takewhile(lambda d: (d / "end.pt").exists(), dirs))
    records = [json.loads((d / "record.json").read_text()) for d in finished]
    if finished:  # resume: the state at the end of the last finished stage is all we need
        load_stage_end(finished[-1], task, compressors)
        log.info("resuming %s after finished stage %s", p.run_dir, finished[-1].name)
    for index in range(len(finished), len(stages)):
        stage, stage_dir = stages[index], dirs[index]
        L.seed_everything(p.cfg.seed + index, workers=True, verbose=False)
        for compressor in compressors:
            compressor.begin_stage(stage, task)
        records.append(fit_stage(p, stage, stage_dir, task, datamodule, compressors))
    return records


def fit_stage(p: Plan, stage: Stage, stage_dir: Path, task, datamodule, compressors) -> dict:
    t = p.typed
    last = stage_dir / "checkpoints" / "last.ckpt"
    resume_from = last if last.exists() else None
    if resume_from:
        check_loadable(resume_from, f"stage '{stage.label}'")
        log.info("stage %s: resuming from %s", stage.label, resume_from)
    clock = ResumeState()
    task.lr_scale, task.stage_label = stage.lr_scale, stage.label
    active = [c for c in compressors if stage.role != "prepare" or c.name == stage.owner]
    task.compressors = active  # a teacher trained in a prepare stage is not pruned or distilled
    writer = BackgroundCheckpointIO()
    trainer = make_trainer(p, stage_dir, max_epochs=stage.max_epochs or t["trainer"].max_epochs,
                           callbacks=[*active, clock, LastCheckpoint(last, t["trainer"].checkpoint_every_n_steps)],
                           logger_version=stage_dir.name, plugins=[writer])
    own_batches = [loader for c in active if (loader := c.train_dataloader(stage, datamodule)) is not None]
    data = {"datamodule": datamodule}
    if own_batches:  # the datamodule still validates, but is never iterated for training
        data = {"train_dataloaders": own_batches[0], "val_dataloaders": datamodule.val_dataloader()}
    with hw.kernel_context(t["hardware"]):
        # weights_only=True: Lightning unpickles last.ckpt as tensors and plain data, running no code in it
        try:
            trainer.fit(compiled(task, t["hardware"]), **data, ckpt_path=resume_from, weights_only=True)
        except SystemExit:  # Lightning ends a KeyboardInterrupt with sys.exit(1), after its teardown
            if not trainer.interrupted:
                raise
    if trainer.interrupted:
        writer.close()
        raise Interrupted(f"interrupted; rerun the same command to resume from {last}")
    record = {
        "name": stage.label,
        "owner": stage.owner,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "time_s": round(clock.elapsed(), 3),
    }
    with hw.kernel_context(t["hardware"]):  # every stage's model is evaluated: a level of IMP is a result
        record["val_acc"] = trainer.validate(task, datamodule=datamodule, verbose=False)[0]["val/acc"]
        record["test_acc"] = trainer.test(task, datamodule=datamodule, verbose=False)[0]["test/acc"]
    for compressor in compressors:
        record.update(compressor.end_stage(stage, record) or {})
    task.compressors = list(compressors)
    writer.close()  # the last epoch's checkpoint was written while the stage was evaluated
    save_stage_end(stage_dir, task, compressors, record)
    return record


def evaluate(p: Plan, task: ClassificationTask, datamodule) -> dict:
    """Validation and test accuracy of the finalized (compressed) model."""
    keep = p.typed["hardware"].accelerator == "gpu" and measure.holds_kernels(task.model)
    trainer = make_trainer(p, p.run_dir / "final", max_epochs=1, callbacks=[], logger_version="final",
                           strategy=KeepOnDevice(torch.device("cuda", 0)) if keep else "auto")
    with hw.kernel_context(p.typed["hardware"]):
        val = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
        test = trainer.test(task, datamodule=datamodule, verbose=False)[0]
    return {"val_acc": val["val/acc"], "test_acc": test["test/acc"], "test_loss": test["test/loss"]}


# -- trainer pieces --------------------------------------------------------------------------
def make_trainer(p: Plan, root: Path, max_epochs: int, callbacks: list, logger_version: str,
                 strategy: Any = "auto", plugins: list | None = None) -> L.Trainer:
    t, h = p.typed["trainer"], p.typed["hardware"]
    return L.Trainer(
        max_epochs=max_epochs,
        strategy=strategy,
        accelerator=h.accelerator,
        devices=h.devices,
        precision=h.precision,
        callbacks=[*callbacks, *progress_bar(t.progress_bar)],
        logger=make_logger(p, logger_version),
        default_root_dir=root,
        enable_progress_bar=show_progress(t.progress_bar),
        enable_model_summary=False,
        enable_checkpointing=False,  # LastCheckpoint does it
        num_sanity_val_steps=0,
        gradient_clip_val=t.gradient_clip_val,
        limit_train_batches=_limit(t.limit_train_batches),
        limit_val_batches=_limit(t.limit_val_batches),
        limit_test_batches=_limit(t.limit_test_batches),
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if isinstance(t.val_check_interval, int) else 1,
        log_every_n_steps=t.log_every_n_steps,
        deterministic="warn" if h.accelerator == "gpu" else True,
        profiler=make_profiler(t.profiler, root),
        plugins=plugins,
    )


def make_profiler(kind: str, root: Path):
    from lightning.pytorch import profilers

    if kind == "none":
        return None
    profiler = profilers.SimpleProfiler if kind == "simple" else profilers.AdvancedProfiler
    return profiler(dirpath=root, filename="profile")


class KeepOnDevice(SingleDeviceStrategy):
    """One GPU, without Lightning's move of the model to the CPU at teardown: a 2:4 weight moved to
    the CPU turns dense, so the test pass and the speed measurement after it would not see the kernel."""

    def teardown(self) -> None:
        module, self._lightning_module = self._lightning_module, None
        try:
            super().teardown()
        finally:
            self._lightning_module = module


class LastCheckpoint(L.Callback):
    """``last.ckpt`` of a stage, at every epoch end (and every N steps if asked), through the
    trainer's :class:`BackgroundCheckpointIO`. Lightning's ModelCheckpoint, with no top-k
    checkpoints, writes ``last`` only when training ends."""

    def __init__(self, path: Path, every_n_steps: int | None = None):
        self.path, self.every_n_steps = path, every_n_steps

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def save(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.path, weights_only=False)  # (a save: with the optimizer's state)


class BackgroundCheckpointIO(TorchCheckpointIO):
    """Checkpoints copied to host memory in the training loop, then written to disk by a thread,
    atomically (a temporary file, then a rename: a kill mid-write leaves the previous checkpoint).

    The disk is the slow part: on an H200 node a BERT-base checkpoint (weights and AdamW state,
    1.3 GB) took 3 s to write, as long as 40 training steps at batch 256, which made checkpointing
    half of a 3-epoch fine-tuning's time. One write is in flight at a time; ``wait`` lands it and
    re-raises its error, if any; ``close`` (the runner calls it before a stage counts as finished)
    also ends the thread."""

    def __init__(self):
        super().__init__()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="effml-checkpoint")
        self._pending: Future | None = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        self.wait()
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._pending = self._executor.submit(_write_atomically, snapshot, Path(path))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """``wait``, then end the writer thread: a run of many stages (IMP levels) keeps none idle."""
        try:
            self.wait()
        finally:
            self._executor.shutdown()

    def teardown(self) -> None:
        """Lightning tears the strategy down after fit: the write may go on, validation and test
        run meanwhile."""


def _write_atomically(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def show_progress(setting: str) -> bool:
    return setting == "on" or (setting == "auto" and sys.stderr.isatty())


def progress_bar(setting: str) -> list:
    from lightning.pytorch.callbacks import RichProgressBar

    return [RichProgressBar(leave=True)] if show_progress(setting) else []


def make_logger(p: Plan, version: str):
    from lightning.pytorch import loggers

    cfg, save_dir = p.typed["logger"], p.run_dir / "logs"
    if cfg.name == "csv":
        return loggers.CSVLogger(save_dir, name="csv", version=version)
    if cfg.name == "tensorboard":
        return loggers.TensorBoardLogger(save_dir, name="tensorboard", version=version, default_hp_metric=False)
    if cfg.name == "wandb":
        save_dir.mkdir(parents=True, exist_ok=True)
        run_name = f"{p.name}/{p.run_dir.parent.name}/{p.run_dir.name}"
        return loggers.WandbLogger(
            project=cfg.project, entity=cfg.entity, mode=cfg.wandb_mode, save_dir=str(save_dir),
            name=f"{run_name}/{version}", group=p.group or run_name, job_type=version,
            config=OmegaConf.to_container(p.cfg, resolve=True), reinit="create_new",
        )
    return False


def compiled(task: ClassificationTask, h) -> L.LightningModule:
    return torch.compile(task) if h.compile else task


def _limit(value: float | None):
    if value is None:
        return None
    return int(value) if value >= 1 and float(value).is_integer() else value


class ResumeState(L.Callback):
    """RNG states and the stage's training time, saved in every checkpoint: Lightning keeps
    neither, so without this a resumed stage would draw other dropout masks and misreport time."""

    state_key = "effml/resume"

    def __init__(self):
        self.base = 0.0
        self.started: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.base + (time.perf_counter() - self.started if self.started else 0.0)

    def state_dict(self) -> dict:
        return {
            "elapsed": self.elapsed(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": numpy_rng_state(),
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.base = state["elapsed"]
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        set_numpy_rng_state(state["numpy"])
        random.setstate(state["python"])


def numpy_rng_state() -> list:
    """numpy's global RNG state as plain data (its key array as a list of ints): a checkpoint holds
    nothing that ``torch.load(weights_only=True)`` refuses (effml.safe_load)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]


def set_numpy_rng_state(state) -> None:
    name, keys, *rest = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


# -- stage files -----------------------------------------------------------------------------
def save_stage_end(stage_dir: Path, task, compressors, record: dict) -> None:
    state = {
        "model": task.model.state_dict(),
        "compressors": {c.state_key: c.state_dict() for c in compressors},
    }
    (stage_dir / "record.json").write_text(json.dumps(record, indent=2))
    tmp = stage_dir / "end.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, stage_dir / "end.pt")  # atomic: the stage is either finished or not


def load_stage_end(stage_dir: Path, task, compressors) -> dict:
    state = check_loadable(stage_dir / "end.pt", f"finished stage {stage_dir.name}")
    for c in compressors:  # first: a compressor that shrank the model restores its shape here
        c.load_state_dict(state["compressors"][c.state_key])
    task.model.load_state_dict(state["model"])
    return state


def check_loadable(path: Path, what: str) -> dict:
    return safe_load.load(path, f"checkpoint of {what}", broken="is corrupt", advice="; delete it to redo that stage")


# -- outputs ---------------------------------------------------------------------------------
def save_model(run_dir: Path, model: torch.nn.Module) -> None:
    """The finalized model's weights, ``model.pt``: what a later run loads as its teacher."""
    tmp = run_dir / "model.pt.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, run_dir / "model.pt")


def save_run_record(p: Plan) -> None:
    """The resolved config, what the hash covers, versions and the device, before any work."""
    cfg = OmegaConf.to_container(p.cfg, resolve=True)
    cfg.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(cfg), p.run_dir / "config.yaml")
    record = {
        "identity": identity.identity(p.typed),
        "hash": p.run_dir.parent.name,
        "command": " ".join(sys.argv),
        "versions": library_versions(),
        "device": hw.device_description(p.typed["hardware"]),
        "kernels": kernel_record(p),
    }
    (p.run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("effml", "torch", "lightning", "hydra-core", "omegaconf", "transformers", "datasets", "wandb"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def assemble_metrics(p: Plan, b: Built, records: list[dict], final: dict, deployed: torch.nn.Module) -> dict:
    t, compressors = p.typed, b.compressors
    model = b.task.model.eval()
    sparsity = measure.sparsity_report(model)
    layers = sparsity.pop("layers")
    metrics = {
        "recipe": p.name,
        "run_dir": str(p.run_dir),
        "hash": p.run_dir.parent.name,
        "seed": p.cfg.seed,
        **final,
        "sparsity": sparsity,
        "layers": layers,
        "target_sparsity": next((c.target_sparsity() for c in compressors if c.target_sparsity() is not None), None),
        "train_time_s": round(sum(r["time_s"] for r in records), 3),
        "stages": records,
        "compressors": {c.name: c.report() for c in compressors},
        "device": hw.device_description(t["hardware"]),
        "kernels": kernel_record(p, compressors),
        "versions": library_versions(),
    }
    if t["measure"].enabled:
        reference = b.dense_reference
        for compressor in compressors:
            reference = compressor.reference(reference)
        metrics["speed_reference"] = getattr(reference, "effml_reference", "dense")
        metrics.update(measure_speed(p, reference, deployed.eval(), b.datamodule))
    return metrics


def measure_speed(p: Plan, dense, compressed, datamodule) -> dict:
    m, h = p.typed["measure"], p.typed["hardware"]
    dtype = torch.bfloat16 if h.precision.startswith("bf16") else torch.float16 if h.precision.startswith("16") else None
    labels = None
    if m.train_step:  # random labels: the step's cost does not depend on their values
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(datamodule.info.num_classes, (m.batch_size,), generator=generator)
    with hw.kernel_context(h):
        speed = measure.compare_dense_compressed(
            dense, compressed, datamodule.example_inputs(m.batch_size), "cuda" if h.accelerator == "gpu" else "cpu",
            dtype=dtype, labels=labels, warmup=m.warmup, iters=m.iters, min_time_s=m.min_time_s,
        )
    flops = {
        "dense": speed["dense"]["flops_per_sample"],
        "compressed": speed["compressed"]["flops_per_sample"],
        "effective": speed["compressed"]["effective_flops_per_sample"],
    }
    return {"flops": flops, "speed": speed}


# -- process hygiene -------------------------------------------------------------------------
class run_lock:
    """One process per run directory: a second one (a duplicated sweep job) stops with a clear line."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EffmlError(f"{self.path.parent} is being run by another process right now") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class run_log:
    """Mirror log records into <run_dir>/run.log for the duration of the run."""

    def __init__(self, run_dir: Path):
        self.handler = logging.FileHandler(run_dir / "run.log")
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))

    def __enter__(self):
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
