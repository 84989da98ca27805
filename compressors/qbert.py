"""Q-BERT: Hessian-aware mixed-precision, group-wise quantization of BERT, then quantization-aware training.

Shen, Dong, Ye, Ma, Yao, Gholami, Mahoney, Keutzer, "Q-BERT: Hessian Based Ultra Low Precision
Quantization of BERT", AAAI 2020 (arXiv 1909.05840), §3.

- **Sensitivity (§3.2).** For each block of weights (an encoder layer's six Linears, as the paper does,
  or each Linear: ``granularity``), the top eigenvalue λ of the loss Hessian restricted to that block,
  by power iteration on Hessian-vector products (∂/∂θ_b of g_b·v: double backward through the
  gradient), on each of ``hessian_batches`` fixed training batches (the paper uses 10% of the
  training data; the defaults here, 10 batches of 32, are about 3% of Rotten Tomatoes). BERT's
  Hessian spectrum varies between batches (the paper plots λ per layer over batches), so the paper's
  sensitivity is Ω = |mean(λ)| + std(λ). Beside λ, the Hessian trace by Hutchinson's estimator (Rademacher v,
  tr H ≈ mean vᵀHv), per block and batch, mean and variance: the average curvature, which HAWQ-V2
  (Dong et al. 2020) and PyHessian (Yao et al. 2020, whose estimators these are) use. The model is
  evaluated in eval mode (no dropout), in full precision, on a seeded choice of training examples,
  with random vectors from a seeded generator: the numbers are a function of the seed.
- **Bit allocation.** The paper gives higher precision to higher Ω and picks the mixes by hand
  ("2/3 MP"). Here a greedy fills a budget (``avg_bits``, the average weight bits over the quantized
  Linears): every block starts at the lowest of ``bit_choices``; while a raise fits the budget, raise
  the block whose next bit width lowers Ω·‖Q_b(W) − W‖² the most per added bit (the second-order
  estimate ½λ‖ΔW‖² of the loss increase, λ's sign dropped; ‖Q_b(W) − W‖² measured with the group
  grid itself). ``sensitivity=trace`` uses Ω of the trace divided by the block's weights (its mean
  eigenvalue) instead. With equal blocks and errors, more Ω never gets fewer bits.
- **Group-wise quantization (§3.3, Fig. 4).** The paper's groups partition a weight matrix by
  *output neurons*: each group is a run of consecutive output rows (for W_q, W_k, W_v a part of one
  head's rows) with its own quantization range; one group is layer-wise, as many as rows is per
  channel. ``groups`` is the number of groups per matrix (default 128, the paper's choice of trade-off);
  where a matrix has fewer rows or a count that ``groups`` does not divide, it gets gcd(groups, rows)
  groups (every matrix of MiniLM-L6: 128).
- **QAT.** The quantization and training are ``qat``'s (compressors/qat.py, compressors/_quant.py):
  the same fake-quantized Linears with straight-through gradients, EMA input ranges (8-bit
  activations, the paper's setting), frozen after ``freeze_observers_after`` steps; only the weight
  grid differs per layer (bits chosen here, symmetric, one range per group).

Scope: the encoder's Linears are quantized; the embeddings (which the paper quantizes to 8 bits),
pooler and classifier stay in full precision. No sub-byte kernel exists here, so ``kernel`` defaults
to none: the weights stay on their grids in fp32 and the size is reported in bits.

Phases and resume: the Hessian analysis runs once, at the start of the training stage, and is
written to ``qbert_sensitivity.json`` in the run folder before QAT starts; a rerun of a killed run
reads it back instead of recomputing, and the allocation also travels in the compressor's state
(every checkpoint and ``end.pt``). ``finalize`` draws ``qbert_sensitivity.png``: each block's λ over
the batches and its trace beside the bits it got.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml import distributed
from effml.choice import check_choices, choice
from effml.compressors._quant import (
    Grid,
    QuantKernel,
    WeightQuantizer,
    check_bits,
    fake_quantize,
    observe_range,
    scale_zero_point,
    wrap,
)
from effml.compressors.base import RunContext, Smoke, Stage
from effml.compressors.qat import QATConfig, QuantizationAwareTraining
from effml.errors import EffmlError
from effml.registry import COMPRESSORS

Granularity = choice("Granularity", "layer linear")  # a block: an encoder layer's Linears, or one Linear
Sensitivity = choice("Sensitivity", "eigenvalue trace")  # what orders the blocks (see the docstring)
SENSITIVITY_FILE = "qbert_sensitivity.json"
PLOT_FILE = "qbert_sensitivity.png"
ENCODER = "bert.encoder.layer."
log = logging.getLogger("effml")


@dataclass
class QBERTConfig(QATConfig):
    """Q-BERT (Shen et al. 2020): Hessian sensitivity per encoder layer (top eigenvalue by power
    iteration, trace by Hutchinson, over several batches), bits from bit_choices under an average
    avg_bits budget, group-wise weight ranges (groups per matrix), then QAT with 8-bit activations."""

    name: str = "qbert"
    bit_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    avg_bits: float = 3.0  # average weight bits over the quantized Linears (weighted by their sizes)
    groups: int = 128  # ranges per weight matrix, each a run of consecutive output rows (§3.3)
    granularity: Granularity = Granularity.layer
    sensitivity: Sensitivity = Sensitivity.eigenvalue
    hessian_batches: int = 10  # training batches the spectrum is measured on (mean and spread)
    hessian_batch_size: int = 32
    power_iterations: int = 20  # at most, per block and batch
    power_tolerance: float = 1e-3  # stop when λ moves less than this, relatively (PyHessian's default)
    hutchinson_samples: int = 20  # Rademacher vectors per block and batch
    kernel: QuantKernel = QuantKernel.none  # no sub-byte kernel: weights stay on their grids

    def __post_init__(self):
        check_choices(self, "compressor")
        super().__post_init__()
        if not self.bit_choices:
            raise EffmlError("compressor.bit_choices must name at least one bit width; got []")
        for bits in self.bit_choices:
            check_bits("compressor.bit_choices", bits)
        self.bit_choices = sorted(set(self.bit_choices))
        if not self.avg_bits >= self.bit_choices[0]:
            raise EffmlError(f"compressor.avg_bits must be >= the smallest of compressor.bit_choices "
                             f"({self.bit_choices[0]}): no allocation fits {self.avg_bits} bits a weight")
        if self.layer_bits:
            raise EffmlError("compressor.layer_bits is qat's; qbert chooses every layer's bits from the Hessian")
        if self.groups < 1:
            raise EffmlError(f"compressor.groups must be >= 1; got {self.groups}")
        for name in ("hessian_batches", "hessian_batch_size", "power_iterations", "hutchinson_samples"):
            if getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {getattr(self, name)}")
        if not 0 < self.power_tolerance < 1:
            raise EffmlError(f"compressor.power_tolerance must be in (0, 1); got {self.power_tolerance}")


# -- Hessian estimates -----------------------------------------------------------------------------
Hvp = Callable[[list[Tensor]], list[Tensor]]


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def top_eigenvalue(hvp: Hvp, like: list[Tensor], iterations: int, tolerance: float,
                   generator: torch.Generator) -> float:
    """The eigenvalue of largest magnitude of the symmetric operator ``hvp`` by power iteration
    (PyHessian's ``eigenvalues``): v ← Hv/‖Hv‖, λ = vᵀHv, until λ moves less than ``tolerance``."""
    v = [torch.randn(t.shape, generator=generator).to(t) for t in like]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eigenvalue = None
    for _ in range(iterations):
        hv = hvp(v)
        new = _dot(v, hv)
        norm = math.sqrt(_dot(hv, hv))
        if norm == 0:
            return 0.0
        v = [x / norm for x in hv]
        if eigenvalue is not None and abs(new - eigenvalue) <= tolerance * (abs(eigenvalue) + 1e-6):
            return new
        eigenvalue = new
    return eigenvalue


def hutchinson_trace(hvp: Hvp, like: list[Tensor], samples: int, generator: torch.Generator) -> float:
    """tr H ≈ mean over Rademacher v of vᵀHv (Hutchinson 1989; PyHessian's ``trace``)."""
    total = 0.0
    for _ in range(samples):
        v = [(torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t) for t in like]
        total += _dot(v, hvp(v))
    return total / samples


def block_hvp(gradients: list[Tensor], params: list[Tensor]) -> Hvp:
    """v ↦ H_bb v for the block ``params``, whose loss ``gradients`` were taken with create_graph:
    ∂(g_b · v)/∂θ_b, the Hessian restricted to the block (the graph is kept for the next product)."""
    return lambda v: list(torch.autograd.grad(gradients, params, grad_outputs=v, retain_graph=True))


def spread(values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / len(values)
    return {"mean": mean, "var": var, "std": math.sqrt(var), "values": values}


# -- bit allocation --------------------------------------------------------------------------------
def allocate(omega: dict[str, float], sizes: dict[str, int], error: Callable[[str, int], float],
             choices: list[int], avg_bits: float) -> dict[str, int]:
    """Bits per block: all at ``choices[0]``, then, while one fits the budget (Σ bits·size ≤
    avg_bits·Σ size), the raise to the next choice with the largest Ω·(error before − error after)
    per added bit of the model; ties go to the more sensitive block, then the first."""
    bits = {b: choices[0] for b in omega}
    budget = avg_bits * sum(sizes.values())
    used = sum(bits[b] * sizes[b] for b in bits)
    order = sorted(omega, key=lambda b: -omega[b])  # stable: among equal Ω, the first block
    while True:
        best, best_gain = None, -math.inf
        for b in order:
            level = choices.index(bits[b])
            if level + 1 == len(choices):
                continue
            nxt = choices[level + 1]
            extra = (nxt - bits[b]) * sizes[b]
            if used + extra > budget + 1e-9:
                continue
            gain = omega[b] * (error(b, bits[b]) - error(b, nxt)) / extra
            if gain > best_gain:
                best, best_gain = b, gain
        if best is None:
            return bits
        nxt = choices[choices.index(bits[best]) + 1]
        used += (nxt - bits[best]) * sizes[best]
        bits[best] = nxt


def group_count(rows: int, groups: int) -> int:
    """The groups a matrix of ``rows`` output rows gets: ``groups`` when it divides them, else their gcd."""
    return math.gcd(rows, groups)


def quantization_error(weight: Tensor, grid: Grid) -> float:
    """‖Q(W) − W‖² on ``grid`` (min-max range per group)."""
    lo, hi = observe_range(weight, "minmax", grid)
    w = weight.detach().float()
    return float((fake_quantize(w, *scale_zero_point(lo, hi, grid), grid) - w).square().sum())


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of the Transformer layers: what Q-BERT quantizes (embeddings, pooler, classifier aside)."""
    encoder = getattr(getattr(getattr(model, "bert", None), "encoder", None), "layer", None)
    if not encoder:
        raise EffmlError(f"compressor qbert needs a BERT-family transformer (model.bert.encoder.layer.N, "
                         f"e.g. model=minilm_l6); got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if n.startswith(ENCODER) and isinstance(m, nn.Linear)}


@COMPRESSORS.register("qbert", QBERTConfig)
class QBERT(QuantizationAwareTraining):
    """Q-BERT (Shen et al. 2020): Hessian-allocated mixed precision, group-wise ranges, QAT."""

    # a few small batches and iterations on the smoke setup's 2-layer random BERT (32 rows: 32 groups)
    smoke = Smoke(("bert",), ("hessian_batches=2", "hessian_batch_size=8", "power_iterations=3",
                              "hutchinson_samples=2"))
    owns = frozenset({"quantization", "training quantization"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        if report["avg_bits"] is None or report["avg_bits"] > report["budget_bits"] + 1e-9:
            return f"the allocation {report['avg_bits']} bits is missing or over the budget {report['budget_bits']}"
        return super().effect(name, metrics)

    def __init__(self, cfg: QBERTConfig):
        super().__init__(cfg)
        self.ctx: RunContext | None = None
        self.blocks: dict[str, list[str]] = {}  # block name → the Linears in it
        self.analysis: dict[str, Any] | None = None  # sensitivity per block (SENSITIVITY_FILE)
        self.bits: dict[str, int] = {}  # per block, once allocated
        self.plot_path: str | None = None

    # -- attach / prepare ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        self.model = model
        self.targets = encoder_linears(model)
        self.blocks = self.block_map(list(self.targets))
        self.layers = wrap(model, self.targets, self.quantized)  # before any checkpoint loads: keys match
        return model

    def block_map(self, paths: list[str]) -> dict[str, list[str]]:
        if self.cfg.granularity == "linear":
            return {p: [p] for p in paths}
        blocks: dict[str, list[str]] = {}
        for p in paths:
            blocks.setdefault(ENCODER + p[len(ENCODER):].split(".", 1)[0], []).append(p)
        return blocks

    def grid(self, path: str, bits: int) -> Grid:
        rows = self.targets[path].weight.shape[0]
        return Grid(bits, symmetric=self.cfg.symmetric, groups=group_count(rows, self.cfg.groups))

    def quantized(self, path: str, layer: nn.Module):
        # the grid's bits are set when the allocation is known (begin_stage); until then the widest choice
        module = super().quantized(path, layer)
        module.weight_quantizer = WeightQuantizer(self.grid(path, self.cfg.bit_choices[-1]), "minmax")
        return module

    def prepare(self, ctx: RunContext, datamodule) -> None:
        super().prepare(ctx, datamodule)
        self.ctx = ctx

    # -- the Hessian phase -----------------------------------------------------------------------------
    def begin_stage(self, stage: Stage, task) -> None:
        if stage.role == "prepare" or self.bits:
            return
        stored = self.ctx.run_dir.artifact(SENSITIVITY_FILE) if self.ctx else None
        if stored is not None and stored.exists():  # a rerun of a killed run: computed once already
            self.analysis = json.loads(stored.read_text())
        else:
            start = time.perf_counter()
            self.analysis = self.measure_sensitivity(task.model)
            log.info("qbert: Hessian sensitivity of %d blocks measured in %.1f s", len(self.analysis),
                     time.perf_counter() - start)
            if stored is not None and distributed.is_main():  # ranks > 0 measure the same and write nothing
                tmp = stored.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.analysis, indent=1))
                os.replace(tmp, stored)
        self.set_bits(self.choose_bits())
        log.info("qbert: bits %s (average %.3f, budget %g)", self.bits, self.realised_bits(), self.cfg.avg_bits)

    def hessian_batches(self) -> list[dict[str, Tensor]]:
        """``hessian_batches`` batches of training examples drawn once with the run's seed."""
        c, data = self.cfg, self.datamodule
        train = data.splits["train"]
        generator = torch.Generator().manual_seed(self.ctx.seed if self.ctx else 0)
        order = torch.randperm(len(train), generator=generator).tolist()
        batches = []
        for i in range(c.hessian_batches):
            chosen = order[i * c.hessian_batch_size:(i + 1) * c.hessian_batch_size]
            if not chosen:
                break
            batches.append(data.collate([train[j] for j in chosen]))
        return batches

    def measure_sensitivity(self, model: nn.Module) -> dict[str, Any]:
        """λ_max and the trace per block on every batch, with the model in full precision and eval mode."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        c = self.cfg
        device = self.ctx.device if self.ctx else torch.device("cpu")
        home = next(model.parameters()).device
        was_training = model.training
        saved = {p: (q.weight_quantizer, q.input_quantizer) for p, q in self.layers.items()}
        for q in self.layers.values():  # the fp32 model's curvature: no fake quantization
            q.weight_quantizer = q.input_quantizer = None
        model.to(device).eval()
        generator = torch.Generator().manual_seed(self.ctx.seed if self.ctx else 0)
        params = {b: [self.layers[p].layer.weight for p in paths] for b, paths in self.blocks.items()}
        flat = [w for ws in params.values() for w in ws]
        eig: dict[str, list[float]] = {b: [] for b in self.blocks}
        trace: dict[str, list[float]] = {b: [] for b in self.blocks}
        try:
            with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
                for batch in self.hessian_batches():
                    batch = {k: v.to(device) for k, v in batch.items()}
                    labels = batch.pop("labels")
                    loss = F.cross_entropy(model(**batch), labels)
                    grads = torch.autograd.grad(loss, flat, create_graph=True)
                    start = 0
                    for b, ws in params.items():
                        hvp = block_hvp(list(grads[start:start + len(ws)]), ws)
                        start += len(ws)
                        eig[b].append(top_eigenvalue(hvp, ws, c.power_iterations, c.power_tolerance, generator))
                        trace[b].append(hutchinson_trace(hvp, ws, c.hutchinson_samples, generator))
                    del grads, loss
        finally:
            for p, (wq, iq) in saved.items():
                self.layers[p].weight_quantizer, self.layers[p].input_quantizer = wq, iq
            model.to(home).train(was_training)
        sizes = {b: sum(self.targets[p].weight.numel() for p in paths) for b, paths in self.blocks.items()}
        return {b: {"eigenvalue": spread(eig[b]), "trace": spread(trace[b]), "weights": sizes[b]}
                for b in self.blocks}

    def omega(self) -> dict[str, float]:
        """The paper's Ω = |mean| + std of λ_max (or of the trace per weight) per block."""
        out = {}
        for b, a in self.analysis.items():
            s = a[self.cfg.sensitivity]
            scale = 1.0 if self.cfg.sensitivity == "eigenvalue" else 1.0 / a["weights"]
            out[b] = scale * (abs(s["mean"]) + s["std"])
        return out

    def choose_bits(self) -> dict[str, int]:
        errors: dict[tuple[str, int], float] = {}

        def error(block: str, bits: int) -> float:
            if (block, bits) not in errors:
                errors[block, bits] = sum(quantization_error(self.targets[p].weight, self.grid(p, bits))
                                          for p in self.blocks[block])
            return errors[block, bits]

        sizes = {b: a["weights"] for b, a in self.analysis.items()}
        return allocate(self.omega(), sizes, error, self.cfg.bit_choices, self.cfg.avg_bits)

    def set_bits(self, bits: dict[str, int]) -> None:
        self.bits = dict(bits)
        for block, paths in self.blocks.items():
            for p in paths:
                quantizer = self.layers[p].weight_quantizer
                if quantizer is not None:  # (None once snapped)
                    quantizer.grid = self.grid(p, bits[block])

    def bits_for(self, path: str) -> int:
        block = next((b for b, paths in self.blocks.items() if path in paths), None)
        return self.bits.get(block, self.cfg.bit_choices[-1])

    # -- resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"analysis": self.analysis, "bits": dict(self.bits)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.analysis = state_dict["analysis"]
        if state_dict["bits"]:
            self.set_bits(state_dict["bits"])

    # -- finalize and report ---------------------------------------------------------------------------
    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        model = super().finalize(model, hardware)
        if self.ctx is not None and self.analysis:
            self.plot(self.ctx.run_dir.artifact(PLOT_FILE))
        return model

    def plot(self, path) -> None:
        """Each block's λ_max over the batches (boxes, as the paper's Figure 2) and trace, beside its bits."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = list(self.analysis)
        short = [n.removeprefix(ENCODER) for n in names]
        x = list(range(1, len(names) + 1))
        figure = Figure(figsize=(max(8.0, 0.5 * len(names) + 4), 4), layout="constrained")
        FigureCanvasAgg(figure)
        eig, tr, bits = figure.subplots(1, 3)
        eig.boxplot([self.analysis[n]["eigenvalue"]["values"] for n in names], positions=x)
        eig.set_title("top Hessian eigenvalue λ (batches)", fontsize=8)
        means = [self.analysis[n]["trace"]["mean"] for n in names]
        stds = [self.analysis[n]["trace"]["std"] for n in names]
        tr.errorbar(x, means, yerr=stds, fmt="o", capsize=3)
        tr.set_title("trace (Hutchinson), mean ± std", fontsize=8)
        bits.bar(x, [self.bits[n] for n in names], color="C2")
        bits.axhline(self.cfg.avg_bits, color="black", linestyle="--", linewidth=1, label=f"budget {self.cfg.avg_bits:g}")
        bits.set_title(f"bits chosen (Ω of the {self.cfg.sensitivity})", fontsize=8)
        bits.legend(fontsize=7)
        for axes in (eig, tr, bits):
            axes.set_xticks(x, short, rotation=90 if len(names) > 8 else 0, fontsize=7)
            axes.set_xlabel("encoder layer" if self.cfg.granularity == "layer" else "Linear")
            axes.grid(alpha=0.3)
        figure.suptitle("Q-BERT sensitivity and mixed precision (Shen et al., AAAI 2020)", fontsize=10)
        figure.savefig(path, dpi=120)
        self.plot_path = str(path)

    def realised_bits(self) -> float | None:
        if not self.bits:
            return None
        sizes = {b: a["weights"] for b, a in self.analysis.items()}
        return sum(self.bits[b] * sizes[b] for b in sizes) / sum(sizes.values())

    def report(self) -> dict[str, Any]:
        c = self.cfg
        omega = self.omega() if self.analysis else {}
        return {
            **super().report(),
            "bits": None,  # per block below
            "weights": f"group-wise ({c.groups} groups of output rows per matrix) symmetric minmax",
            "bit_choices": c.bit_choices,
            "budget_bits": c.avg_bits,
            "avg_bits": self.realised_bits(),  # realised: Σ bits·weights / Σ weights over the quantized Linears
            "granularity": c.granularity,
            "sensitivity": c.sensitivity,
            "allocation": dict(self.bits),
            "groups_per_layer": {p: self.grid(p, 2).groups for p in self.targets},
            "blocks": {b: {"eigenvalue_mean": a["eigenvalue"]["mean"], "eigenvalue_var": a["eigenvalue"]["var"],
                           "trace_mean": a["trace"]["mean"], "trace_var": a["trace"]["var"],
                           "omega": omega.get(b), "bits": self.bits.get(b), "weights": a["weights"]}
                       for b, a in (self.analysis or {}).items()},
            "hessian_batches": c.hessian_batches,
            "hessian_batch_size": c.hessian_batch_size,
            "plot": self.plot_path,
        }
