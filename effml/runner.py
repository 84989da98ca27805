"""One run, top to bottom (docs/ARCHITECTURE.md §2):

    plan → build → for each stage: skip if finished, else fit (resuming from last.ckpt)
         → finalize → test → measure dense vs compressed → metrics.json

A stage is finished when its ``end.pt`` exists (written atomically after its fit); a run is
finished when ``metrics.json`` exists, and is then never touched again. Where each file lives is
``effml.paths``; how checkpoints are written and read, ``effml.checkpoints``; the Trainer,
``effml.trainer``; what the run records about itself, ``effml.run_record``.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import itertools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from effml import checkpoints, distributed, identity, measure, report
from effml.compressors.base import Compressor, RunContext, Stage, refuse_conflicts
from effml.config import to_typed
from effml.errors import EffmlError, Interrupted
from effml.kernels import fp8_training, select
from effml.kernels import hardware as hw
from effml.loss_curve import TrainingLossCurve
from effml.paths import RunDir, StageDir, check_writable, unwritable
from effml.registry import COMPRESSORS, DATASETS, MODELS
from effml.run_record import measure_and_collect_metrics, run_lock, run_log, save_run_record
from effml.task import Task, make_task
from effml.trainer import compiled, keep_on_gpu, make_trainer

log = logging.getLogger("effml")

# A folder effml cannot write to (read-only mount, no permission, disk full) is the user's to fix
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


@dataclass
class Plan:
    """Everything decided before any work: typed configs, the target, the run directory."""

    cfg: DictConfig
    typed: dict[str, Any]
    run_dir: RunDir
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
    check_task(typed)
    composed_configs(typed)  # a pair that cannot compose is refused here, before anything is written
    typed["hardware"] = hw.resolve(typed["hardware"])
    distributed.check(typed["hardware"], typed["data"],
                      {c.name: COMPRESSORS.get(c.name).target for c in composed_configs(typed)})
    check_writable(cfg.output_root)
    return Plan(cfg, typed, identity.run_dir(cfg.output_root, cfg.name, typed, cfg.seed), group)


TASK_WORDS = {"classification": "classification", "lm": "language-modelling"}


def check_task(typed: dict) -> None:
    """The model and the dataset are for the same task (``task`` of each class; classification unless said)."""
    model, data = typed["model"].name, typed["data"].name
    model_task = getattr(MODELS.get(model).target, "task", "classification")
    data_task = DATASETS.get(data).target.task
    if model_task != data_task:
        raise EffmlError(f"model {model} is a {TASK_WORDS[model_task]} model but data {data} is a "
                         f"{TASK_WORDS[data_task]} dataset; choose a model and data of the same task")
    for config in composed_configs(typed):
        tasks = COMPRESSORS.get(config.name).target.tasks
        if data_task not in tasks:
            raise EffmlError(f"compressor {config.name} works on {' and '.join(TASK_WORDS[t] for t in tasks)} runs, "
                             f"not on {TASK_WORDS[data_task]} (data {data})")


def run(cfg: DictConfig, group: str | None = None) -> dict:
    p = plan(cfg, group)
    if p.run_dir.finished:
        if distributed.is_main():
            print(f"effml: {p.name} (seed {cfg.seed}) finished already; results in {p.run_dir.metrics}")
        return report.load_metrics(p.run_dir.metrics)
    distributed.start(p.typed["hardware"])  # joins the processes the command line or the cluster started
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6 builds LeafSpec(), which torch 2.13 deprecates: nothing a user of effml can act on
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        built = build(p)  # data and model load before anything is written: a failure leaves no trace
        if not distributed.is_main():  # ranks > 0 train beside rank 0 and write nothing
            return execute_other_rank(p, built)
        try:
            p.run_dir.path.mkdir(parents=True, exist_ok=True)
            with run_lock(p.run_dir), run_log(p.run_dir):
                return execute(p, built)
        except OSError as e:  # the folder became unwritable during the run (the disk filled up, ...)
            if e.errno not in UNWRITABLE:
                raise
            raise unwritable(e, e.filename or p.run_dir.path) from None


@dataclass
class Built:
    datamodule: Any
    task: Task
    compressors: list[Compressor]
    dense_reference: torch.nn.Module  # the uncompressed architecture, for side-by-side speed
    stages: list[Stage]  # stage_plan(compressors): labels decided


def build(p: Plan) -> Built:
    t = p.typed
    L.seed_everything(p.cfg.seed, workers=True, verbose=False)
    model_entry = MODELS.get(t["model"].name)
    tokenizer_for = getattr(model_entry.target, "tokenizer_for", None)
    datamodule = DATASETS.get(t["data"].name).target(
        distributed.per_rank_batch(t["data"], t["hardware"]), seed=p.cfg.seed, tokenizer=tokenizer_for(t["model"]) if tokenizer_for else None
    )
    datamodule.restore_from(p.run_dir)  # a rerun uses the tokenizer its first attempt trained
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
    task = make_task(datamodule.info, model, t["trainer"], compressors)
    return Built(datamodule, task, compressors, dense_reference, stage_plan(compressors))


def composed_configs(typed: dict) -> list[Any]:
    """``compressor`` and then every ``compose`` entry, in order: each name at most once, and no two
    whose owned things conflict (``Compressor.owned``, ``compressors.base.CONFLICTS``)."""
    configs = [typed["compressor"], *typed.get("compose", {}).values()]
    configs = [c for c in configs if c.name != "none" or len(configs) == 1]
    names = [c.name for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EffmlError(f"compressor {twice[0]} appears twice (in compressor and compose); use it once")
    refuse_conflicts(names, [COMPRESSORS.get(c.name).target.owned(c) for c in configs])
    return configs


def make_compressors(typed: dict) -> list[Compressor]:
    return [COMPRESSORS.get(c.name).target(c) for c in composed_configs(typed)]


def execute(p: Plan, b: Built) -> dict:
    check_resumable(p, b.stages)  # a corrupt checkpoint stops the run before anything is rewritten
    select_attention(p, b)
    save_run_record(p)
    b.datamodule.save_to(p.run_dir)
    records = train_stages(p, b)
    distributed.write_digest(b.task, b.compressors)
    distributed.finish()  # every rank is done with the process group: from here rank 0 works alone
    for compressor in b.compressors:
        b.task.model = compressor.finalize(b.task.model, p.typed["hardware"])
    deployed = b.task.model
    for compressor in b.compressors:
        deployed = compressor.deployable(deployed)
    checkpoints.save_model(p.run_dir.model, deployed)
    export_pretrained(p, deployed, b.datamodule)
    final = evaluate(p, b.task, b.datamodule)
    metrics = measure_and_collect_metrics(p, b, records, final, deployed)
    report.write_metrics(p.run_dir.metrics, metrics)
    report.print_summary(metrics)
    return metrics


def execute_other_rank(p: Plan, b: Built) -> dict:
    """A rank > 0: the same decisions and the same training as rank 0, no file written. Finalize, the
    test and the speed measurement are rank 0's (one process: nothing to agree on)."""
    check_resumable(p, b.stages)
    select_attention(p, b)
    train_stages(p, b)
    distributed.write_digest(b.task, b.compressors)
    distributed.finish()
    return {}


def export_pretrained(p: Plan, deployed: torch.nn.Module, datamodule) -> None:
    """A model that exports itself in transformers' format (the LMs) is saved to ``<run>/model``,
    with its tokenizer, unless a compressor wrote that folder already."""
    save = getattr(deployed, "save_pretrained", None)
    if save is None or p.run_dir.export.exists():
        return
    tokenizer = getattr(datamodule.tokenizer, "as_transformers", None)
    save(p.run_dir.export, tokenizer=tokenizer() if tokenizer else None)


def select_attention(p: Plan, b: Built) -> None:
    """Under ``hardware.selection=measure``, order the SDPA backends by their measured time on this
    model's own attention call (training batch shape), fastest first; record why."""
    h = p.typed["hardware"]
    if h.selection != "measure":
        return
    call = select.capture_attention_call(b.task.model, b.datamodule.example_inputs(p.typed["data"].batch_size))
    if call is None:  # no attention in this model
        return
    # timed, so it can differ between ranks: rank 0's choice is every rank's
    order, decision = distributed.broadcast_from_rank0(select.measured_sdpa_order(call, h, hw.sdpa_choice(h)))
    p.typed["hardware"] = dataclasses.replace(h, sdpa_backends=order)
    p.attention = decision.as_dict()
    log.info("attention: %s (%s)", order, decision.reason)


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


def stage_dirs(p: Plan, stages: list[Stage]) -> list[StageDir]:
    return [p.run_dir.stage(i, s.label) for i, s in enumerate(stages)]


def check_resumable(p: Plan, stages: list[Stage]) -> None:
    """The files a resume will load, checked before anything is written: the last finished stage's
    ``end.pt`` and the next stage's ``last.ckpt`` (tensors mapped, not read)."""
    dirs = stage_dirs(p, stages)
    finished = list(itertools.takewhile(lambda d: d.finished, dirs))
    if finished:
        checkpoints.check_loadable(finished[-1].end, f"finished stage {finished[-1].name}", mmap=True)
    if len(finished) < len(dirs) and dirs[len(finished)].last_checkpoint.exists():
        checkpoints.check_loadable(dirs[len(finished)].last_checkpoint, f"stage '{stages[len(finished)].label}'", mmap=True)


def train_stages(p: Plan, b: Built) -> list[dict]:
    dirs = stage_dirs(p, b.stages)
    finished = list(itertools.takewhile(lambda d: d.finished, dirs))
    records = [checkpoints.load_stage_record(d) for d in finished]
    if finished:  # resume: the state at the end of the last finished stage is all we need
        checkpoints.load_stage_end(finished[-1], b.task, b.compressors)
        log.info("resuming %s after finished stage %s", p.run_dir.path, finished[-1].name)
    for index in range(len(finished), len(b.stages)):
        stage = b.stages[index]
        L.seed_everything(p.cfg.seed + index, workers=True, verbose=False)
        for compressor in b.compressors:
            compressor.begin_stage(stage, b.task)
        records.append(fit_stage(p, stage, dirs[index], b))
    return records


def fit_stage(p: Plan, stage: Stage, stage_dir: StageDir, b: Built) -> dict:
    t, task, datamodule, compressors = p.typed, b.task, b.datamodule, b.compressors
    last = stage_dir.last_checkpoint
    resume_from = last if last.exists() else None
    resume_step = None
    if resume_from:
        resume_step = checkpoints.check_loadable(last, f"stage '{stage.label}'", mmap=True)["global_step"]
        log.info("stage %s: resuming from %s (step %d)", stage.label, resume_from, resume_step)
    clock = checkpoints.ResumeState()
    curve = TrainingLossCurve()  # before LastCheckpoint: a step's loss is in the checkpoint taken after it
    task.lr_scale, task.stage_label = stage.lr_scale, stage.label
    active = [c for c in compressors if stage.role != "prepare" or c.name == stage.owner]
    task.compressors = active  # a teacher trained in a prepare stage is not pruned or distilled
    writer = checkpoints.BackgroundCheckpointIO()
    trainer = make_trainer(p, stage_dir.path, max_epochs=stage.max_epochs or t["trainer"].max_epochs,
                           callbacks=[*active, clock, curve, checkpoints.LastCheckpoint(last, t["trainer"].checkpoint_every_n_steps)],
                           logger_version=stage_dir.name, plugins=[writer], resume_step=resume_step)
    own_batches = [loader for c in active if (loader := c.train_dataloader(stage, datamodule)) is not None]
    data = {"datamodule": datamodule}
    if own_batches:  # the datamodule still validates, but is never iterated for training
        data = {"train_dataloaders": own_batches[0], "val_dataloaders": datamodule.val_dataloader()}
    with hw.kernel_context(t["hardware"]):
        # weights_only=True: Lightning unpickles last.ckpt as tensors and plain data, running no code in it
        try:
            with compiled(task, t["hardware"]) as fitted:
                trainer.fit(fitted, **data, ckpt_path=resume_from, weights_only=True)
        except SystemExit as e:  # Lightning ends a KeyboardInterrupt with sys.exit(1), after its teardown;
            # any other exit (submitit's requeue after a preemption or a timeout signal) goes on out
            if not (trainer.interrupted and isinstance(e.__context__, KeyboardInterrupt)):
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
        **curve.summary(),  # every step's training loss and the spikes in it
    }
    if distributed.world_size(t["hardware"]) > 1:
        # every rank evaluates the full data alone: the same record (which end_stage decides on) everywhere
        trainer = make_trainer(p, stage_dir.path, max_epochs=1, callbacks=[], logger_version=stage_dir.name,
                               one_process=True, logger=trainer.logger if distributed.is_main() else False)
    with hw.kernel_context(t["hardware"]):  # every stage's model is evaluated: a level of IMP is a result
        record.update(task.record(trainer.validate(task, datamodule=datamodule, verbose=False)[0], "val"))
        record.update(task.record(trainer.test(task, datamodule=datamodule, verbose=False)[0], "test"))
    for compressor in compressors:
        record.update(compressor.end_stage(stage, record) or {})
    task.compressors = list(compressors)
    writer.close()  # the last epoch's checkpoint was written while the stage was evaluated
    if distributed.is_main():  # rank 0 writes, atomically; the others hold the same state
        checkpoints.save_stage_end(stage_dir, task, compressors, record)
        if not t["trainer"].keep_last:  # end.pt holds what a later stage needs; last.ckpt adds the optimizer
            checkpoints.remove_last(stage_dir)
    distributed.barrier()  # no rank starts the next stage before the end of this one is on disk
    return record


def evaluate(p: Plan, task: Task, datamodule) -> dict:
    """The task's validation and test metrics (and the test loss) of the finalized (compressed) model."""
    keep = p.typed["hardware"].accelerator == "gpu" and measure.holds_kernels(task.model)
    trainer = make_trainer(p, p.run_dir.final, max_epochs=1, callbacks=[], logger_version="final",
                           strategy=keep_on_gpu() if keep else None, one_process=True)
    with hw.kernel_context(p.typed["hardware"]):
        val = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
        test = trainer.test(task, datamodule=datamodule, verbose=False)[0]
    return {**task.record(val, "val"), **task.record(test, "test"), "test_loss": test["test/loss"]}
