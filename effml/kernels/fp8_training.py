"""fp8 training from the hardware config: torchao float8 Linear layers, kept where measured faster.

``hardware.fp8_training=true`` trains every eligible ``nn.Linear`` with fp8 (e4m3) matmuls in the
forward and backward passes and dynamic per-tensor scales (torchao ``Float8Linear``; the format of
Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433), the rest of the step in the
run's bf16 autocast. Eligible: a GPU of sm_89 or newer, both widths divisible by 16.

The scale computation costs extra kernels, so on small layers or short sequences fp8 can lose to
bf16. Under ``hardware.selection=measure`` each layer's forward + backward on the run's training
shape is timed both ways (cached like every kernel timing) and fp8 is kept only where it is faster
by ``selection_margin``; ``force`` converts every eligible layer (and refuses a device that cannot;
a layer whose widths fp8 cannot take, such as a 2-class head, stays dense with the reason recorded);
``off`` converts none. Weights keep their names, so checkpoints are unchanged and resume works.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from effml import measure
from effml.errors import EffmlError
from effml.kernels import library
from effml.kernels.select import TIMING, Decision, KernelSelector, input_shapes, set_module


def linear_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def apply(model: nn.Module, hardware: Any, example_inputs: Mapping[str, Any]) -> list[Decision]:
    """Convert the chosen Linear layers of ``model`` to fp8 training in place; one decision per layer."""
    if not getattr(hardware, "fp8_training", False):
        return []
    selector = KernelSelector(hardware)
    device_cannot = library.kernel("fp8_dynamic").unsupported(nn.Linear(16, 16), selector.device, selector.dtype)
    if device_cannot and hardware.selection == "force":
        raise EffmlError(f"hardware.fp8_training with selection=force: this device cannot train in fp8: {device_cannot}")
    paths = linear_paths(model)
    shapes = input_shapes(model, example_inputs, paths)
    for path in paths:
        layer = model.get_submodule(path)
        shape = f"x{list(shapes.get(path, ()))} w{list(layer.weight.shape)} fwd+bwd"
        why_not = library.kernel("fp8_dynamic").unsupported(layer, selector.device, selector.dtype)
        if why_not or hardware.selection == "off" or path not in shapes:
            reason = why_not or ("hardware.selection=off" if hardware.selection == "off" else "not reached by the inputs")
            selector.decisions.append(Decision(path, "dense", f"dense: {reason}", shape))
            continue
        fp8 = _float8(layer)
        timings = _train_timings(selector, layer, fp8, shapes[path], shape)
        speedup = timings["dense"] / timings["fp8"]
        keep = hardware.selection == "force" or speedup >= hardware.selection_margin
        verdict = "forced" if hardware.selection == "force" else "kept" if keep else "dense kept"
        selector.decisions.append(Decision(path, "fp8_training" if keep else "dense",
                                           f"{verdict}: fp8 measured {speedup:.2f}x of dense", shape, timings,
                                           forced=hardware.selection == "force"))
        if keep:
            set_module(model, path, fp8)
    selector.cache.save()
    return selector.decisions


def _float8(layer: nn.Linear) -> nn.Module:
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear.from_float(copy.deepcopy(layer))


def _train_timings(selector: KernelSelector, dense: nn.Module, fp8: nn.Module, input_shape: tuple,
                   shape: str) -> dict[str, float]:
    """ms of forward + backward of each version on the training shape, under the run's autocast."""
    keys = {name: f"{selector.key_prefix}|{shape} {selector.dtype}|{name}" for name in ("dense", "fp8")}
    if all(selector.cache.get(k) is not None for k in keys.values()):
        return {name: selector.cache.get(k) for name, k in keys.items()}
    x = torch.randn(*input_shape, device=selector.device, requires_grad=True)

    def step(module: nn.Module):
        module = copy.deepcopy(module).to(selector.device)

        def run():
            with torch.autocast(selector.device.type, dtype=selector.dtype):
                module(x).float().sum().backward()

        return run

    seconds = measure._time_interleaved({"dense": step(dense), "fp8": step(fp8)}, selector.device, **TIMING)
    timings = {name: round(1e3 * sorted(s)[len(s) // 2], 4) for name, s in seconds.items()}
    for name, ms in timings.items():
        selector.cache.put(keys[name], ms)
    return timings
