"""Activation sparsity: activations that are exactly zero, so that the next layer can skip the rows of its
weight that they multiply (effml/kernels/sparse_ffn.py: the gather kernel that does).

One compressor, four ``kind``s, each fine-tuning the model (one ``train`` stage) with its activations changed:

- ``fatrelu``: Kurtz et al., "Inducing and Exploiting Activation Sparsity for Fast Neural Network
  Inference", ICML 2020, §3.2: the forced-activation-threshold ReLU, x if x > T else 0. T is set per
  layer so that ``target_sparsity`` of the layer's activations are zero on calibration data, at the
  start of every epoch (the paper tunes T per layer to a sparsity too; with T fixed, training learns to
  push pre-activations over it and the zeros fade).
- ``hoyer``: the same paper, §3.1: a Hoyer regulariser on every ReLU's output, here
  ``hoyer_weight`` × the mean over layers of (‖a‖₁² / ‖a‖₂²) / numel(a), the Hoyer-square scaled into
  (0, 1] so that one weight fits any layer size (the paper sums the raw terms with a tiny weight).
- ``cats``: Lee et al., "CATS: Contextually-Aware Thresholding for Sparsity in Large Language Models",
  2024 (arXiv 2404.08763), §3: a transformer FFN's activation a = act(x) is kept only where
  |a| > t, t per layer the ``target_sparsity`` quantile of |a| on calibration data (the paper's
  cutoff), then the model is fine-tuned with the thresholds fixed. Any activation (GELU, SiLU, ReLU).
- ``relufy``: Mirzadeh et al., "ReLU Strikes Back: Exploiting Activation Sparsity in Large Language
  Models", ICLR 2024, §4 stage 1: every GELU/SiLU of the model becomes a ReLU, then fine-tuning.

Calibration (``fatrelu``, ``cats``) runs at the start of the stage on the first
``calibration_examples`` training examples, over real tokens only (the attention mask), from the
weights the stage starts with; the thresholds are buffers, so they travel in every checkpoint.
The report measures each site's sparsity (the fraction of exact zeros) on validation data, over real
tokens, after training.

**The kernel that uses it** (``finalize``): the Linear that reads a site's output (a BERT FFN's
``output.dense``, or the next Linear of an ``nn.Sequential``) may become a ``GatherLinear``
(effml/kernels/sparse_ffn.py), which reads only the weight rows of each token's nonzero activations.
As every kernel in effml, it goes through ``hardware.selection``: ``measure`` times the dense layer and
the gather on the layer's real input (validation data at ``measure.batch_size``) and keeps the gather
only if it is ``selection_margin`` faster; ``force`` converts every such layer; ``off`` none. The
decisions, with both timings at that batch and at one example, go to ``kernel_decisions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from effml.choice import check_choices, choice
from effml.compressors._activations import find_activations, replace
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.kernels.select import Decision
from effml.kernels.sparse_ffn import GatherLinear, time_ms
from effml.registry import COMPRESSORS
from effml.teachers import TrainedWeightsConfig, load_weights, trained_state

Kind = choice("Kind", "fatrelu hoyer cats relufy")

RELU = frozenset({"ReLU"})
SMOOTH = frozenset({"GELU", "SiLU", "GELUActivation", "NewGELUActivation", "FastGELUActivation",
                    "QuickGELUActivation", "GELUTanh", "PytorchGELUTanh", "SiLUActivation", "Mish"})
# What each kind changes, and how the error names it
TARGETS = {"fatrelu": (RELU, "ReLU"), "hoyer": (RELU, "ReLU"), "cats": (RELU | SMOOTH, "activation (ReLU, GELU, SiLU)"),
           "relufy": (SMOOTH, "GELU or SiLU")}


@dataclass
class ActSparsityConfig(CompressorConfig):
    """Activation sparsity by CATS thresholds (Lee et al. 2024) at 50% per layer, calibrated on 64 training
    examples, then fine-tuning; or FATReLU / Hoyer (Kurtz et al., ICML 2020), ReLU-fication (Mirzadeh et
    al., ICLR 2024)."""

    name: str = "act_sparsity"
    kind: Kind = Kind.cats
    target_sparsity: float = 0.5  # fatrelu, cats: zeros per layer the calibrated threshold makes
    hoyer_weight: float = 0.1  # hoyer: weight of the scaled Hoyer-square term
    calibration_examples: int = 64
    measure_examples: int = 256  # validation examples the reported sparsity is measured on
    weights: TrainedWeightsConfig = field(default_factory=TrainedWeightsConfig)  # start from a finished run
    epochs: int | None = None  # the fine-tuning stage (None: trainer.max_epochs)
    lr_scale: float = 1.0

    def __post_init__(self):
        check_choices(self, "compressor")
        if not 0 <= self.target_sparsity < 1:
            raise EffmlError(f"compressor.target_sparsity must be in [0, 1); got {self.target_sparsity}")
        if self.hoyer_weight < 0:
            raise EffmlError(f"compressor.hoyer_weight must be >= 0; got {self.hoyer_weight}")
        for name in ("calibration_examples", "measure_examples"):
            if getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise EffmlError(f"compressor.epochs must be >= 1; got {self.epochs}")
        if not self.lr_scale > 0:
            raise EffmlError(f"compressor.lr_scale must be > 0; got {self.lr_scale}")


class SparseActivation(nn.Module):
    """The activation of one site with its kind's change; counts zeros while ``tokens`` is set."""

    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind
        self.register_buffer("threshold", torch.zeros(()))
        self.tokens: Tensor | None = None  # (batch, seq) mask of real tokens while measuring, or all
        self.measuring = False
        self.zeros, self.count = 0, 0
        self.collect: list[Tensor] | None = None  # calibration: |a| (cats) or x (fatrelu) of real tokens
        self.outputs: list[Tensor] | None = None  # hoyer: this step's outputs

    def real(self, t: Tensor) -> Tensor:
        """The entries at real tokens (text: (batch, seq, features) under the attention mask)."""
        if self.tokens is not None and t.dim() == 3 and t.shape[:2] == self.tokens.shape:
            return t[self.tokens.bool()]
        return t

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "fatrelu":
            if self.collect is not None:
                self.collect.append(self.real(x).detach().flatten().float())
            a = torch.where(x > self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
        else:
            a = self.inner(x)
            if self.kind == "cats":
                if self.collect is not None:
                    self.collect.append(self.real(a).detach().abs().flatten().float())
                a = a * (a.abs() > self.threshold).to(a.dtype)
        if self.outputs is not None:
            self.outputs.append(a)
        if self.measuring:
            real = self.real(a)
            self.zeros += int((real == 0).sum())
            self.count += real.numel()
        return a


def quantile(values: Tensor, q: float) -> float:
    """The q-quantile (kthvalue: torch.quantile refuses inputs of more than 16M entries)."""
    if q <= 0:
        return 0.0
    k = max(1, min(values.numel(), round(q * values.numel())))
    return float(values.kthvalue(k).values)


def hoyer_square(a: Tensor) -> Tensor:
    """(‖a‖₁² / ‖a‖₂²) / numel(a): 1/n for one nonzero, 1 for all equal; lower is sparser."""
    return a.abs().sum() ** 2 / (a.pow(2).sum() + 1e-12) / a.numel()


@COMPRESSORS.register("act_sparsity", ActSparsityConfig)
class ActSparsity(Compressor):
    """Activation sparsity: FATReLU, Hoyer (Kurtz et al. 2020), CATS (Lee et al. 2024), ReLU-fication (Mirzadeh et al. 2024)."""

    smoke = Smoke(("bert", "mlp"), ("calibration_examples=8", "measure_examples=16"))
    owns = frozenset({"modules", "activation thresholds"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        # calibrated at the start of the stage; training after it (with another method's loss too) drifts
        if report["kind"] in ("cats", "fatrelu") and report["mean_sparsity"] < 0.5 * report["target_sparsity"]:
            return f"measured activation sparsity {report['mean_sparsity']:.3f}, far below {report['target_sparsity']}"
        if report["kind"] == "relufy" and report["mean_sparsity"] <= 0:
            return "no zero activations after ReLU-fication"
        return None

    def __init__(self, cfg: ActSparsityConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.sites: dict[str, SparseActivation] = {}
        self.datamodule = None
        self.measured: dict[str, float] = {}
        self.replaced: dict[str, str] = {}  # site → the activation class it had
        self._here = False
        self.measure_batch = 8
        self.ffn_speedups: dict[str, float] = {}  # measured in finalize

    def stages(self) -> list[Stage]:
        return [Stage("train", self.cfg.epochs, self.name, self.cfg.lr_scale)]

    def attach(self, model: nn.Module) -> nn.Module:
        self.model = model
        names, wanted = TARGETS[self.cfg.kind]
        for path, module in find_activations(model, names, f"act_sparsity (kind={self.cfg.kind})", wanted).items():
            inner = nn.ReLU() if self.cfg.kind == "relufy" else module
            site = SparseActivation(inner, self.cfg.kind)
            self.replaced[path] = type(module).__name__
            replace(model, path, site)
            self.sites[path] = site
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.datamodule = datamodule
        self.measure_batch = ctx.measure.batch_size
        if self.cfg.weights.source != "none":
            state, where, run_dir = trained_state(self.cfg.weights, ctx.output_root, ctx.seed, datamodule.info,
                                                  "trained model", ctx.data)
            state = {self.site_key(k): v for k, v in state.items()}
            own = {k: v for k, v in self.model.state_dict().items() if k.endswith(".threshold") and self.is_site_key(k)}
            load_weights(self.model, {**state, **own}, where, "trained model")

    def site_key(self, key: str) -> str:
        """A plain model's key under this run's wrapped activations (``.inner.``): activations with
        parameters (PReLU) keep them."""
        for path in self.sites:
            if key.startswith(f"{path}."):
                return f"{path}.inner.{key[len(path) + 1:]}"
        return key

    def is_site_key(self, key: str) -> bool:
        return any(key.startswith(f"{path}.") for path in self.sites)

    def begin_stage(self, stage: Stage, task) -> None:
        self._here = stage.of(self.name, "train")
        if self._here and self.cfg.kind in ("cats", "fatrelu"):
            self.calibrate()  # a resumed stage then loads the checkpoint's thresholds (the same values)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # FATReLU's thresholds follow the weights: recalibrated at every epoch after the first (the
        # layers otherwise learn to push their pre-activations over a fixed T and the zeros fade)
        if self._here and self.cfg.kind == "fatrelu" and trainer.current_epoch > 0:
            self.calibrate()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._here and self.cfg.kind == "hoyer":
            for site in self.sites.values():
                site.outputs = []

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not (self._here and self.cfg.kind == "hoyer" and task.training):
            return None
        terms = [hoyer_square(a) for site in self.sites.values() for a in (site.outputs or [])]
        for site in self.sites.values():
            site.outputs = None
        return self.cfg.hoyer_weight * torch.stack(terms).mean() if terms else None

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        self.measure_sparsity()
        self.kernel_decisions = [d.as_dict() for d in self.choose_kernels(hardware)]
        self.ffn_speedups = ffn_speedups(self.kernel_decisions)
        return model

    def target_sparsity(self) -> float | None:
        return None  # of activations, not weights: the weight sparsity stays the model's

    def report(self) -> dict:
        values = list(self.measured.values())
        return {
            "kind": self.cfg.kind,
            "target_sparsity": self.cfg.target_sparsity if self.cfg.kind in ("cats", "fatrelu") else None,
            "thresholds": {path: float(site.threshold) for path, site in self.sites.items()},
            "replaced": self.replaced,
            "sparsity": self.measured,  # per site: fraction of exact zeros on validation data, real tokens
            "mean_sparsity": sum(values) / len(values) if values else 0.0,
            "measured_on": f"{self.cfg.measure_examples} validation examples",
            # dense FFN time / FFN time with the gather kernel, geometric mean over the FFNs, measured
            # before the choice (whether or not the kernel was kept): at one example and at measure.batch_size
            **self.ffn_speedups,
        }

    # -- mechanics ----------------------------------------------------------------------------
    def batches(self, split: str, n: int):
        """The first n examples of a split in batches of the eval size, without labels, on the model's device."""
        data = self.datamodule.splits[split]
        n = min(n, len(data))
        size = self.datamodule.cfg.eval_batch_size
        device = next(self.model.parameters()).device
        for start in range(0, n, size):
            batch = self.datamodule.collate([data[i] for i in range(start, min(n, start + size))])
            batch.pop("labels")
            yield {k: v.to(device) for k, v in batch.items()}

    def run(self, split: str, n: int) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in self.batches(split, n):
                    for site in self.sites.values():
                        site.tokens = batch.get("attention_mask")
                    self.model(**batch)
        finally:
            self.model.train(was_training)
            for site in self.sites.values():
                site.tokens = None

    def readers(self) -> dict[str, str]:
        """Each site's consumer Linear: a BERT FFN's output.dense, or the next Linear in a Sequential."""
        found = {}
        for path in self.sites:
            parent, _, child = path.rpartition(".")
            if child == "intermediate_act_fn" and parent.endswith(".intermediate"):
                found[path] = parent[: -len("intermediate")] + "output.dense"
            elif child.isdigit() and parent and isinstance(self.model.get_submodule(parent), nn.Sequential):
                following = list(self.model.get_submodule(parent).named_children())[int(child) + 1:]
                nxt = next((name for name, m in following if isinstance(m, nn.Linear)), None)
                direct = all(not isinstance(m, (nn.Linear, nn.Conv2d)) for name, m in following
                             if int(name) < int(nxt)) if nxt else False
                if nxt and direct:
                    found[path] = f"{parent}.{nxt}"
        return {site: reader for site, reader in found.items()
                if isinstance(self.model.get_submodule(reader), nn.Linear)}

    def producers(self, readers: dict[str, str]) -> dict[str, str]:
        """What runs in each FFN before its reader: a BERT FFN's ``intermediate`` (up-projection and the
        activation), or the Linear before the activation in a Sequential."""
        found = {}
        for site in readers:
            parent, _, child = site.rpartition(".")
            if not child.isdigit():
                found[site] = parent
                continue
            before = list(self.model.get_submodule(parent).named_children())[: int(child)]
            previous = next((name for name, m in reversed(before) if isinstance(m, nn.Linear)), None)
            if previous is not None:
                found[site] = f"{parent}.{previous}"
        return found

    def module_inputs(self, paths: list[str], n: int) -> dict[str, Tensor]:
        """The real input of each module at ``paths`` on the first n validation examples (one batch)."""
        inputs: dict[str, Tensor] = {}
        handles = [self.model.get_submodule(path).register_forward_pre_hook(
            lambda module, args, path=path: inputs.setdefault(path, args[0].detach())) for path in paths]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(**next(self.batches("val", n)))
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        return inputs

    def choose_kernels(self, hardware) -> list[Decision]:
        readers = self.readers()
        selection = getattr(hardware, "selection", "measure")
        if not readers or selection == "off":
            return [Decision(r, "dense", "hardware.selection=off", "") for r in readers.values()]
        margin = getattr(hardware, "selection_margin", 1.05)
        producers = self.producers(readers)
        paths = [*readers.values(), *producers.values()]
        batch, one = self.module_inputs(paths, self.measure_batch), self.module_inputs(paths, 1)
        decisions = []
        for site, reader in readers.items():
            dense = self.model.get_submodule(reader)
            gather = GatherLinear(dense)
            x = batch[reader]
            timings = {"dense": time_ms(dense, x), "gather": time_ms(gather, x),
                       "dense_batch1": time_ms(dense, one[reader]), "gather_batch1": time_ms(gather, one[reader])}
            if site in producers:  # the rest of the FFN, the same in both: the speedup of the whole FFN
                producer = self.model.get_submodule(producers[site])
                timings |= {"up": time_ms(producer, batch[producers[site]]),
                            "up_batch1": time_ms(producer, one[producers[site]])}
            speedup = timings["dense"] / timings["gather"]
            keep = selection == "force" or speedup >= margin
            reason = ("hardware.selection=force" if selection == "force" else
                      f"{speedup:.2f}x at batch {x.shape[0]} (needs {margin}x); at one example "
                      f"{timings['dense_batch1'] / timings['gather_batch1']:.2f}x")
            if keep:
                replace(self.model, reader, gather)
            shape = f"x{list(x.shape)} w{list(dense.weight.shape)} {str(x.dtype).removeprefix('torch.')}"
            decisions.append(Decision(reader, "gather" if keep else "dense", reason, shape,
                                      {k: round(v, 4) for k, v in timings.items()}, selection == "force"))
        return decisions

    def calibrate(self) -> None:
        for site in self.sites.values():
            site.collect = []
            site.threshold.zero_()
        try:
            self.run("train", self.cfg.calibration_examples)
            for site in self.sites.values():
                t = quantile(torch.cat(site.collect), self.cfg.target_sparsity)
                site.threshold.fill_(max(t, 0.0))
        finally:
            for site in self.sites.values():
                site.collect = None

    def measure_sparsity(self) -> None:
        for site in self.sites.values():
            site.measuring, site.zeros, site.count = True, 0, 0
        try:
            self.run("val", self.cfg.measure_examples)
        finally:
            for site in self.sites.values():
                site.measuring = False
        self.measured = {path: round(site.zeros / max(site.count, 1), 6) for path, site in self.sites.items()}


def ffn_speedups(decisions: list[dict]) -> dict[str, float]:
    """``ffn_speedup_batch1`` and ``ffn_speedup``: (up + dense down) / (up + gathered down), the geometric
    mean over the FFNs whose up-projection was timed too."""
    out = {}
    for suffix in ("_batch1", ""):
        ratios = [(t[f"up{suffix}"] + t[f"dense{suffix}"]) / (t[f"up{suffix}"] + t[f"gather{suffix}"])
                  for t in (d.get("timings_ms") or {} for d in decisions) if f"up{suffix}" in t]
        if ratios:
            out[f"ffn_speedup{suffix}"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return out
