"""The alternative kernels a dense ``nn.Linear`` can be swapped for, and where each can run.

Every kernel is a name (``hardware.kernels`` lists the allowed ones), a check that says why it
cannot run on a device / layer / dtype (or None), and a conversion that returns a new layer computing
the same function with that kernel. Whether it is *kept* is decided by ``effml.kernels.select``: by
measurement, because running is not the same as being faster (DESIGN.md §6: on an H100 with stock
PyTorch, 2:4 sparse matmuls were 4-30x slower than dense on BERT shapes, ``torch._int_mm`` 5.6x
slower than bf16, fp8 1.9x faster).

- ``fp8_dynamic``: torchao ``Float8DynamicActivationFloat8WeightConfig`` (e4m3 weights and
  activations, per-row scales; sm_89+).
- ``int8_dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 x int8 matmul).
- ``int8_weight_only`` / ``int4_weight_only``: torchao weight-only configs (int4 needs CUDA and
  torchao's mslk kernels).
- ``sparse_2to4`` / ``sparse_2to4_cutlass``: ``torch.sparse.to_sparse_semi_structured`` on a weight
  that already has a 2:4 pattern (``nm_sparsity``), through cuSPARSELt or CUTLASS (CUTLASS's 2:4
  kernels are built for sm_80-sm_89, not sm_90).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from effml.errors import EffmlError


@dataclass(frozen=True)
class Kernel:
    name: str
    unsupported: Callable[[nn.Linear, torch.device, torch.dtype], str | None]  # why it cannot run, or None
    convert: Callable[[nn.Linear], nn.Linear]  # a new layer (the argument is left alone)


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _torchao():
    """torchao, imported on first use (it logs about optional C extensions it cannot load)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization as q
    except ImportError as e:
        raise EffmlError("quantized kernels need torchao: pip install 'effml[quant]' (or pip install torchao)") from e
    return q


def _quantized(config_name: str, **kwargs) -> Callable[[nn.Linear], nn.Linear]:
    def convert(layer: nn.Linear) -> nn.Linear:
        q = _torchao()
        new = copy.deepcopy(layer)
        q.quantize_(new, getattr(q, config_name)(**kwargs), filter_fn=lambda m, _: isinstance(m, nn.Linear))
        return new

    return convert


def _needs_cuda(minimum: tuple[int, int], what: str):
    def unsupported(layer: nn.Linear, device: torch.device, dtype: torch.dtype) -> str | None:
        cap = _capability(device)
        if cap is None:
            return f"{what} needs a CUDA GPU (sm_{minimum[0]}{minimum[1]}+); this is {device.type}"
        if cap < minimum:
            return f"{what} needs sm_{minimum[0]}{minimum[1]}+; this GPU is sm_{cap[0]}{cap[1]}"
        return None

    return unsupported


def _fp8_unsupported(layer: nn.Linear, device: torch.device, dtype: torch.dtype) -> str | None:
    reason = _needs_cuda((8, 9), "fp8")(layer, device, dtype)
    if reason:
        return reason
    if layer.in_features % 16 or layer.out_features % 16:
        return f"fp8 matmuls need widths divisible by 16; this layer is {layer.in_features}->{layer.out_features}"
    return None


def _anywhere(layer: nn.Linear, device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _is_2to4(weight: torch.Tensor) -> bool:
    groups = weight.detach().reshape(-1, 4)
    return bool(((groups != 0).sum(dim=1) <= 2).all())


def _sparse_unsupported(cutlass: bool):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    backend = SparseSemiStructuredTensorCUTLASS if cutlass else SparseSemiStructuredTensorCUSPARSELT
    what = "CUTLASS 2:4 sparsity" if cutlass else "2:4 sparsity (cuSPARSELt)"

    def unsupported(layer: nn.Linear, device: torch.device, dtype: torch.dtype) -> str | None:
        cap = _capability(device)
        if cap is None:
            return f"{what} needs a CUDA GPU (sm_80+); this is {device.type}"
        if cap < (8, 0):
            return f"{what} needs sm_80+; this GPU is sm_{cap[0]}{cap[1]}"
        if cutlass and cap >= (9, 0):
            return f"{what} has no kernels for sm_{cap[0]}{cap[1]} (built for sm_80-sm_89); use sparse_2to4"
        if not cutlass and not torch.backends.cusparselt.is_available():
            return f"{what}: this PyTorch build has no cuSPARSELt"
        limits = backend._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
        if limits is None:
            return f"{what} does not take {dtype}"
        rows, cols = layer.weight.shape
        if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
            return (f"{what} needs a weight of multiples of {limits.sparse_min_rows}x{limits.sparse_min_cols}; "
                    f"this one is {rows}x{cols}")
        if not _is_2to4(layer.weight):
            return "the weight has no 2:4 pattern (prune it with nm_sparsity first)"
        return None

    return unsupported


def _to_semi_structured(cutlass: bool) -> Callable[[nn.Linear], nn.Linear]:
    def convert(layer: nn.Linear) -> nn.Linear:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass  # the documented switch (a class flag)
        new = copy.deepcopy(layer)
        new.weight = nn.Parameter(to_sparse_semi_structured(new.weight.detach()), requires_grad=False)
        return new

    return convert


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("fp8_dynamic", _fp8_unsupported, _quantized("Float8DynamicActivationFloat8WeightConfig")),
        Kernel("int8_dynamic", _anywhere, _quantized("Int8DynamicActivationInt8WeightConfig")),
        Kernel("int8_weight_only", _anywhere, _quantized("Int8WeightOnlyConfig")),
        Kernel("int4_weight_only", _needs_cuda((8, 0), "int4 weight-only"), _quantized("Int4WeightOnlyConfig")),
        Kernel("sparse_2to4", _sparse_unsupported(cutlass=False), _to_semi_structured(cutlass=False)),
        Kernel("sparse_2to4_cutlass", _sparse_unsupported(cutlass=True), _to_semi_structured(cutlass=True)),
    )
}


def kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise EffmlError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    return KERNELS[name]
