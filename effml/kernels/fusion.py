"""Fusions across fp8 layers: passes over memory that no single layer's kernel can save.

Once selection has put a BERT block's linears in fp8 (:class:`~effml.kernels.library.Fp8Linear`),
each layer still reads its input once more to quantize it, and the FFN pays a GELU pass in between.
Three rewrites remove those passes and compute the same function:

- siblings: the attention's ``query``, ``key`` and ``value`` read one input, so one quantization and
  one matmul over their stacked weights (1024 → 3072 on BERT-large; the rows keep their own scales)
  serve all three, each taking its slice of the output;
- GELU into the next quantization: the FFN's exact GELU moves from the up-projection's output into
  the down-projection's input quantization (``Fp8Linear(gelu_input=True)``), so the intermediate
  activations (4× the hidden width) are read once instead of three times;
- LayerNorm and the next quantization: a post-LN block's two LayerNorms (BERT's attention output,
  feeding the FFN; the layer output, feeding the next layer's Q/K/V) write their output and its fp8
  form in one pass (:class:`Fp8LayerNorm`), and the fp8 layer reading that output takes the fp8 form
  (:class:`QuantizedHandoff`) instead of reading it again.

All are module swaps, so :func:`effml.kernels.select.whole_model_guard` times the model with and
without them, like any conversion, and reverts what is not faster. They are for eager mode: under
``torch.compile`` inductor fuses the quantization's plain ops into the op before it by itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from effml.kernels.library import Fp8Linear, _quantize_rows

SIBLINGS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))  # HF names of layers reading one input


class SharedMatmul:
    """The stacked matmul of sibling layers, computed once per input and handed out slice by slice.

    A sibling called with another tensor (or the same one changed in place, or a second time) gets a
    fresh computation, so the result is always right; it is merely fast when the siblings are called
    on one input in turn, as an attention block does. Nothing is held once every slice is taken."""

    def __init__(self, stacked: Fp8Linear, widths: list[int]):
        self.stacked, self.widths = stacked, widths
        self._input: torch.Tensor | None = None
        self._version = -1
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._waiting: set[int] = set()

    def slice(self, index: int, x: torch.Tensor) -> torch.Tensor:
        version = _version(x)
        if self._input is not x or self._version != version or index not in self._waiting:
            self._outputs = self.stacked(x).split(self.widths, dim=-1)
            self._input, self._version, self._waiting = x, version, set(range(len(self.widths)))
        self._waiting.discard(index)
        out = self._outputs[index]
        if not self._waiting:
            self._input, self._outputs = None, ()
        return out


def _version(x: torch.Tensor) -> int:
    """x's in-place-change counter; inference tensors keep none (an attention block changes none of
    its inputs in place between the three projections)."""
    return -2 if x.is_inference() else x._version


class Fp8Sibling(nn.Module):
    """One of several fp8 layers fused into a :class:`SharedMatmul`; computes its own output."""

    effml_inference_kernel = True

    def __init__(self, shared: SharedMatmul, index: int, names: tuple[str, ...]):
        super().__init__()
        self.stacked = shared.stacked  # a submodule, so .to() moves it (shared by the siblings)
        self.shared, self.index, self.names = shared, index, names
        self.in_features, self.out_features = shared.stacked.in_features, shared.widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.slice(self.index, x)

    def extra_repr(self) -> str:
        return f"{self.names[self.index]} of one fp8 matmul with {', '.join(n for n in self.names if n != self.names[self.index])}"


class QuantizedHandoff:
    """A LayerNorm's output and its fp8 form, for the fp8 layers that read that output next: each of
    ``readers`` takes it once, then it is dropped (activations live no longer than the forward needs
    them). It serves only the very tensor it was made from, unchanged; any other input is quantized
    by the reader itself."""

    def __init__(self, readers: int = 1):
        self.readers = readers
        self._drop()

    def _drop(self) -> None:
        self._source, self._version, self._quantized, self._left = None, -1, None, 0

    def put(self, source: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._source, self._version, self._quantized, self._left = source, _version(source), quantized, self.readers

    def take(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if x is not self._source or _version(x) != self._version:
            return None
        quantized, self._left = self._quantized, self._left - 1
        if not self._left:
            self._drop()
        return quantized


class Fp8LayerNorm(nn.Module):
    """``nn.LayerNorm`` that also leaves its output quantized (rowwise e4m3) in ``handoff``: on CUDA in
    one Triton pass (``fp8_quant.layer_norm_quantize``), elsewhere as the two plain ops."""

    effml_inference_kernel = True

    def __init__(self, norm: nn.LayerNorm, handoff: QuantizedHandoff):
        super().__init__()
        self.norm, self.handoff = norm, handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        # autocast runs layer_norm in fp32: so does this (the fp8 layer reads it under autocast too)
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            if x.is_cuda and not torch.compiler.is_compiling():
                from effml.kernels.fp8_quant import layer_norm_quantize

                y, *quantized = layer_norm_quantize(rows, norm.weight, norm.bias, norm.eps, dtype)
            else:
                y = F.layer_norm(rows.to(dtype), norm.normalized_shape, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)
                quantized = _quantize_rows(y)
        y = y.view(x.shape)
        self.handoff.put(y, tuple(quantized))
        return y


@dataclass
class Fusions:
    """Module swaps (path → the module there before, the fused one) and a note per fused layer."""

    swaps: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def fp8_fusions(model: nn.Module) -> Fusions:
    """The fusions that apply to ``model``'s fp8 layers (not yet applied: see ``Fusions.swaps``)."""
    found = Fusions()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        _fuse_siblings(module, prefix, found)
        _fuse_gelu(module, prefix, found)
    for path, module in model.named_modules():
        if path.endswith("encoder") and isinstance(getattr(module, "layer", None), nn.ModuleList):
            _fuse_layer_norms(module.layer, f"{path}.layer", found)
    return found


def _fuse_siblings(module: nn.Module, prefix: str, found: Fusions) -> None:
    for names in SIBLINGS:
        layers = [getattr(module, n, None) for n in names]
        if not all(type(m) is Fp8Linear and not m.gelu_input for m in layers):
            continue
        if len({m.in_features for m in layers}) > 1 or len({m.bias is None for m in layers}) > 1:
            continue
        shared = SharedMatmul(Fp8Linear.stacked(layers), [m.out_features for m in layers])
        for i, (name, layer) in enumerate(zip(names, layers, strict=True)):
            found.swaps[prefix + name] = (layer, Fp8Sibling(shared, i, names))
            found.notes[prefix + name] = f"one quantization and matmul with {', '.join(n for n in names if n != name)}"


def _fuse_gelu(module: nn.Module, prefix: str, found: Fusions) -> None:
    """A BERT-style layer (``intermediate.dense`` → ``intermediate.intermediate_act_fn`` →
    ``output.dense``, as HF's BERT, RoBERTa and ViT name them) whose down-projection is fp8."""
    intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
    act = getattr(intermediate, "intermediate_act_fn", None)
    down = getattr(output, "dense", None)
    if type(down) is not Fp8Linear or down.gelu_input or not isinstance(act, nn.Module) or not _is_exact_gelu(act):
        return
    fused = copy.copy(down)  # shares the weights; only the flag differs
    fused.gelu_input = True
    found.swaps[f"{prefix}intermediate.intermediate_act_fn"] = (act, nn.Identity())
    found.swaps[f"{prefix}output.dense"] = (down, fused)
    found.notes[f"{prefix}output.dense"] = "the GELU before it applied in its input quantization"


def _fuse_layer_norms(layers: nn.ModuleList, prefix: str, found: Fusions) -> None:
    """HF's post-LN BERT layers: ``attention.output.LayerNorm`` feeds ``intermediate.dense``, and
    ``output.LayerNorm`` feeds the next layer's ``attention.self`` Q/K/V (the residuals read the
    unquantized output, as before). Fused where every reader is fp8."""
    for i, layer in enumerate(layers):
        here = f"{prefix}.{i}"
        _hand_off(found, layer, here, "attention.output.LayerNorm",
                  {f"{here}.intermediate.dense": _get(layer, "intermediate.dense")})
        if i + 1 < len(layers):
            readers = {f"{prefix}.{i + 1}.attention.self.{n}": _get(layers[i + 1], f"attention.self.{n}") for n in SIBLINGS[0]}
            _hand_off(found, layer, here, "output.LayerNorm", readers)


def _hand_off(found: Fusions, layer: nn.Module, prefix: str, norm_path: str, readers: dict[str, nn.Module | None]) -> None:
    norm = _get(layer, norm_path)
    if type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None:
        return
    current = {path: found.swaps[path][1] if path in found.swaps else m for path, m in readers.items()}  # as fused so far
    if all(type(m) is Fp8Sibling for m in current.values()) and len({id(m.shared) for m in current.values()}) == 1:
        handoff = QuantizedHandoff(readers=1)  # the stacked matmul reads it once for all
        next(iter(current.values())).shared.stacked.handoff = handoff  # made by this pass: no layout shares it
    elif all(type(m) is Fp8Linear for m in current.values()):
        handoff = QuantizedHandoff(readers=len(current))
        for path, module in current.items():
            reader = copy.copy(module)  # shares the weights; only the handoff differs
            reader.handoff = handoff
            found.swaps[path] = (found.swaps[path][0] if path in found.swaps else module, reader)
    else:
        return
    found.swaps[f"{prefix}.{norm_path}"] = (norm, Fp8LayerNorm(norm, handoff))
    for path in current:
        found.notes[path] = "; ".join(filter(None, [found.notes.get(path), "input's fp8 form from the LayerNorm before it"]))


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _is_exact_gelu(act: nn.Module) -> bool:
    probe = torch.linspace(-6, 6, 97)
    try:
        return torch.allclose(act(probe), F.gelu(probe), atol=1e-6)
    except Exception:  # noqa: BLE001 - an activation that cannot run on a CPU probe is not fused
        return False
