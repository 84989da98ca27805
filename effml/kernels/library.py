"""The alternative kernels a dense ``nn.Linear`` can be swapped for, and where each can run.

Every kernel is a name (``hardware.kernels`` lists the allowed ones), a check that says why it
cannot run on a device / layer / dtype (or None), and a conversion that returns a new layer computing
the same function with that kernel. Whether it is *kept* is decided by ``effml.kernels.select``: by
measurement, because running is not the same as being faster (docs/ARCHITECTURE.md §6: on an H100 with stock
PyTorch, 2:4 sparse matmuls were 4-30x slower than dense on BERT shapes, ``torch._int_mm`` 5.6x
slower than bf16, fp8 1.9x faster).

- ``fp8_rowwise``: :class:`Fp8Linear`, e4m3 weights (one scale per output row, quantized once) and
  activations (one scale per token, on the fly) multiplied by ``torch._scaled_mm`` (sm_89+).
- ``fp8_dynamic``: the same recipe through torchao's ``Float8DynamicActivationFloat8WeightConfig``.
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
from torch.nn import functional as F

from effml.errors import EffmlError
from effml.kernels import names


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
        raise EffmlError("quantized kernels need torchao: pip install torchao") from e
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


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


class Fp8Linear(nn.Module):
    """``x @ W.T + b`` with both operands in float8 e4m3 and per-row scales (DeepSeek-V3 and torchao's
    "rowwise" recipe; the format: Micikevicius et al., "FP8 Formats for Deep Learning", arXiv
    2209.05433). W is quantized once with one scale per output feature; x is quantized per token at
    every call (dynamic), so no calibration is needed: on CUDA by one Triton kernel
    (``effml.kernels.fp8_quant``). ``torch._scaled_mm`` applies both scales in the epilogue and writes
    the output in the dtype an ``nn.Linear`` would return, accumulating with the tensor cores' fast fp8 accumulation as torchao's
    inference configs do (H200, 65536x1024x4096: 0.47 ms against 0.59 ms without, bf16 0.75 ms).
    Inference only (no backward)."""

    effml_inference_kernel = True  # measurement code: no training step through this module

    def __init__(self, layer: nn.Linear, gelu_input: bool = False):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.gelu_input = gelu_input  # computes layer(gelu(x)): see effml.kernels.fusion
        self.handoff = None  # where a fused LayerNorm before it leaves its output quantized (fusion)
        w = layer.weight.detach().float()
        scale = _rowwise_scale(w)
        self.weight = nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)  # (out, in)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def stacked(cls, layers: list[Fp8Linear]) -> Fp8Linear:
        """One layer computing ``layers`` (same input width, all with or all without a bias) side by
        side, outputs concatenated: each weight row keeps its own scale, so each slice is exact."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layers[0].in_features, sum(m.out_features for m in layers)
        new.gelu_input, new.handoff = layers[0].gelu_input, None
        new.weight = nn.Parameter(torch.cat([m.weight for m in layers]), requires_grad=False)
        new.register_buffer("weight_scale", torch.cat([m.weight_scale for m in layers], dim=1))
        biases = [m.bias for m in layers]
        new.bias = None if biases[0] is None else nn.Parameter(torch.cat(biases), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        ready = self.handoff.take(x) if self.handoff is not None else None
        with torch.no_grad():  # inference only
            quantized, scale = ready or _quantize_rows_on(rows, gelu=self.gelu_input)
        dtype = _output_dtype(x)
        fused_bias = self.bias is not None and dtype != torch.float32  # _scaled_mm adds no bias to fp32
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias.to(dtype) if fused_bias else None, out_dtype=dtype,
                               use_fast_accum=True)
        if self.bias is not None and not fused_bias:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        gelu = ", GELU of the input fused in" if self.gelu_input else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise{gelu}"


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What an ``nn.Linear`` would return for ``x``: autocast's dtype where autocast is on (BERT's
    LayerNorm hands the next layer fp32 under autocast), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _rowwise_scale(t: torch.Tensor) -> torch.Tensor:
    """One fp32 scale per row mapping its largest magnitude to e4m3's largest value (times the
    reciprocal: what PyTorch's CUDA division by a scalar does, and the Triton kernel too)."""
    return (t.abs().amax(dim=-1, keepdim=True).float() * (1.0 / E4M3_MAX)).clamp(min=1e-12)


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _rowwise_scale(rows)
    return (rows * scale.reciprocal()).to(torch.float8_e4m3fn), scale  # as the Triton kernel: one division a row


def _quantize_rows_on(rows: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on CUDA; the plain ops elsewhere, and inside ``torch.compile``, where inductor
    fuses them into the op before (a LayerNorm, a GELU) and saves the pass over memory altogether."""
    if rows.is_cuda and not torch.compiler.is_compiling():
        from effml.kernels.fp8_quant import quantize_rows

        return quantize_rows(rows, gelu=gelu)
    return _quantize_rows(F.gelu(rows) if gelu else rows)


def _fp8_rowwise(layer: nn.Linear) -> nn.Module:
    return Fp8Linear(layer)


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
        Kernel("fp8_rowwise", _fp8_unsupported, _fp8_rowwise),
        Kernel("fp8_dynamic", _fp8_unsupported, _quantized("Float8DynamicActivationFloat8WeightConfig")),
        Kernel("int8_dynamic", _anywhere, _quantized("Int8DynamicActivationInt8WeightConfig")),
        Kernel("int8_weight_only", _anywhere, _quantized("Int8WeightOnlyConfig")),
        Kernel("int4_weight_only", _needs_cuda((8, 0), "int4 weight-only"), _quantized("Int4WeightOnlyConfig")),
        Kernel("sparse_2to4", _sparse_unsupported(cutlass=False), _to_semi_structured(cutlass=False)),
        Kernel("sparse_2to4_cutlass", _sparse_unsupported(cutlass=True), _to_semi_structured(cutlass=True)),
    )
}


assert tuple(KERNELS) == names.KERNELS  # one list of names (effml.kernels.names), all implemented


def kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise EffmlError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    return KERNELS[name]
