"""N:M fine-grained structured sparsity: in every group of M consecutive weights, keep the N largest.

Mishra et al., "Accelerating Sparse Deep Neural Networks" (arXiv 2104.08378, NVIDIA's ASP), §3:
sparse tensor cores (sm_80+) run 2:4 along the reduction (input) dimension of a matmul. Their recipe,
the default here (``schedule=oneshot``): train dense, prune every eligible layer once by magnitude
to 2:4, then retrain with the masks fixed, repeating the dense schedule (same optimizer and learning
rate; ``sparse_epochs``/``sparse_lr_scale`` shorten or scale it). ``weights`` names a finished dense
run to start from (``source=recipe``: the same seed's run of that recipe, as ``effml.teachers``
finds teachers); without one the run trains dense itself for ``dense_epochs`` first.

``schedule=gradual`` is a simple from-scratch variant in the spirit of Zhou et al., "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch" (ICLR 2021): one stage whose pattern
tightens in equal steps, (M−1):M, (M−2):M, … N:M, between ``start_fraction`` and ``end_fraction`` of
its optimizer steps, each mask recomputed from the current weights. It is not SR-STE: masked weights
get no gradient here (the masks are ``torch.nn.utils.prune`` reparametrizations), so a pruned weight
stays pruned.

Groups run along the input dimension, as ASP's ``create_mask`` lays them out:

- ``Linear`` (out, in): M consecutive entries of a row, i.e. along ``in_features``;
- ``Conv1d``/``Conv2d`` (out, in, *kernel): M consecutive *input channels* at each output channel
  and kernel position — the weight flattened per output channel in (kh, kw, in_channels) order, the
  channels-last layout of the implicit GEMM (ASP permutes to (kh, kw, out, in) for the same reason).

A layer whose input width (``in_features``, or ``in_channels`` per group) is not divisible by M has
no whole groups: it stays dense and is reported with the reason (e.g. a ResNet's first conv on
one-channel images); so are layers matching ``skip`` (the classifier by default, as ASP leaves it).

``finalize`` makes the masks permanent and, for 2:4 only (the pattern the hardware runs), offers
every pruned ``Linear`` to ``effml.kernels.select.convert_linears`` (``sparse_2to4`` through
cuSPARSELt, ``sparse_2to4_cutlass`` where the hardware allows it): a layer gets
``torch.sparse.to_sparse_semi_structured`` only where that is measured faster than dense on the
run's shapes. Convolutions (PyTorch has no semi-structured conv kernels) and other N:M patterns are
accuracy-only, and the decisions say so. The report verifies the pattern from the weights: for every
layer, the number of groups holding more than N nonzeros (zero, or it says so).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from effml.choice import check_choices, choice
from effml.compressors._masks import LAYER_TYPES, effective_weight, make_permanent, matches, set_mask
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.kernels.library import kernel
from effml.kernels.names import SPARSE_2TO4
from effml.kernels.select import Decision, check_allowed, convert_linears, hardware_device, precision_dtype
from effml.paths import RunDir
from effml.registry import COMPRESSORS
from effml.teachers import TrainedWeightsConfig, load_weights, trained_state

log = logging.getLogger("effml")

BY_PATTERN = "matches compressor.skip"
WHO = "dense model"  # how errors about the weights source name it


Schedule = choice("Schedule", "oneshot gradual")  # oneshot: ASP, prune a trained model and retrain; gradual: (M-1):M … N:M


@dataclass
class NMConfig(CompressorConfig):
    """N:M structured sparsity (Mishra et al. 2021, NVIDIA ASP): 2:4 along the input dimension, one-shot
    prune of a trained dense model (set compressor.weights, or it trains dense first), retrain with the
    masks; classifier dense."""

    name: str = "nm_sparsity"
    n: int = 2  # weights kept in every group
    m: int = 4  # group size along the input dimension (2:4 is what sparse tensor cores run)
    schedule: Schedule = Schedule.oneshot
    weights: TrainedWeightsConfig = field(default_factory=TrainedWeightsConfig)  # the trained dense model
    dense_epochs: int | None = None  # oneshot without weights: the dense stage (None: trainer.max_epochs)
    sparse_epochs: int | None = None  # the stage with masks (None: trainer.max_epochs, ASP's "same schedule")
    sparse_lr_scale: float = 1.0  # its learning rate is trainer.lr times this (ASP: 1, the dense rate)
    start_fraction: float = 0.0  # gradual: (M-1):M from this fraction of the stage's optimizer steps
    end_fraction: float = 0.5  # gradual: N:M from here on
    layer_types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d"])
    skip: list[str] = field(default_factory=lambda: ["classifier"])  # module-name patterns left dense

    def __post_init__(self):
        check_choices(self, "compressor")
        if not 1 <= self.n < self.m:
            raise EffmlError(
                f"compressor.n must satisfy 1 <= n < m (keep n of every m weights); got n={self.n}, m={self.m}"
            )
        for name in ("dense_epochs", "sparse_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {getattr(self, name)}")
        if self.sparse_lr_scale <= 0:
            raise EffmlError(f"compressor.sparse_lr_scale must be > 0; got {self.sparse_lr_scale}")
        if not 0 <= self.start_fraction < self.end_fraction <= 1:
            raise EffmlError(
                "compressor.start_fraction < end_fraction must both lie in [0, 1]; "
                f"got {self.start_fraction}, {self.end_fraction}"
            )
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise EffmlError(f"compressor.layer_types: unknown {sorted(unknown)}; choose from {sorted(LAYER_TYPES)}")


# -- the pattern ----------------------------------------------------------------------------------
def groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """(groups, m): M consecutive weights along the input dimension (dim 1), at every output channel
    and kernel position; the input dimension is moved last first, so a conv groups its channels."""
    return weight.detach().movedim(1, -1).reshape(-1, m)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """1 at the N largest |w| of every group of M (module docstring), 0 elsewhere; weight's shape."""
    scores = groups(weight, m).abs()
    keep = torch.zeros_like(scores).scatter_(1, scores.topk(n, dim=1).indices, 1.0)
    channels_last = weight.movedim(1, -1).shape
    return keep.reshape(channels_last).movedim(-1, 1).to(weight.dtype)


def groups_over_n(weight: torch.Tensor, n: int, m: int) -> int:
    """How many groups hold more than N nonzeros: the pattern checked, not assumed."""
    return int(((groups(weight, m) != 0).sum(dim=1) > n).sum())


def input_width(module: nn.Module) -> int:
    """The length of the dimension groups run along: in_features, or in_channels per conv group."""
    return module.weight.shape[1]


def scheduled_n(step: int, t0: int, t_end: int, n: int, m: int) -> int:
    """The gradual schedule's N at ``step``: M (dense) before t0, then (M-1), (M-2), … in equal steps,
    N from t_end on (with a single step, N from t0)."""
    if step < t0:
        return m
    steps_after_first = m - 1 - n
    if steps_after_first == 0 or step >= t_end:
        return n
    return m - 1 - (step - t0) * steps_after_first // (t_end - t0)


def select_layers(model: nn.Module, layer_types: list[str], skip: list[str], m: int
                  ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers that get N:M masks, and every other layer of those types with why it stays dense."""
    types = tuple(LAYER_TYPES[t] for t in layer_types)
    eligible, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        width = input_width(module)
        if matches(name, skip):
            skipped[name] = BY_PATTERN
        elif width % m:
            what = "in_features" if isinstance(module, nn.Linear) else "in_channels"
            skipped[name] = f"{what} {width} not divisible by M={m}"
        else:
            eligible[name] = module
    return eligible, skipped


def weight_counts(model: nn.Module) -> dict[str, int]:
    """Weights of every Linear/Conv layer, and all parameters: what the N:M layers are a fraction of."""
    layers = tuple(LAYER_TYPES.values())
    return {"prunable": sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, layers)),
            "params": sum(p.numel() for p in model.parameters())}


# -- model.pt stays portable --------------------------------------------------------------------
def save_semi_structured_dense(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook of a converted layer: its ``SparseSemiStructuredTensor`` weight is saved as the
    dense tensor it encodes (the same values, zeros included), so ``model.pt`` loads anywhere, also
    with ``weights_only=True`` and into a dense model (a later run's teacher or source)."""
    from torch.sparse import SparseSemiStructuredTensor

    key = prefix + "weight"
    if isinstance(state_dict.get(key), SparseSemiStructuredTensor):
        state_dict[key] = state_dict[key].to_dense()


# -- the compressor -------------------------------------------------------------------------------
@COMPRESSORS.register("nm_sparsity", NMConfig)
class NMSparsity(Compressor):
    """N:M structured sparsity (2:4 default): ASP one-shot prune + retrain (Mishra et al. 2021), or gradual."""

    smoke = Smoke(("mlp", "vit", "bert"))
    owns = frozenset({"masks"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        return None if report["verified_nm"] else f"the {report['pattern']} pattern does not hold in the weights"

    def __init__(self, cfg: NMConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}
        self.skipped: dict[str, str] = {}
        self.current_n = cfg.m  # dense until the first pruning
        self.events = 0
        self.dense_test_acc: float | None = None
        self.example_inputs: dict | None = None  # what convert_linears times the layers on
        self._gradual_here = False
        self._window = (0, 0)  # gradual: (t0, t_end) in optimizer steps of the stage
        self._counts = {"prunable": 0, "params": 0}

    @property
    def pattern(self) -> str:
        return f"{self.cfg.n}:{self.cfg.m}"

    @property
    def runs_on_sparse_kernels(self) -> bool:
        return (self.cfg.n, self.cfg.m) == (2, 4)

    # -- contract -----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        if self.cfg.schedule == "gradual":
            return [Stage("train", self.cfg.sparse_epochs, self.name, self.cfg.sparse_lr_scale)]
        retrain = Stage("retrain", self.cfg.sparse_epochs, self.name, self.cfg.sparse_lr_scale)
        if self.cfg.weights.source != "none":
            return [retrain]
        return [Stage("dense", self.cfg.dense_epochs, self.name), retrain]

    def attach(self, model: nn.Module) -> nn.Module:
        self.model = model
        self._counts = weight_counts(model)
        self.layers, self.skipped = select_layers(model, self.cfg.layer_types, self.cfg.skip, self.cfg.m)
        if not self.layers:
            raise EffmlError(
                f"compressor nm_sparsity found no {self.cfg.layer_types} layer to prune {self.pattern} "
                f"(outside {self.cfg.skip}, input width divisible by {self.cfg.m})"
            )
        for module in self.layers.values():
            prune.identity(module, "weight")  # keys weight_orig/weight_mask exist before any checkpoint loads
        unexpected = {k: v for k, v in self.skipped.items() if v != BY_PATTERN}
        if unexpected:
            log.info("nm_sparsity %s leaves dense: %s", self.pattern, "; ".join(f"{k} ({v})" for k, v in unexpected.items()))
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.example_inputs = datamodule.example_inputs(ctx.measure.batch_size)
        self.check_forced_kernel(ctx.hardware)
        if self.cfg.weights.source != "none":
            self.load_dense_weights(ctx, datamodule)

    def begin_stage(self, stage: Stage, task) -> None:
        own = stage.owner == self.name
        self._gradual_here = own and self.cfg.schedule == "gradual"
        if own and self.cfg.schedule == "oneshot" and stage.key == "retrain":
            self.prune_to(self.cfg.n)  # from the trained dense weights; a resumed stage computes the same masks

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        if stage.of(self.name, "dense"):
            self.dense_test_acc = record["test_acc"]
        return {"nm_n": self.current_n} if stage.owner == self.name else None

    def on_train_start(self, trainer, pl_module) -> None:
        if self._gradual_here:
            total = trainer.estimated_stepping_batches
            self._window = (round(self.cfg.start_fraction * total), round(self.cfg.end_fraction * total))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._gradual_here:
            return
        target = scheduled_n(trainer.global_step, *self._window, self.cfg.n, self.cfg.m)
        if target < self.current_n:
            self.prune_to(target)
            pl_module.log("nm/n", float(target))

    def on_train_end(self, trainer, pl_module) -> None:
        # A run cut short (limit_train_batches, few epochs) still ends at the promised pattern.
        if self._gradual_here and self.current_n > self.cfg.n:
            self.prune_to(self.cfg.n)

    def state_dict(self) -> dict:
        # The masks themselves are buffers of the model, saved with its weights.
        return {"current_n": self.current_n, "events": self.events, "dense_test_acc": self.dense_test_acc}

    def load_state_dict(self, state_dict: dict) -> None:
        self.current_n = state_dict["current_n"]
        self.events = state_dict["events"]
        self.dense_test_acc = state_dict.get("dense_test_acc", self.dense_test_acc)

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        make_permanent(self.layers)
        decisions = self.choose_kernels(model, hardware)
        self.kernel_decisions = [d.as_dict() for d in decisions]
        for d in decisions:
            if d.kernel != "dense":
                model.get_submodule(d.layer).register_state_dict_post_hook(save_semi_structured_dense)
        return model

    def target_sparsity(self) -> float:
        return 1 - self.cfg.n / self.cfg.m

    def report(self) -> dict:
        n, m = self.cfg.n, self.cfg.m
        layers = {}
        for name, module in self.layers.items():
            w = effective_weight(module)
            layers[name] = {"shape": list(w.shape), "sparsity": round(float((w == 0).float().mean()), 6),
                            "groups": w.numel() // m, "groups_over_n": groups_over_n(w, n, m)}
        nm_weights = sum(effective_weight(mod).numel() for mod in self.layers.values())
        zeros = sum(int((effective_weight(mod) == 0).sum()) for mod in self.layers.values())
        return {
            "pattern": self.pattern,
            "schedule": self.cfg.schedule,
            "dense_weights": self.dense_weights_origin(),
            "dense_test_acc": self.dense_test_acc,
            "achieved_sparsity": zeros / nm_weights,  # counted from the weights of the N:M layers
            "verified_nm": all(info["groups_over_n"] == 0 for info in layers.values()),
            "nm_weights": nm_weights,
            "nm_fraction_of_prunable": nm_weights / max(self._counts["prunable"], 1),  # of Linear/Conv weights
            "nm_fraction_of_params": nm_weights / max(self._counts["params"], 1),
            "pruning_events": self.events,
            "hardware": self.hardware_note(),
            "layers": layers,
            "skipped": self.skipped,
        }

    def dense_weights_origin(self) -> str:
        if self.cfg.weights.source != "none":
            return self.cfg.weights.describe()
        return "the dense stage of this run" if self.cfg.schedule == "oneshot" else "none (sparse from scratch)"

    # -- mechanics ------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_to(self, n: int) -> None:
        """Masks keeping the n largest of every M from the current (masked) weights."""
        for module in self.layers.values():
            set_mask(module, nm_mask(effective_weight(module), n, self.cfg.m))
        self.current_n = n
        self.events += 1

    def linears(self) -> dict[str, nn.Module]:
        return {name: mod for name, mod in self.layers.items() if isinstance(mod, nn.Linear)}

    def choose_kernels(self, model: nn.Module, hardware) -> list[Decision]:
        """One decision per N:M layer: measured for 2:4 Linear layers, accuracy-only for the rest."""
        measured = {}
        if self.runs_on_sparse_kernels and self.linears():
            wanted = {name: list(SPARSE_2TO4) for name in self.linears()}
            measured = {d.layer: d for d in convert_linears(model, wanted, self.example_inputs, hardware)}
        return [measured.get(name) or Decision(name, "dense", self.why_dense(module), f"w{list(module.weight.shape)}")
                for name, module in self.layers.items()]

    def why_dense(self, module: nn.Module) -> str:
        if not isinstance(module, nn.Linear):
            return f"dense: no semi-structured {type(module).__name__} kernels in PyTorch; {self.pattern} is accuracy-only here"
        return f"dense: sparse tensor cores run 2:4 only; {self.pattern} is accuracy-only"

    def hardware_note(self) -> str:
        if not self.runs_on_sparse_kernels:
            return f"{self.pattern} is accuracy-only (sparse tensor cores run 2:4)"
        linears, convs = len(self.linears()), len(self.layers) - len(self.linears())
        kept = sum(d["kernel"] != "dense" for d in self.kernel_decisions)
        parts = [f"{kept} of {linears} Linear layers on 2:4 kernels (measured, kernels.layers)"] if linears else []
        parts += [f"{convs} conv layers accuracy-only (no semi-structured conv kernels)"] if convs else []
        return "; ".join(parts)

    def check_forced_kernel(self, hardware) -> None:
        """Under ``hardware.selection=force``, a 2:4 kernel that cannot run fails now, in one line,
        rather than after training (the same check ``convert_linears`` makes in ``finalize``)."""
        if hardware.selection != "force" or not self.runs_on_sparse_kernels:
            return
        device, dtype, name = hardware_device(hardware), precision_dtype(hardware.precision), SPARSE_2TO4[0]
        check_allowed(hardware, name)
        for path, module in self.linears().items():
            w = effective_weight(module)
            probe = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            probe.weight = nn.Parameter(w * nm_mask(w, self.cfg.n, self.cfg.m), requires_grad=False)
            why_not = kernel(name).unsupported(probe, device, dtype)
            if why_not:
                raise EffmlError(f"hardware.selection=force: kernel {name} cannot run for {path}: {why_not}")

    def load_dense_weights(self, ctx: RunContext, datamodule) -> None:
        """The trained dense model's weights into this run's (still unmasked) layers."""
        state, where, run_dir = trained_state(self.cfg.weights, ctx.output_root, ctx.seed,
                                              datamodule.info, WHO, ctx.data)
        self.dense_test_acc = finished_test_acc(run_dir) if run_dir else None
        for name, module in self.layers.items():  # the plain model's keys → this run's masked ones
            if f"{name}.weight" in state:
                state[f"{name}.weight_orig"] = state.pop(f"{name}.weight")
                state[f"{name}.weight_mask"] = module.weight_mask
        load_weights(self.model, state, where, WHO)


def finished_test_acc(run: RunDir) -> float | None:
    return json.loads(run.metrics.read_text()).get("test_acc") if run.finished else None
