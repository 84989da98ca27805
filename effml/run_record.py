"""What a run writes about itself (docs/ARCHITECTURE.md §2, §6): ``config.yaml`` and ``run.json``
before any work, ``run.log`` and the ``.lock`` while it runs, and at the end the metrics of
``metrics.json``, for which the dense and compressed models' speed is measured here."""

from __future__ import annotations

import fcntl
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from effml import distributed, identity, measure
from effml.errors import EffmlError
from effml.kernels import hardware as hw
from effml.paths import RunDir, atomic_write_text

if TYPE_CHECKING:
    from effml.compressors.base import Compressor
    from effml.runner import Built, Plan


def save_run_record(p: Plan) -> None:
    """The resolved config, what the hash covers, versions and the device, before any work."""
    cfg = OmegaConf.to_container(p.cfg, resolve=True)
    cfg.pop("hydra", None)
    atomic_write_text(p.run_dir.config, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    record = {
        "identity": identity.identity(p.typed),
        "hash": p.run_dir.hash,
        "command": " ".join(sys.argv),
        "versions": library_versions(),
        "device": hw.device_description(p.typed["hardware"]),
        "distributed": distributed.description(p.typed["hardware"]),
        "kernels": kernel_record(p),
    }
    atomic_write_text(p.run_dir.run_record, json.dumps(record, indent=2, default=str))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("effml", "torch", "lightning", "hydra-core", "omegaconf", "transformers", "datasets", "wandb"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


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


def measure_and_collect_metrics(p: Plan, b: Built, records: list[dict], final: dict,
                                deployed: torch.nn.Module) -> dict:
    """metrics.json's content: accuracy, sparsity, every stage's record, each compressor's report,
    and (``measure.enabled``) the dense and the deployed model's speed, measured now."""
    t, compressors = p.typed, b.compressors
    model = b.task.model.eval()
    sparsity = measure.sparsity_report(model)
    layers = sparsity.pop("layers")
    metrics = {
        "recipe": p.name,
        "run_dir": str(p.run_dir.path),
        "hash": p.run_dir.hash,
        "seed": p.cfg.seed,
        **final,
        "sparsity": sparsity,
        "layers": layers,
        "target_sparsity": next((c.target_sparsity() for c in compressors if c.target_sparsity() is not None), None),
        "train_time_s": round(sum(r["time_s"] for r in records), 3),
        "train_loss_spikes": sum(r.get("train_loss_spikes", 0) for r in records),  # effml/loss_curve.py
        "stages": records,
        "compressors": {c.name: c.report() for c in compressors},
        "device": hw.device_description(t["hardware"]),
        "distributed": distributed.description(t["hardware"]),  # measured (speed) on rank 0 alone
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
    labels = datamodule.example_labels(m.batch_size) if m.train_step else None  # values do not change the cost
    with hw.kernel_context(h):
        speed = measure.compare_dense_compressed(
            dense, compressed, datamodule.example_inputs(m.batch_size), "cuda" if h.accelerator == "gpu" else "cpu",
            dtype=dtype, labels=labels, warmup=m.warmup, iters=m.iters, min_time_s=m.min_time_s,
            compile=h.compile,  # the target runs its models compiled: time them so
        )
    if datamodule.info.task == "lm":  # a sample is a block of seq_len tokens: say it in tokens too
        add_tokens_per_s(speed, datamodule.info.seq_len)
    flops = {
        "dense": speed["dense"]["flops_per_sample"],
        "compressed": speed["compressed"]["flops_per_sample"],
        "effective": speed["compressed"]["effective_flops_per_sample"],
    }
    return {"flops": flops, "speed": speed}


def add_tokens_per_s(speed: dict, tokens_per_sample: int) -> None:
    speed["tokens_per_sample"] = tokens_per_sample
    for side in ("dense", "compressed"):
        for key, out in (("throughput", "tokens_per_s"), ("train_throughput", "train_tokens_per_s")):
            if key in speed[side]:
                speed[side][out] = speed[side][key] * tokens_per_sample


# -- process hygiene -------------------------------------------------------------------------
class run_lock:
    """One process per run directory: a second one (a duplicated sweep job) stops with a clear line."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.lock

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


def is_running(run_dir: RunDir) -> bool:
    """Whether some process holds the run's lock right now (a run in progress, not a dead one)."""
    if not run_dir.lock.is_file():
        return False
    with open(run_dir.lock) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
    return False


def missing_state(run_dir: RunDir) -> str:
    """Why a run has no metrics.json: "not run", "running", or "failed" (started, ended without)."""
    if not run_dir.path.is_dir():
        return "not run"
    return "running" if is_running(run_dir) else "failed"


class run_log:
    """Mirror log records into the run's ``run.log`` for the duration of the run."""

    def __init__(self, run_dir: RunDir):
        self.handler = logging.FileHandler(run_dir.log)
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))

    def __enter__(self):
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
