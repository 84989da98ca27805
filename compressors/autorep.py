"""AutoReP: automatic ReLU replacement for private inference.

Peng, Huang, Zhou et al., "AutoReP: Automatic ReLU Replacement for Fast Private Network Inference",
ICCV 2023 (arXiv 2308.10134); official code github.com/harveyp123/AutoReP. In two-party private
inference every ReLU is a garbled-circuit evaluation while a polynomial costs a few secret-shared
multiplications, so the goal is accuracy at a ReLU budget.

- **Indicator** (§3.2): each unit (an element of the activation map, a whole channel, or a whole layer:
  ``granularity``) keeps ReLU (m = 1) or uses a polynomial (m = 0). m is binary in the forward pass;
  a real auxiliary parameter ``aux`` gets dL/dm × softplus(aux), the straight-through estimator of
  Fig. 4a (``ReLUOrPoly.gate`` and ``adam_step``).
- **Hysteresis loop** (Fig. 4b): a ReLU unit turns polynomial only when aux < ``hysteresis_low`` and
  a polynomial unit turns back only when aux > ``hysteresis_high``, so units near 0 do not flip every
  step (the code's ``ReLU_masked_*_relay``, ±0.003 in its experiments).
- **Budget** (Eq. 5-6): the loss adds ``penalty`` × max(0, ReLU density − budget / total); the aux
  parameters are trained by their own Adam (the official code trains them with Adam beside the
  weights). The schedule is the paper's two phases: mask training with the penalty (``mask`` stage),
  then fine-tuning with the indicator frozen (``finetune``). The mask stage ends at the budget: if the
  count is still above it, the ReLU units of lowest aux turn polynomial (reported as ``forced_off``).
- **DaPa** (§3.3, Eq. 11-13): each replaced unit computes c2·x² + c1·x + c0 with per-channel
  coefficients, initialised at the start of the mask stage to the least-squares fit of ReLU under the
  channel's input distribution, N(mean, var) measured on training data (deterministic quantile
  samples stand in for the paper's Monte Carlo draws); then trained with the weights.

``replacement=identity`` replaces with x instead (linearization, the SNL/DeepReDuce setting), and
``granularity=layer`` with identity is the whole-layer linearization baseline of the table.

The ReLU count is per example (what a private inference evaluates): an element unit counts 1, a
channel unit H·W, a layer unit the layer's whole activation. Private-inference cost: no two-party
library runs here (CrypTen 0.4.1, its last release, does not install against the locked torch 2.13: it
requires the deprecated ``sklearn`` PyPI package, whose build fails by design, and targets torch 1.x),
so the report gives a *cost model*, labelled as one (``pi_cost_model``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.choice import check_choices, choice
from effml.compressors._activations import find_activations, replace
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.registry import COMPRESSORS
from effml.teachers import TrainedWeightsConfig, load_weights, trained_state

log = logging.getLogger(__name__)

Granularity = choice("Granularity", "element channel layer")
Replacement = choice("Replacement", "poly identity")

# Private-inference cost model (labelled a model in every report; docs in pi_cost_model).
# A ReLU on 2-party additive shares is a garbled circuit: add the shares, take the sign bit, select.
# About 3ℓ AND gates for ℓ-bit values (Gazelle, Juvekar et al., USENIX Security 2018, §5.1), each 2κ
# bits with half-gates garbling (Zahur, Rosulek & Evans, EUROCRYPT 2015: two κ=128-bit ciphertexts per
# AND gate). At ℓ = 32: 96 AND gates × 32 B = 3072 B per ReLU, before oblivious transfer of the input
# labels (ℓ × κ bits more, 512 B): 3584 B.
RELU_BYTES = 3 * 32 * 32 + 32 * 16
# A square x² of a shared value with a Beaver pair (A, A²): each party opens one masked ring element
# E = X − A (Beaver 1991; the seed notes' "Square"): 2 × ℓ bits = 8 B at ℓ = 32. Multiplying by the
# plaintext coefficients and adding c0 is local (free).
SQUARE_BYTES = 2 * 32 // 8


@dataclass
class AutoRePConfig(CompressorConfig):
    """AutoReP (Peng et al., ICCV 2023): per-element ReLU-or-polynomial indicators with STE + hysteresis
    (±0.003), a penalty of 10 above the ReLU budget, DaPa degree-2 polynomials; mask training, then
    fine-tuning with the indicators frozen."""

    name: str = "autorep"
    relu_budget: float = 0.1  # < 1: a fraction of the model's ReLUs; >= 1: a count (per example)
    granularity: Granularity = Granularity.element
    replacement: Replacement = Replacement.poly
    hysteresis_low: float = -0.003  # a ReLU unit turns polynomial when aux falls below this
    hysteresis_high: float = 0.003  # a polynomial unit turns back to ReLU when aux rises above this
    penalty: float = 10.0  # μ: weight of max(0, density − budget density) (official --lamda 1e1)
    aux_lr: float = 0.01  # Adam step size of the indicator parameters
    calibration_examples: int = 256  # training examples whose activations set the DaPa distributions
    weights: TrainedWeightsConfig = field(default_factory=TrainedWeightsConfig)  # the trained dense model
    dense_epochs: int | None = None  # without weights: the dense stage (None: trainer.max_epochs)
    mask_epochs: int | None = None  # None: trainer.max_epochs
    finetune_epochs: int | None = None
    mask_lr_scale: float = 1.0
    finetune_lr_scale: float = 1.0

    def __post_init__(self):
        check_choices(self, "compressor")
        if not self.relu_budget > 0:
            raise EffmlError(f"compressor.relu_budget must be > 0 (a fraction < 1 or a count >= 1); got {self.relu_budget}")
        if self.relu_budget >= 1 and self.relu_budget != int(self.relu_budget):
            raise EffmlError(f"compressor.relu_budget >= 1 is a ReLU count and must be whole; got {self.relu_budget}")
        if self.hysteresis_low > self.hysteresis_high:
            raise EffmlError("compressor.hysteresis_low must be <= hysteresis_high (turn off below low, back on "
                             f"above high); got low={self.hysteresis_low}, high={self.hysteresis_high}")
        for name in ("penalty", "aux_lr", "mask_lr_scale", "finetune_lr_scale"):
            if not getattr(self, name) > 0:
                raise EffmlError(f"compressor.{name} must be > 0; got {getattr(self, name)}")
        if self.calibration_examples < 2:
            raise EffmlError(f"compressor.calibration_examples must be >= 2; got {self.calibration_examples}")
        for name in ("dense_epochs", "mask_epochs", "finetune_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {value}")


class ReLUOrPoly(nn.Module):
    """ReLU where the indicator is 1, c2·x² + c1·x + c0 (per channel) where it is 0.

    Buffers (so they travel in every checkpoint and are not the task optimizer's): ``aux`` (the
    indicator's real parameter), ``mask`` (the binary indicator), ``aux_m``/``aux_v`` (its Adam moments).
    ``coef`` (3, channels) is a parameter, trained with the weights. Shapes are known after one forward
    (``materialize``); before that the module is a plain ReLU that records its input shape.
    """

    def __init__(self, granularity: str, replacement: str):
        super().__init__()
        self.granularity, self.replacement = granularity, replacement
        self.shape: tuple[int, ...] | None = None
        self.search = False  # mask stage, training: the indicator is trained
        self.aux_leaf: Tensor | None = None  # this step's indicator tensor, whose gradient trains aux

    def materialize(self) -> None:
        assert self.shape is not None
        channels = self.shape[0]
        unit = {"element": self.shape, "channel": (channels,), "layer": (1,)}[self.granularity]
        self.register_buffer("aux", torch.rand(unit))  # the official init: U(0, 1)
        self.register_buffer("mask", torch.ones(unit))
        self.register_buffer("aux_m", torch.zeros(unit))
        self.register_buffer("aux_v", torch.zeros(unit))
        coef = torch.zeros(3, channels)
        coef[1] = 1.0  # identity until DaPa sets it
        self.coef = nn.Parameter(coef, requires_grad=self.replacement == "poly")

    @property
    def relus_per_unit(self) -> int:
        return math.prod(self.shape) // self.mask.numel()

    @property
    def relus(self) -> int:
        return math.prod(self.shape)

    def relu_count(self) -> int:
        return int(self.mask.sum()) * self.relus_per_unit

    def _broadcast(self, t: Tensor, ndim: int) -> Tensor:
        """A unit-shaped tensor against a (batch, *shape) activation."""
        if self.granularity == "element":
            return t
        if self.granularity == "channel":
            return t.view(-1, *([1] * (ndim - 2)))
        return t.view(*([1] * (ndim - 1)))

    def forward(self, x: Tensor) -> Tensor:
        if self.shape is None or not hasattr(self, "mask"):
            self.shape = tuple(x.shape[1:])
            return F.relu(x)
        if self.search and self.training and self.aux_leaf is not None:
            m = self.aux_leaf  # binary forward; its gradient reaches aux in adam_step (the STE)
        else:
            m = self.mask
            if bool(m.all()):
                return F.relu(x)
        coef = self.coef.view(3, -1, *([1] * (x.dim() - 2)))
        poly = coef[0] + x * (coef[1] + x * coef[2])
        m = self._broadcast(m, x.dim())
        return m * F.relu(x) + (1 - m) * poly

    def gate(self) -> Tensor:
        """A fresh leaf standing for the indicator in this step: its gradient is dL/dm (the loss
        through the activations and the penalty); aux's gradient is that times softplus(aux)."""
        self.aux_leaf = self.mask.detach().clone().requires_grad_(True)
        return self.aux_leaf

    @torch.no_grad()
    def adam_step(self, lr: float, step: int, betas=(0.9, 0.999), eps=1e-8) -> None:
        """One Adam step of aux from this step's indicator gradient, then the hysteresis update."""
        if self.aux_leaf is None or self.aux_leaf.grad is None:
            return
        grad = self.aux_leaf.grad * F.softplus(self.aux)
        self.aux_m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        self.aux_v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = self.aux_m / (1 - betas[0] ** step)
        v_hat = self.aux_v / (1 - betas[1] ** step)
        self.aux.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        self.aux_leaf = None

    @torch.no_grad()
    def hysteresis(self, low: float, high: float) -> None:
        on = self.mask.bool()
        self.mask.copy_(torch.where(on, self.aux >= low, self.aux > high).float())

    @torch.no_grad()
    def dapa(self, mean: Tensor, std: Tensor, samples: int = 512) -> None:
        """Least-squares degree-2 fit of ReLU under N(mean, std²) per channel (AutoReP Eq. 11-13)."""
        q = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples
        z = mean[:, None].double() + std.clamp_min(1e-3)[:, None].double() * torch.special.ndtri(q)[None]
        vander = torch.stack([torch.ones_like(z), z, z * z], dim=-1)  # (channels, samples, 3)
        target = z.clamp_min(0)[..., None]
        solution = torch.linalg.lstsq(vander, target).solution[..., 0]  # (channels, 3)
        self.coef.copy_(solution.T.to(self.coef.dtype))

    def finalize(self) -> None:
        """The deployed form: the fixed indicator and coefficients; the search state goes."""
        for name in ("aux", "aux_m", "aux_v"):
            delattr(self, name)
        self.coef.requires_grad_(False)
        self.search = False


RELU_NAMES = frozenset({"ReLU"})


@COMPRESSORS.register("autorep", AutoRePConfig)
class AutoReP(Compressor):
    """AutoReP (Peng et al., ICCV 2023): learned ReLU-or-polynomial indicators to a ReLU budget."""

    smoke = Smoke(("resnet", "mlp"), ("mask_epochs=1", "finetune_epochs=1", "dense_epochs=1", "relu_budget=0.5"))
    owns = frozenset({"modules"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        if report["relu_count"] > report["relu_budget"]:
            return f"{report['relu_count']} ReLUs left, above the budget {report['relu_budget']}"
        return None

    def __init__(self, cfg: AutoRePConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.sites: dict[str, ReLUOrPoly] = {}
        self.datamodule = None
        self.budget = 0  # ReLUs per example
        self.total = 0
        self.steps = 0  # Adam steps of the indicators
        self.forced_off = 0
        self.dense_test_acc: float | None = None
        self.mask_test_acc: float | None = None
        self.final_test_acc: float | None = None
        self._searching = False

    # -- contract -----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        cfg = self.cfg
        mask = Stage("mask", cfg.mask_epochs, self.name, cfg.mask_lr_scale)
        finetune = Stage("finetune", cfg.finetune_epochs, self.name, cfg.finetune_lr_scale)
        if cfg.weights.source != "none":
            return [mask, finetune]
        return [Stage("dense", cfg.dense_epochs, self.name), mask, finetune]

    def attach(self, model: nn.Module) -> nn.Module:
        self.model = model
        for path in find_activations(model, RELU_NAMES, self.name, "ReLU"):
            site = ReLUOrPoly(self.cfg.granularity, self.cfg.replacement)
            replace(model, path, site)
            self.sites[path] = site
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.datamodule = datamodule
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():  # one forward tells every site its activation's shape
            self.model(**datamodule.example_inputs(1))
        self.model.train(was_training)
        unused = [path for path, site in self.sites.items() if site.shape is None]
        if unused:
            raise EffmlError(f"compressor autorep: ReLU modules {unused} are never called in the forward pass")
        for site in self.sites.values():
            site.materialize()
        self.total = sum(site.relus for site in self.sites.values())
        budget = self.cfg.relu_budget
        self.budget = round(budget * self.total) if budget < 1 else int(budget)
        if self.budget > self.total:
            raise EffmlError(f"compressor.relu_budget={int(budget)} is above the model's {self.total} ReLUs "
                             "(per example); give a count up to that or a fraction < 1")
        if self.cfg.weights.source != "none":
            self.load_dense_weights(ctx, datamodule)

    def begin_stage(self, stage: Stage, task) -> None:
        self._searching = stage.of(self.name, "mask")
        for site in self.sites.values():
            site.search = self._searching
        if self._searching and self.cfg.replacement == "poly":
            # DaPa from the weights the mask stage starts from; a resumed stage then loads the
            # checkpoint's coefficients over these.
            self.dapa_init()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._searching:
            for site in self.sites.values():
                site.gate()

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not (self._searching and task.training):
            return None
        kept = sum((site.aux_leaf * site.relus_per_unit).sum() for site in self.sites.values())
        return self.cfg.penalty * F.relu(kept / self.total - self.budget / self.total)

    def on_after_backward(self, trainer, pl_module) -> None:
        if not self._searching:
            return
        self.steps += 1
        for site in self.sites.values():
            site.adam_step(self.cfg.aux_lr, self.steps)
            site.hysteresis(self.cfg.hysteresis_low, self.cfg.hysteresis_high)
        if trainer.global_step % 20 == 0:
            pl_module.log("autorep/relus", float(self.relu_count()))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._searching:
            self.enforce_budget()
            for site in self.sites.values():
                site.search, site.aux_leaf = False, None

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        if stage.owner != self.name:
            return None
        if stage.key == "dense":
            self.dense_test_acc = record["test_acc"]
        if stage.key == "mask":
            self.mask_test_acc = record["test_acc"]
        if stage.key == "finetune":
            self.final_test_acc = record["test_acc"]
        return {"relu_count": self.relu_count()}

    def state_dict(self) -> dict:
        # The indicators, aux parameters, their Adam moments and the coefficients are model buffers and
        # parameters, saved with the weights.
        return {"steps": self.steps, "forced_off": self.forced_off, "dense_test_acc": self.dense_test_acc,
                "mask_test_acc": self.mask_test_acc, "final_test_acc": self.final_test_acc}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = state_dict["steps"]
        self.forced_off = state_dict["forced_off"]
        self.dense_test_acc = state_dict.get("dense_test_acc")
        self.mask_test_acc = state_dict.get("mask_test_acc")
        self.final_test_acc = state_dict.get("final_test_acc")

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        for site in self.sites.values():
            site.finalize()
        return model

    def report(self) -> dict:
        layers = {path: {"relus": site.relu_count(), "of": site.relus} for path, site in self.sites.items()}
        count = self.relu_count()
        return {
            "relu_budget": self.budget,
            "relu_count": count,
            "relus_total": self.total,
            "relu_fraction": count / self.total,
            "granularity": self.cfg.granularity,
            "replacement": self.cfg.replacement,
            "forced_off": self.forced_off,
            "indicator_steps": self.steps,
            "dense_test_acc": self.dense_test_acc,
            "mask_test_acc": self.mask_test_acc,
            "layers": layers,
            # accuracy against ReLUs, for the table's plot: the dense model (every ReLU), then this run
            "points": [{"relu_budget": self.total, "relus": self.total, "test_acc": self.dense_test_acc},
                       {"relu_budget": self.budget, "relus": count, "test_acc": self.final_test_acc}],
            "pi_cost_model": pi_cost_model(count, self.total, self.cfg.replacement),
        }

    # -- mechanics ----------------------------------------------------------------------------
    def relu_count(self) -> int:
        return sum(site.relu_count() for site in self.sites.values())

    @torch.no_grad()
    def enforce_budget(self) -> None:
        """The mask stage ends at the budget: if above it, the ReLU units are kept in order of aux, highest
        first, each only if it still fits (a whole layer that does not fit is skipped for a smaller one);
        the others turn polynomial."""
        if self.relu_count() <= self.budget:
            return
        units = [(-a, path, i) for path, site in self.sites.items()
                 for i, (a, on) in enumerate(zip(site.aux.flatten().tolist(), site.mask.flatten().tolist(), strict=True))
                 if on]
        left = self.budget
        for _, path, index in sorted(units):
            site = self.sites[path]
            if site.relus_per_unit <= left:
                left -= site.relus_per_unit
            else:
                site.mask.view(-1)[index] = 0.0
                self.forced_off += 1
        log.info("autorep: %d units turned polynomial at the end of the mask stage to meet the budget", self.forced_off)

    @torch.no_grad()
    def dapa_init(self) -> None:
        """Per-channel mean and std of every site's input on the first training examples, then DaPa."""
        data = self.datamodule.splits["train"]
        n = min(self.cfg.calibration_examples, len(data))
        batch = self.datamodule.collate([data[i] for i in range(n)])
        batch.pop("labels")
        device = next(self.model.parameters()).device
        stats: dict[str, tuple[Tensor, Tensor]] = {}

        def hook(path):
            def record(module, args):
                x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)  # (channels, everything else)
                stats[path] = (x.mean(1).cpu(), x.std(1).cpu())
            return record

        handles = [site.register_forward_pre_hook(hook(path)) for path, site in self.sites.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(**{k: v.to(device) for k, v in batch.items()})
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        for path, site in self.sites.items():
            site.dapa(*stats[path])

    def load_dense_weights(self, ctx: RunContext, datamodule) -> None:
        """The trained dense model's weights; this run's own buffers (indicators, coefficients) stay."""
        state, where, run_dir = trained_state(self.cfg.weights, ctx.output_root, ctx.seed, datamodule.info,
                                              "dense model", ctx.data)
        own = {k: v for k, v in self.model.state_dict().items()
               if any(k.startswith(f"{path}.") for path in self.sites)}
        load_weights(self.model, {**state, **own}, where, "dense model")
        if run_dir and run_dir.finished:
            self.dense_test_acc = json.loads(run_dir.metrics.read_text()).get("test_acc")


def pi_cost_model(relus: int, total: int, replacement: str) -> dict:
    """Online communication of the activations of one private inference, *estimated* from per-op
    costs (see RELU_BYTES, SQUARE_BYTES): ReLUs × a garbled-circuit ReLU + replaced units × one
    Beaver-pair square (identity replacements are free). Linear layers are not counted."""
    squares = (total - relus) if replacement == "poly" else 0
    relu_bytes, square_bytes = relus * RELU_BYTES, squares * SQUARE_BYTES
    dense = total * RELU_BYTES
    return {
        "kind": "cost model (not measured): ReLU = garbled circuit, 3ℓ AND gates (Gazelle) × 2κ bits "
                "(half-gates) + OT of ℓ input labels; x² = one Beaver-pair opening; ℓ=32, κ=128",
        "bytes_per_relu": RELU_BYTES,
        "bytes_per_square": SQUARE_BYTES,
        "relus": relus,
        "squares": squares,
        "activation_bytes": relu_bytes + square_bytes,
        "all_relu_bytes": dense,
        "reduction": dense / max(relu_bytes + square_bytes, 1),
    }
