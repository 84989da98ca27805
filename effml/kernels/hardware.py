"""Resolve ``hardware=...`` against the machine and apply its kernel settings.

``auto`` picks a preset by what is actually there (H200, H100, A100-class, other GPU, CPU) (docs/ARCHITECTURE.md §6: the H100's measured defaults
differ from an A100's). The attention backends are a preference order: the first one the device
supports wins, and the choice is recorded with the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from typing import TYPE_CHECKING, Any

import torch

from effml.errors import EffmlError

if TYPE_CHECKING:
    from effml.config import HardwareConfig

SDPA = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
CPU_SDPA = ("flash", "math")  # PyTorch's CPU flash kernel exists; cuDNN/efficient are CUDA-only


def preset(name: str) -> HardwareConfig:
    """``conf/hardware/<name>.yaml`` as a validated ``HardwareConfig``, without Hydra or OmegaConf
    (benchmarks on bare GPU nodes read the presets through this too)."""
    from effml.config import HardwareConfig, preset_values

    return HardwareConfig(**preset_values("hardware", name))


def detect_preset() -> str:
    """The preset that fits this machine's first GPU, or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    major, _ = torch.cuda.get_device_capability(0)
    if major >= 9:
        return "h200" if "H200" in torch.cuda.get_device_name(0) else "h100"
    return "a100" if major == 8 else "gpu_generic"


def resolve(cfg: HardwareConfig) -> HardwareConfig:
    """Turn ``auto`` into a concrete preset; refuse a GPU target on a machine without one."""
    if cfg.accelerator == "auto":
        found, chosen = detect_preset(), user_choices(cfg)
        if found == "gpu_generic":  # pre-Ampere: no bf16 tensor cores
            generic = {"precision": "16-mixed", "sdpa_backends": ["efficient", "math"]}
            return dataclasses.replace(cfg, name="gpu", accelerator="gpu", **(generic | chosen))
        return dataclasses.replace(preset(found), name=f"auto→{found}", **chosen)
    if cfg.accelerator == "gpu" and not torch.cuda.is_available():
        raise EffmlError(f"hardware={cfg.name} needs a CUDA GPU and none is visible; use hardware=cpu or hardware=auto")
    return cfg


def user_choices(cfg: HardwareConfig) -> dict[str, Any]:
    """The fields of an ``auto`` config set away from ``conf/hardware/auto.yaml`` (``hardware=auto
    hardware.compile=true``, ``hardware.devices=8``): the preset ``auto`` finds must keep them."""
    defaults = preset("auto")
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ("name", "accelerator") and getattr(cfg, f.name) != getattr(defaults, f.name)}


def sdpa_choice(cfg: HardwareConfig) -> list[str]:
    """The configured SDPA backends this device can run, in preference order (math always last)."""
    usable = [b for b in cfg.sdpa_backends if cfg.accelerator == "gpu" or b in CPU_SDPA]
    return usable if "math" in usable else [*usable, "math"]


@contextlib.contextmanager
def kernel_context(cfg: HardwareConfig):
    """Apply matmul precision and the SDPA backend order for the duration of a fit/test."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    backends = [getattr(SDPBackend, SDPA[b]) for b in sdpa_choice(cfg)]
    try:
        with sdpa_kernel(backends, set_priority=True):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def device_description(cfg: HardwareConfig) -> dict[str, Any]:
    """What the run actually ran on, saved with it."""
    info: dict[str, Any] = {"target": cfg.name, "accelerator": cfg.accelerator, "torch": torch.__version__}
    if cfg.accelerator == "gpu":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        info |= {"device": cpu_name(), "threads": torch.get_num_threads()}
    return info


def kernel_choices(cfg: HardwareConfig) -> dict[str, Any]:
    return {
        "precision": cfg.precision,
        "matmul_precision": cfg.matmul_precision,
        "sdpa_backends": sdpa_choice(cfg),
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode,
        "channel_multiple": cfg.channel_multiple,
        "selection": cfg.selection,
        "allowed_kernels": list(cfg.kernels),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
