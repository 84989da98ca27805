"""Multi-process runs on Lightning's own engines (docs/ARCHITECTURE.md §9): its subprocess launcher
starts the processes, its cluster environments (plain, SLURM, torchrun) name the ranks, its DDP
strategy trains. effml adds only what a compressor needs to decide the same thing on every rank.

The model of a run of N processes:

* ``data.batch_size`` is the global batch: each process loads ``batch_size / N`` of it
  (``per_rank_batch``), so a run's result, and its identity hash, do not depend on N;
* every process runs the whole stage loop; only rank 0 writes (checkpoints, records, metrics);
* a decision a compressor makes is either computed from inputs that are the same on every rank
  (weights, which DDP keeps equal by averaging the gradients; a pass over the full data) or made on
  rank 0 and sent to the others (``broadcast_from_rank0``); per-rank statistics are averaged first
  (``all_reduce_mean``). Every helper here is a no-op in a single process.
* after the last stage, finalize, the test and the speed measurement run on rank 0 only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from effml.errors import EffmlError

# Written by tests (and by a user debugging a run): each rank's digest of its model and compressors.
DIGEST_DIR_ENV = "EFFML_RANK_DIGEST_DIR"


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: from the process group once it exists, else from the
    environment Lightning's launcher, SLURM or torchrun set (0 in a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("NODE_RANK", 0)) * int(os.environ.get("EFFML_DEVICES", 1)) + int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def shard() -> tuple[int, int]:
    """(rank, number of ranks) of the running process group; (0, 1) in a single process."""
    if active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size(hardware: Any) -> int:
    return hardware.devices * hardware.num_nodes


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable value: masks, choices, a candidate list)."""
    if not active():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    value = box[0]
    return _to_device_of(value, obj)


def _to_device_of(value: Any, like: Any) -> Any:
    """broadcast_object_list unpickles tensors on rank 0's device: put them back on this rank's."""
    if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor):
        return value.to(like.device)
    if isinstance(value, dict) and isinstance(like, dict):
        return {k: _to_device_of(v, like.get(k)) for k, v in value.items()}
    if isinstance(value, list | tuple) and isinstance(like, list | tuple) and len(value) == len(like):
        return type(value)(_to_device_of(v, w) for v, w in zip(value, like, strict=True))
    return value


def broadcast_tensors_(tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor in place with rank 0's (masks, buffers)."""
    if not active():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (a new tensor; the input itself in a single process)."""
    if not active():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not active():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """After the last stage: wait for every rank, then leave the process group, so that rank 0's
    finalize and test (one process, ``one_process`` Trainers) sync their metrics with nobody."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- checks, made before anything is written -----------------------------------------------------
def usable_devices(accelerator: str) -> int:
    """What "the machine has": GPUs visible to CUDA, or the CPU cores this process may run on (one
    process per core; more would only time-share the cores and slow every rank)."""
    if accelerator == "gpu":
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check(hardware: Any, data: Any, compressors: dict[str, Any]) -> None:
    """Refuse, in one line, a multi-process setting this machine or this method cannot run
    (``compressors``: name → class, for its ``multi_process``)."""
    h, n = hardware, world_size(hardware)
    if h.strategy == "fsdp" and h.accelerator != "gpu":
        raise EffmlError("hardware.strategy=fsdp needs GPUs: Lightning's FSDP does not run on the CPU; "
                         "use hardware.strategy=ddp there")
    have = usable_devices(h.accelerator)
    if h.devices > have:
        what = "GPUs are visible" if h.accelerator == "gpu" else "CPU cores are usable (one process per core)"
        raise EffmlError(f"hardware.devices={h.devices} but only {have} {what} on this machine; "
                         f"use hardware.devices={max(have, 1)} or fewer")
    if n == 1:
        return
    single = [name for name, cls in compressors.items() if not cls.multi_process]
    if single:
        raise EffmlError(f"compressor {single[0]} runs in a single process only; "
                         f"use hardware.devices=1 hardware.num_nodes=1 (got {n} processes)")
    batch = getattr(data, "batch_size", None)
    if batch is not None and batch % n:
        raise EffmlError(f"data.batch_size={batch} (the global batch) must divide evenly over {n} processes "
                         f"(hardware.devices x hardware.num_nodes); use a multiple of {n}")


def per_rank_batch(data: Any, hardware: Any) -> Any:
    import dataclasses

    n = world_size(hardware)
    if n == 1 or getattr(data, "batch_size", None) is None:
        return data
    return dataclasses.replace(data, batch_size=data.batch_size // n)


# -- starting the processes (Lightning's launcher) -------------------------------------------------
def strategy(hardware: Any):
    """The Lightning strategy for the run: DDP (gloo on the CPU, NCCL on GPUs) for more than one
    process, FSDP where asked, Lightning's own choice for one."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    if hardware.strategy == "fsdp":
        return FSDPStrategy()
    if hardware.strategy == "ddp" or world_size(hardware) > 1:
        # Unused parameters exist (a frozen teacher's projections, masked-out experts in a step):
        # DDP must not wait for their gradients.
        return DDPStrategy(find_unused_parameters=True)
    return "auto"


def start(hardware: Any, argv: list[str] | None = None) -> None:
    """Join (or first start) this run's processes, before anything is decided: Lightning's
    subprocess launcher starts the other processes of this node, each rerunning ``argv`` (an effml
    command line); under SLURM or torchrun the cluster started them, and the launcher starts none.
    Then the process group is set up (gloo on the CPU, NCCL on GPUs), and every later Trainer of the
    run reuses it. A no-op in a single process or where the group exists already."""
    import sys

    import lightning as L

    if world_size(hardware) == 1 or (dist.is_available() and dist.is_initialized()):
        return
    os.environ["EFFML_DEVICES"] = str(hardware.devices)
    probe = L.Trainer(accelerator=hardware.accelerator, devices=hardware.devices, num_nodes=hardware.num_nodes,
                      strategy=strategy(hardware), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    environment, launcher = probe.strategy.cluster_environment, probe.strategy.launcher
    if launcher is not None and not environment.creates_processes_externally:
        if argv is None:
            raise EffmlError(f"hardware.devices={hardware.devices} needs its processes started by the effml "
                             "command line (effml train), SLURM or torchrun")
        saved, sys.argv = sys.argv, [sys.argv[0], *argv]
        try:
            launcher.launch(lambda: None)
        finally:
            sys.argv = saved
    probe.strategy.setup_environment()


def description(hardware: Any) -> dict[str, Any]:
    """What the run record says of its processes."""
    n = world_size(hardware)
    name = "fsdp" if hardware.strategy == "fsdp" else "ddp" if hardware.strategy == "ddp" or n > 1 else "single_device"
    info: dict[str, Any] = {"world_size": n, "devices": hardware.devices, "num_nodes": hardware.num_nodes,
                            "strategy": name}
    if name != "single_device":
        info["backend"] = "nccl" if hardware.accelerator == "gpu" else "gloo"
    return info


def digest(task: Any, compressors: list[Any]) -> str:
    """A hash of everything a rank decided: the model's parameters and buffers (names, shapes and
    values) and each compressor's state."""
    h = hashlib.sha256()
    for name, value in sorted(task.model.state_dict().items()):
        _update(h, name, value)
    for c in compressors:
        _update(h, c.name, c.state_dict())
    return h.hexdigest()


def _update(h, key: str, value: Any) -> None:
    h.update(key.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(_bytes(t) if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _update(h, str(k), value[k])
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _update(h, str(i), v)
    else:
        h.update(repr(value).encode())


def _bytes(t: torch.Tensor) -> bytes:
    try:
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError):  # a tensor subclass (QLoRA's NF4 weights): its serialized form
        import io

        buffer = io.BytesIO()
        torch.save(t, buffer)
        return buffer.getvalue()


def write_digest(task: Any, compressors: list[Any]) -> None:
    folder = os.environ.get(DIGEST_DIR_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank{rank()}.txt").write_text(digest(task, compressors))
