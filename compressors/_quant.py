"""Uniform affine quantization, simulated in floating point: what ``ptq`` and ``qat`` share.

A real value r is stored as an integer q of b bits, r ≈ S·(q − Z), with a real scale S and an integer
zero point Z chosen so that 0 is exactly representable (zero padding, ReLU zeros and pruned weights
stay exact): Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (arXiv 1712.05877), eq. 1.

- symmetric: Z = 0, q ∈ [−(2^(b−1) − 1), 2^(b−1) − 1], S = max|r| / (2^(b−1) − 1): the restricted
  signed range Jacob et al. use for weights (−2^(b−1) never occurs) and Wu et al., "Integer
  Quantization for Deep Learning Inference" (arXiv 2004.09602) recommend for int8 weights;
- asymmetric: q ∈ [0, 2^b − 1], S = (max − min) / (2^b − 1), Z = round(−min / S): a skewed range
  (inputs after GELU or ReLU) keeps all its levels.

Granularity: one (S, Z) per tensor, or one per output channel (axis 0) for weights, which
Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference: A whitepaper"
(arXiv 1806.08342) and Nagel et al., "A White Paper on Neural Network Quantization" (arXiv
2106.08295, §2) recommend: channels of very different magnitude no longer share one step size.

Range estimation ("observers"; Nagel et al. §3.1, Wu et al. §4):

- ``minmax``: the extremes;
- ``percentile``: the p-th and (100 − p)-th percentiles, clipping rare outliers (Wu et al. calibrate
  activations at 99.9 to 99.9999; the best point depends on the network);
- ``mse``: the clipping range α·[min, max] that minimizes ‖Q(x) − x‖² over a grid of α (Nagel et
  al. §3.1), one α per channel for per-channel grids.

Simulation ("fake quantization", Jacob et al. §3): x ↦ S·(clamp(round(x/S) + Z, qmin, qmax) − Z);
its gradient is the straight-through estimator: 1 inside the representable range, 0 where clamped
(``torch.fake_quantize_per_{tensor,channel}_affine`` implement both). ``FakeQuantized`` wraps a
Linear or Conv and quantizes its weight (range re-estimated from the weight at every call, as Jacob
et al. do) and its input (range observed from data and kept in buffers, so checkpoints resume it).

The last part is what the two compressors share: their config, trained weights from a finished run
(``compressor.weights``), and ``finalize``'s real kernels through ``convert_linears``: a quantized
Linear gets the configured kernel (torchao int8/int4/fp8) where the hardware's selector measures it
faster; every other quantized layer stays simulated, so the run's accuracy is the quantized one.
The speed measurement and ``model.pt`` take the deployable model instead (``deployable``): there a
simulated layer is the plain layer with its weight on the grid, since no kernel quantizes its inputs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.choice import check_choices, choice
from effml.compressors._masks import LAYER_TYPES, matches
from effml.compressors.base import Compressor, CompressorConfig, RunContext
from effml.errors import EffmlError
from effml.kernels.library import kernel
from effml.kernels.names import QUANTIZED
from effml.kernels.select import check_allowed, convert_linears, hardware_device, precision_dtype, set_module
from effml.teachers import TrainedWeightsConfig, load_weights, trained_state

Observer = choice("Observer", "minmax percentile mse")  # how a tensor's range is found (see the observers below)
MIN_BITS, MAX_BITS = 2, 16
EPS = torch.finfo(torch.float32).eps  # the smallest scale: an all-zero range quantizes to exact zeros
MSE_FRACTIONS = torch.linspace(1.0, 0.01, 100)  # α searched by the mse observer, widest first (ties keep it)
MSE_SAMPLE = 1 << 16  # values per channel the mse search scores (a strided sample of larger tensors)


def check_bits(field: str, bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise EffmlError(f"{field} must be in [{MIN_BITS}, {MAX_BITS}] bits; got {bits}")


# -- the grid ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """The integers a tensor is quantized to: ``bits``, symmetric or not, per tensor or per channel."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False  # one range per output channel (axis 0)
    # > 0: one range per block of consecutive output rows, this many blocks (Q-BERT's group-wise
    # quantization, compressors/qbert.py); the rows of a block share their scale (stored per row)
    groups: int = 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        return -self.qmax if self.symmetric else 0

    @property
    def per_row(self) -> bool:
        """The scale is a vector along axis 0 (per channel, or per group of rows repeated per row)."""
        return self.per_channel or self.groups > 0

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        if self.groups:
            return f"{self.bits} bits, {kind}, {self.groups} groups of rows"
        return f"{self.bits} bits, {kind}, per {'channel' if self.per_channel else 'tensor'}"


def scale_zero_point(lo: Tensor, hi: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """S and Z that map the range [lo, hi] (widened to contain 0) onto the grid (Jacob et al. eq. 1)."""
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    if grid.symmetric:
        scale = (torch.maximum(-lo, hi) / grid.qmax).clamp(min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp(min=EPS)
    zero_point = (grid.qmin - torch.round(lo / scale)).clamp(grid.qmin, grid.qmax)
    return scale, zero_point.to(torch.int32)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, grid: Grid) -> Tensor:
    """x on the grid, in x's dtype; the gradient is straight-through inside the range, 0 outside."""
    if grid.per_row:
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, grid.qmin, grid.qmax)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, grid.qmin, grid.qmax)


# -- observers -----------------------------------------------------------------------------------
def observe_range(x: Tensor, observer: str, grid: Grid, percentile: float = 99.99) -> tuple[Tensor, Tensor]:
    """The range [lo, hi] to quantize ``x`` on: per output channel (vectors) or per tensor (scalars)."""
    if grid.groups:  # each block of rows is one row of the range search, its range repeated per row
        blocks = x.detach().float().reshape(grid.groups, -1)  # row-major: block g holds rows g·k … g·k + k − 1
        lo, hi = observe_range(blocks, observer, replace(grid, groups=0, per_channel=True), percentile)
        return lo.repeat_interleave(x.shape[0] // grid.groups), hi.repeat_interleave(x.shape[0] // grid.groups)
    rows = x.detach().float().flatten(1) if grid.per_channel else x.detach().float().reshape(1, -1)
    if observer == "percentile":
        lo, hi = percentile_range(rows, percentile)
    elif observer == "mse":
        lo, hi = mse_range(rows, grid)
    else:
        lo, hi = rows.amin(1), rows.amax(1)
    return (lo, hi) if grid.per_channel else (lo[0], hi[0])


def percentile_range(rows: Tensor, percentile: float) -> tuple[Tensor, Tensor]:
    """The (100 − p)-th and p-th percentiles of each row (``kthvalue``: no size limit, unlike ``quantile``)."""
    n = rows.shape[1]
    k = min(n, max(1, math.ceil(percentile / 100 * n)))
    return rows.kthvalue(n - k + 1, dim=1).values, rows.kthvalue(k, dim=1).values


def mse_range(rows: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """Per row, the α·[min, max] whose quantization error on the row is smallest (Nagel et al. §3.1)."""
    lo, hi = rows.amin(1), rows.amax(1)
    sample = rows[:, :: max(1, rows.shape[1] // MSE_SAMPLE)].contiguous()
    per_row = replace(grid, per_channel=True)
    best_error = torch.full_like(lo, math.inf)
    best = torch.ones_like(lo)
    for fraction in MSE_FRACTIONS.tolist():
        scale, zero_point = scale_zero_point(fraction * lo, fraction * hi, per_row)
        error = (fake_quantize(sample, scale, zero_point, per_row) - sample).square().mean(1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, torch.full_like(best, fraction), best)
    return best * lo, best * hi


# -- modules -------------------------------------------------------------------------------------
class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight on a range fitted to the weight itself at every call: no state, so
    the grid follows the weights as they train (Jacob et al. §3)."""

    def __init__(self, grid: Grid, observer: str = "minmax", percentile: float = 99.99):
        super().__init__()
        self.grid, self.observer, self.percentile = grid, observer, percentile

    def forward(self, weight: Tensor) -> Tensor:
        lo, hi = observe_range(weight, self.observer, self.grid, self.percentile)
        return fake_quantize(weight, *scale_zero_point(lo, hi, self.grid), self.grid)

    def extra_repr(self) -> str:
        return f"{self.grid.describe()}, {self.observer}"


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input on one range observed from data, kept in buffers (``lo``,
    ``hi``, ``updates``) so a checkpoint resumes it exactly.

    While ``observing`` (QAT's first N training steps, PTQ's calibration batches; the compressor
    sets it) every call first updates the range from its input: by an exponential moving average
    (``ema_decay``; Jacob et al. §3 smooth the ranges with a factor close to 1) or, calibrating
    (``ema_decay=None``), by the extremes seen (minmax) or the mean of the per-batch estimates
    (percentile, mse). Before its first update it passes the input through."""

    def __init__(self, grid: Grid, observer: str = "minmax", percentile: float = 99.99,
                 ema_decay: float | None = None):
        super().__init__()
        self.grid, self.observer, self.percentile, self.ema_decay = grid, observer, percentile, ema_decay
        self.observing = False
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.update(x)
        quantized = fake_quantize(x, *scale_zero_point(self.lo, self.hi, self.grid), self.grid)
        return torch.where(self.updates > 0, quantized, x)  # no host sync in the forward pass

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        lo, hi = observe_range(x, self.observer, self.grid, self.percentile)
        seen = int(self.updates)
        if seen:
            lo, hi = self.combined(lo, hi, seen)
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        self.updates += 1

    def combined(self, lo: Tensor, hi: Tensor, seen: int) -> tuple[Tensor, Tensor]:
        """The stored range moved by one more batch's range."""
        if self.ema_decay is not None:
            return self.lo.lerp(lo, 1 - self.ema_decay), self.hi.lerp(hi, 1 - self.ema_decay)
        if self.observer == "minmax":
            return torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        return self.lo.lerp(lo, 1 / (seen + 1)), self.hi.lerp(hi, 1 / (seen + 1))  # the running mean

    def extra_repr(self) -> str:
        averaging = f"ema {self.ema_decay}" if self.ema_decay is not None else "calibration"
        return f"{self.grid.describe()}, {self.observer}, {averaging}"


class FakeQuantized(nn.Module):
    """A Linear or Conv computing with its weight and input fake-quantized (simulated WbAb).

    The original layer is kept as ``layer`` (its weight and bias train as before); either quantizer
    may be None (weight-only quantization; a weight already snapped to its grid)."""

    def __init__(self, layer: nn.Module, weight_quantizer: WeightQuantizer | None,
                 input_quantizer: ActivationQuantizer | None = None):
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.layer.weight
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)

    @torch.no_grad()
    def snap(self) -> float:
        """Put the weight on its grid for good and drop the weight quantizer (quantizing a snapped
        weight again could move a clipped range); returns the relative error ‖Q(w) − w‖ / ‖w‖."""
        weight = self.layer.weight
        quantized = self.weight_quantizer(weight)
        error = float((quantized - weight).norm() / weight.norm().clamp(min=EPS))
        weight.copy_(quantized)
        self.weight_quantizer = None
        return error


# -- the model -----------------------------------------------------------------------------------
def quantizable(model: nn.Module, layer_types: list[str], skip: list[str], method: str) -> dict[str, nn.Module]:
    """The layers of ``layer_types`` whose names match no ``skip`` pattern, by qualified name."""
    types = tuple(LAYER_TYPES[t] for t in layer_types)
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, types) and not matches(n, skip)}
    if not layers:
        raise EffmlError(f"compressor {method} found no {layer_types} layers outside {skip}")
    return layers


def wrap(model: nn.Module, layers: dict[str, nn.Module], make) -> dict[str, FakeQuantized]:
    """Put ``make(path, layer)`` (a ``FakeQuantized``) in place of every layer, in the model."""
    wrapped = {path: make(path, layer) for path, layer in layers.items()}
    for path, module in wrapped.items():
        set_module(model, path, module)
    return wrapped


def plain_keys_to_wrapped(state: dict[str, Tensor], paths) -> dict[str, Tensor]:
    """A plain model's state dict keyed for the model with these paths wrapped: ``a.weight`` →
    ``a.layer.weight`` (a finished fp32 run's weights, loaded into a QAT model)."""
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        out[f"{module}.layer.{leaf}" if module in paths else key] = value
    return out


def observer_state(model: nn.Module) -> dict[str, Tensor]:
    """The buffers of every ``ActivationQuantizer`` in the model, by state-dict key."""
    return {
        f"{path}.{name}": buffer
        for path, module in model.named_modules() if isinstance(module, ActivationQuantizer)
        for name, buffer in module.named_buffers()
    }


# -- what the ptq and qat compressors share ------------------------------------------------------
QuantKernel = choice("QuantKernel", (*QUANTIZED, "none"))  # the real kernel finalize tries, or none
@dataclass
class QuantConfig(CompressorConfig):
    """Fields ptq and qat share; the defaults are the common int8 setting (W8A8)."""

    bits: int = 8  # weights
    # {module-name pattern: weight bits}, first match wins; on the command line +compressor.layer_bits.NAME=4
    layer_bits: dict[str, int] = field(default_factory=dict)
    per_channel: bool = True  # weights: one scale per output channel
    symmetric: bool = True  # weights: zero point 0, restricted signed range
    weight_observer: Observer = Observer.minmax
    activations: bool = True  # also fake-quantize each quantized layer's input (false: weight-only)
    activation_bits: int = 8
    activation_symmetric: bool = False  # asymmetric (uint8): a layer's input after GELU/ReLU is skewed
    percentile: float = 99.99  # the percentile observer's clipping point
    layer_types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d"])
    skip: list[str] = field(default_factory=lambda: ["classifier"])  # the output layer stays in full precision
    kernel: QuantKernel = QuantKernel.int8_dynamic  # tried on quantized Linears at finalize (hardware selects)
    weights: TrainedWeightsConfig = field(default_factory=TrainedWeightsConfig)

    def __post_init__(self):
        check_choices(self, "compressor")
        check_bits("compressor.bits", self.bits)
        check_bits("compressor.activation_bits", self.activation_bits)
        for pattern, bits in self.layer_bits.items():
            check_bits(f"compressor.layer_bits[{pattern!r}]", bits)
        if not 50 < self.percentile <= 100:
            raise EffmlError(f"compressor.percentile must be in (50, 100]; got {self.percentile}")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise EffmlError(f"compressor.layer_types: unknown {sorted(unknown)}; choose from {sorted(LAYER_TYPES)}")


class Quantizer(Compressor):
    """Base of ptq and qat: the quantized layers, trained weights from elsewhere, the real kernels."""

    owns = frozenset({"quantization"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        kernels = metrics["compressors"][name]["kernels"]  # quantized layers per kernel ("simulated" included)
        return None if sum(kernels.values()) > 0 else "no layer was quantized"

    def __init__(self, cfg: QuantConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.targets: dict[str, nn.Module] = {}  # the layers to quantize, as the model had them
        self.layers: dict[str, FakeQuantized] = {}
        self.errors: dict[str, float] = {}  # relative weight error per layer, measured when snapped
        self.example_inputs: dict[str, Tensor] | None = None  # the shapes kernels are timed on
        self.datamodule = None

    # -- contract ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        self.model = model
        self.targets = quantizable(model, self.cfg.layer_types, self.cfg.skip, self.name)
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.datamodule = datamodule
        self.example_inputs = datamodule.example_inputs(ctx.measure.batch_size)
        self.check_kernel(ctx.hardware)
        if self.cfg.weights.source != "none":
            self.load_trained(ctx, datamodule)

    def report(self) -> dict[str, Any]:
        chosen = {d["layer"]: d["kernel"] for d in self.kernel_decisions if d["kernel"] != "dense"}
        layers = {
            path: {"bits": self.bits_for(path), "weight_error": round(error, 6), "kernel": chosen.get(path, "simulated")}
            for path, error in self.errors.items()
        }
        kernels: dict[str, int] = {}
        for layer in layers.values():
            kernels[layer["kernel"]] = kernels.get(layer["kernel"], 0) + 1
        cfg = self.cfg
        return {
            "bits": cfg.bits,
            "activation_bits": cfg.activation_bits if cfg.activations else None,
            "weights": f"{'per-channel' if cfg.per_channel else 'per-tensor'} "
                       f"{'symmetric' if cfg.symmetric else 'asymmetric'} {cfg.weight_observer}",
            "trained_weights": self.cfg.weights.describe(),
            "kernel": cfg.kernel,
            "kernels": kernels,  # layers per kernel; "simulated": fake-quantized in floating point
            "deployed": "simulated layers deploy as plain layers, weights on the grid (model.pt, speed)"
                        if kernels.get("simulated") else "every quantized layer on its kernel",
            "mean_weight_error": round(sum(self.errors.values()) / max(len(self.errors), 1), 6),
            "layers": layers,
        }

    # -- building blocks -----------------------------------------------------------------------
    def bits_for(self, path: str) -> int:
        return next((bits for pattern, bits in self.cfg.layer_bits.items() if matches(path, [pattern])), self.cfg.bits)

    def quantized(self, path: str, layer: nn.Module) -> FakeQuantized:
        cfg = self.cfg
        weight = WeightQuantizer(Grid(self.bits_for(path), cfg.symmetric, cfg.per_channel), cfg.weight_observer,
                                 cfg.percentile)
        return FakeQuantized(layer, weight, self.input_quantizer() if cfg.activations else None)

    def input_quantizer(self) -> ActivationQuantizer:
        """A new layer's input quantizer: ptq calibrates it, qat moves it by a moving average."""
        raise NotImplementedError

    def activation_grid(self) -> Grid:
        return Grid(self.cfg.activation_bits, self.cfg.activation_symmetric)

    def input_quantizers(self) -> list[ActivationQuantizer]:
        return [q.input_quantizer for q in self.layers.values() if q.input_quantizer is not None]

    def set_observing(self, observing: bool) -> None:
        for quantizer in self.input_quantizers():
            quantizer.observing = observing

    def load_trained(self, ctx: RunContext, datamodule) -> None:
        """The finished model's weights into this one (observer buffers left as they are)."""
        state, where, _ = trained_state(self.cfg.weights, ctx.output_root, ctx.seed, datamodule.info,
                                        "trained model", ctx.data)
        state = plain_keys_to_wrapped(state, self.layers)
        load_weights(self.model, {**observer_state(self.model), **state}, where, "trained model")

    def check_kernel(self, hardware) -> None:
        """The kernel asked for must be on the target's allow-list in every selection mode, and under
        ``hardware.selection=force`` run on every quantized Linear: one line now, before any training,
        rather than at finalize."""
        if self.cfg.kernel == "none":
            return
        check_allowed(hardware, self.cfg.kernel)
        if hardware.selection != "force":
            return
        device, dtype = hardware_device(hardware), precision_dtype(hardware.precision)
        for path, layer in self.targets.items():
            why_not = isinstance(layer, nn.Linear) and kernel(self.cfg.kernel).unsupported(layer, device, dtype)
            if why_not:
                raise EffmlError(f"hardware.selection=force: kernel {self.cfg.kernel} cannot run for {path}: {why_not}")

    # -- finalize ------------------------------------------------------------------------------
    def deployable(self, model: nn.Module) -> nn.Module:
        """Speed and model.pt: simulated layers deploy as plain layers with their weights on the grid
        (the accuracy reported is the simulated, input-quantized one)."""
        if not any(isinstance(m, FakeQuantized) for m in model.modules()):
            return model
        return deployed_copy(model)

    def realize(self, model: nn.Module, hardware) -> nn.Module:
        """Snap every weight to its grid, then give each quantized Linear the configured kernel where
        the hardware's selector keeps it; every other layer stays simulated, so the accuracy measured
        next is the quantized one either way."""
        self.set_observing(False)
        self.errors = {path: layer.snap() for path, layer in self.layers.items()}
        for path, layer in self.layers.items():
            set_module(model, path, simulated(layer))
        if self.cfg.kernel != "none":
            self.convert_kernels(model, hardware)
        return model

    def convert_kernels(self, model: nn.Module, hardware) -> None:
        linears = {path: q for path, q in self.layers.items() if isinstance(q.layer, nn.Linear)}
        for path, layer in linears.items():  # the selector times plain layers, their weights on the grid
            set_module(model, path, layer.layer)
        decisions = convert_linears(model, {path: [self.cfg.kernel] for path in linears}, self.example_inputs, hardware)
        kernels = {d.layer: d.kernel for d in decisions}  # (also holds a whole-model verdict)
        for path, layer in linears.items():
            if kernels.get(path, "dense") == "dense":
                set_module(model, path, simulated(layer))
        self.kernel_decisions = [d.as_dict() for d in decisions]


def deployed_copy(model: nn.Module) -> nn.Module:
    """``model`` with every simulated layer replaced by its plain layer (weight already on the grid):
    what runs where no quantized kernel was kept, since nothing there quantizes the inputs."""
    model = copy.deepcopy(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, FakeQuantized):
            set_module(model, path, module.layer)
    return model


def simulated(layer: FakeQuantized) -> nn.Module:
    """What stays of a snapped layer without a real kernel: the wrapper while it quantizes its
    input (frozen range), else the plain layer with its weight on the grid."""
    return layer if layer.input_quantizer is not None else layer.layer
