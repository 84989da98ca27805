"""Sparse Cocktail: one weight set co-trained for every sparsity pattern at every sparsity ratio.

Li, Chen, Wang et al., "Sparse Cocktail: Every Sparse Pattern Every Sparse Ratio All At Once" (ICML
2024, arXiv 2312.02000), §3. The shared weights are trained with subnetworks of three patterns,
unstructured, channel and N:M, at an increasing ratio per round, IMP-style:

1. **Dense warm-up** (``dense`` stage): the paper's co-training phases start from an early point of
   dense training, the weights every round rewinds to (§3.2, "rewind to around the 5th epoch").
2. **Unified Mask Generation** (§3.3) at the start of round i: one importance, |w| of the weights the
   previous round ended with, gives all three masks. Unstructured: the global top-|w| among the
   previous round's survivors (``imp.keep_largest``); N:M: the top N of every group of M along the
   input dimension among the previous round's survivors (``nm_sparsity.nm_mask``, groups as ASP lays
   them out); channel: per DepGraph channel group (``effml/models/channel_surgery.py``), the channels
   whose weights survive *both* the unstructured and the N:M mask of this round weigh most (Σ|w| of
   the doubly surviving weights), top (1 − ratio) of the previous round's channels. Every mask is
   drawn among the previous ratio's survivors, so the masks of one pattern nest (tested).
3. **Dense Pivot Co-training** (§3.4): within a round the optimizer steps alternate dense, sparse,
   dense, sparse, ...; the sparse steps cycle through the round's subnetworks (one per pattern).
   A subnetwork's step trains the shared weights through its mask (``torch.nn.utils.prune`` hooks on
   every conv, linear and BN parameter, so a mask can change every step without losing the pruned
   weights' values).
4. **Sparse Network Interpolation** (§3.5): the weights each round ended with are merged greedily,
   θ ← α θ + (1 − α) θ_i for the α of ``alphas`` that maximizes the mean validation accuracy of *all*
   subnetworks (every pattern, every ratio), BN statistics re-estimated per subnetwork.

``finalize`` keeps the merged dense weights (``model.pt``) and writes every mask to
``cocktail.pt`` beside it: one checkpoint from which any (pattern, ratio) subnetwork is extracted
(:meth:`SparseCocktail.extract`): unstructured and N:M by folding the masks into the weights, channel
by cutting the channels out with Torch-Pruning (widths rounded up to the hardware's
``channel_multiple``). Each extracted subnetwork gets its BN statistics re-estimated on training
batches, then its accuracy, sparsity, FLOPs and latency measured on the run's device against the
dense network (``effml.measure.compare_dense_compressed``). The report states the training cost: the
optimizer steps and seconds of every stage (the reviewers' question; the official README says
that its usage is still to be written).

Stated differences: ratios are effml's (the paper sweeps 10 ratios per pattern on CIFAR/ImageNet);
the N:M ratio r means N = M·(1 − r) with one M; BN statistics are re-estimated per subnetwork at
extraction rather than kept per subnetwork; the interpolation's α grid is ``alphas``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from effml import measure
from effml.choice import check_choices, choice
from effml.compressors._masks import LAYER_TYPES, matches
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage, autocast_dtype
from effml.compressors.imp import keep_largest, restore, snapshot
from effml.compressors.nm_sparsity import groups_over_n, nm_mask, select_layers
from effml.errors import EffmlError
from effml.models import channel_surgery as cs
from effml.models._common import recalibrate
from effml.paths import atomic_file
from effml.registry import COMPRESSORS

PATTERNS = ("unstructured", "channel", "nm")
Interpolation = choice("Interpolation", "greedy none")  # greedy: §3.5's merge; none: the last round's weights
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
DENSE = "dense"


@dataclass
class SparseCocktailConfig(CompressorConfig):
    """Sparse Cocktail (Li et al., ICML 2024): one weight set co-trained with unstructured, channel and
    N:M subnetworks at increasing ratios per round, masks from one magnitude ranking (nested), dense
    steps between sparse ones, rewind to the dense warm-up, round weights merged by greedy interpolation."""

    name: str = "sparse_cocktail"
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS))
    # One ratio per round, increasing (a round raises every pattern's ratio, §3.1); a pattern with
    # fewer ratios than rounds sits the later rounds out.
    unstructured_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])  # weights zero
    channel_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.625])  # channels removed per group
    nm_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.875])  # 1 − N/M: 4:8, 2:8, 1:8
    m: int = 8  # N:M group size along the input dimension
    dense_epochs: int | None = None  # the warm-up every round rewinds to (None: trainer.max_epochs)
    round_epochs: int | None = None  # each co-training round (None: trainer.max_epochs)
    dense_pivot: bool = True  # a dense step before every sparse step (§3.4); false: sparse steps only
    rewind: bool = True  # each round starts from the warm-up's weights (§3.2); false: continues
    interpolation: Interpolation = Interpolation.greedy
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # weight on the merge so far
    recalibration_batches: int = 8  # training batches that re-estimate BN statistics per subnetwork
    layer_types: list[str] = field(default_factory=lambda: ["Linear", "Conv2d"])
    output_layer: str = "classifier"  # never pruned (its outputs are the classes)

    def __post_init__(self):
        check_choices(self, "compressor")
        if not self.patterns or len(set(self.patterns)) != len(self.patterns) or set(self.patterns) - set(PATTERNS):
            raise EffmlError(f"compressor.patterns must be distinct names of {', '.join(PATTERNS)}; got {list(self.patterns)}")
        for pattern in self.patterns:
            name, ratios = f"{pattern}_ratios", list(getattr(self, f"{pattern}_ratios"))
            if not ratios or any(not 0 < r < 1 for r in ratios):
                raise EffmlError(f"compressor.{name} must be ratios in (0, 1), one per round; got {ratios}")
            if any(b <= a for a, b in zip(ratios, ratios[1:], strict=False)):
                raise EffmlError(f"compressor.{name} must be increasing (each round prunes more); got {ratios}")
        if self.m < 2:
            raise EffmlError(f"compressor.m must be >= 2; got {self.m}")
        if "nm" in self.patterns:
            for r in self.nm_ratios:
                n = self.m * (1 - r)
                if abs(n - round(n)) > 1e-6:
                    raise EffmlError(f"compressor.nm_ratios: {r} is not 1 - N/{self.m} for a whole N")
        for name in ("dense_epochs", "round_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {getattr(self, name)}")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise EffmlError(f"compressor.alphas must be weights in [0, 1]; got {list(self.alphas)}")
        if self.recalibration_batches < 0:
            raise EffmlError(f"compressor.recalibration_batches must be >= 0; got {self.recalibration_batches}")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise EffmlError(f"compressor.layer_types: unknown {sorted(unknown)}; choose from {sorted(LAYER_TYPES)}")

    def ratios(self, pattern: str) -> list[float]:
        return list(getattr(self, f"{pattern}_ratios")) if pattern in self.patterns else []

    @property
    def rounds(self) -> int:
        return max(len(self.ratios(p)) for p in self.patterns)

    def subnets(self) -> list[tuple[str, int, float]]:
        """(pattern, round, ratio) of every subnetwork, by round, then pattern."""
        return [(p, i, self.ratios(p)[i]) for i in range(self.rounds) for p in self.patterns if i < len(self.ratios(p))]


def subnet_key(pattern: str, ratio: float) -> str:
    """``nm_87p5``: a name without dots, so table specs can address it by a dotted path."""
    return f"{pattern}_{f'{ratio * 100:.4g}'.replace('.', 'p')}"


@COMPRESSORS.register("sparse_cocktail", SparseCocktailConfig)
class SparseCocktail(Compressor):
    """Sparse Cocktail (Li et al., ICML 2024): every pattern, every ratio, one shared weight set."""

    smoke = Smoke(("resnet",), ("dense_epochs=1", "round_epochs=1", "unstructured_ratios=[0.5,0.75]",
                                "channel_ratios=[0.25,0.5]", "nm_ratios=[0.5,0.75]", "m=4",
                                "recalibration_batches=2", "alphas=[0.0,0.5,1.0]"))
    owns = frozenset({"masks", "structure", "rewinding"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        subnets = metrics["compressors"][name]["subnets"]
        for key, s in subnets.items():
            if s["pattern"] == "unstructured" and abs(s["layer_sparsity"] - s["ratio"]) > 0.01:
                return f"{key}: sparsity {s['layer_sparsity']}, not {s['ratio']}"
            if s["pattern"] == "nm" and s["groups_over_n"] != 0:
                return f"{key}: {s['groups_over_n']} groups hold more than N nonzeros"
            if s["pattern"] == "channel" and not s["flops"]["compressed"] < s["flops"]["dense"]:
                return f"{key}: FLOPs not reduced ({s['flops']})"
        return None if subnets else "no subnetwork measured"

    def __init__(self, cfg: SparseCocktailConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}  # conv/linear layers the unstructured masks cover
        self.nm_layers: dict[str, nn.Module] = {}  # those whose input width M divides
        self.masked: dict[str, nn.Module] = {}  # every module with a prune mask (weights, biases, BN)
        self.plan: cs.ChannelPlan | None = None
        self.inputs: dict[str, Tensor] = {}
        self.datamodule = None
        self.ctx: RunContext | None = None
        # the state (state_dict): masks per subnetwork, rewind point, round weights, training cost
        self.masks: dict[str, dict[str, Tensor]] = {}  # subnet key → {"module.weight": bool}
        self.keeps: dict[str, dict[str, Tensor]] = {}  # channel subnet key → {group: bool per channel}
        self.rewind_weights: dict[str, Tensor] | None = None
        self.round_weights: list[dict[str, Tensor]] = []
        self.cost: list[dict[str, Any]] = []  # per stage of ours: steps, seconds (from the records, in finalize)
        self.active: str = DENSE  # the subnetwork the current step trains
        self.round: int | None = None  # the co-training round in progress
        self._channel_slices: dict[str, dict[tuple[str, str], Tensor]] = {}  # derived from keeps, cached
        self.interpolation_log: list[dict[str, Any]] = []
        self.subnets: dict[str, dict[str, Any]] = {}
        self.finalize_s = 0.0

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        rounds = [Stage(f"round_{i:02d}", self.cfg.round_epochs, self.name) for i in range(self.cfg.rounds)]
        return [Stage(DENSE, self.cfg.dense_epochs, self.name), *rounds]

    def attach(self, model: nn.Module) -> nn.Module:
        types = tuple(LAYER_TYPES[t] for t in self.cfg.layer_types)
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, types) and not matches(n, [self.cfg.output_layer])}
        if not self.layers:
            raise EffmlError(f"compressor sparse_cocktail found no {self.cfg.layer_types} layer outside "
                             f"{self.cfg.output_layer} in {type(model).__name__}")
        self.nm_layers, _ = select_layers(model, self.cfg.layer_types, [self.cfg.output_layer], self.cfg.m)
        if "nm" in self.cfg.patterns and not self.nm_layers:
            raise EffmlError(f"compressor sparse_cocktail: no layer of {type(model).__name__} has an input "
                             f"width divisible by m={self.cfg.m}")
        # Hooks (not in-place masks): a mask changes every step and the pruned weights keep their
        # values for the dense steps. BN and biases too, so a removed channel outputs exactly zero.
        for name, module in model.named_modules():
            if isinstance(module, (*LAYER_TYPES.values(), *NORMS)):
                for param in ("weight", "bias"):
                    if isinstance(getattr(module, param, None), nn.Parameter):
                        prune.identity(module, param)
                        self.masked[name] = module
        self.model = model
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.ctx, self.datamodule = ctx, datamodule
        self.inputs = datamodule.example_inputs(2)
        if "channel" in self.cfg.patterns:
            self.plan = cs.channel_plan(self.model, self.inputs, self.cfg.output_layer)

    def begin_stage(self, stage: Stage, task) -> None:
        self.round = None  # the dense warm-up, or another compressor's stage: dense steps only
        if stage.owner != self.name:
            return
        self.use(DENSE)
        if stage.key == DENSE:
            return
        index = int(stage.key.removeprefix("round_"))
        self.round = index
        self._generate_masks(index)  # from the weights the previous stage ended with (UMG)
        for key in self.keeps:  # sliced here, on the CPU model: the steps only copy them into place
            self._slices(key)
        if self.cfg.rewind and self.rewind_weights is not None:
            restore(self.model, self.rewind_weights, {})
        self.use(DENSE)  # refresh the hooks' products after the rewind

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.round is None:
            return
        round_subnets = [subnet_key(p, r) for p, i, r in self.cfg.subnets() if i == self.round]
        step = trainer.global_step
        if self.cfg.dense_pivot:  # dense, sparse, dense, sparse, ... (§3.4)
            key = DENSE if step % 2 == 0 else round_subnets[(step // 2) % len(round_subnets)]
        else:
            key = round_subnets[step % len(round_subnets)]
        self.use(key)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.use(DENSE)  # a stage's val/test numbers are the dense network's

    def on_test_start(self, trainer, pl_module) -> None:
        self.use(DENSE)

    def on_train_end(self, trainer, pl_module) -> None:
        self.use(DENSE)

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        if stage.owner != self.name:
            return None
        if stage.key == DENSE:
            self.rewind_weights = snapshot(self.model)
        else:
            self.round_weights.append(snapshot(self.model))
        return {"subnets_trained": [subnet_key(p, r) for p, i, r in self.cfg.subnets()
                                    if stage.key == f"round_{i:02d}"]}

    def state_dict(self) -> dict:
        # no wall-clock times here: a resumed run's end.pt must be byte-identical (the cost is read
        # from the stages' records in finalize)
        return {"masks": self.masks, "keeps": self.keeps, "rewind_weights": self.rewind_weights,
                "round_weights": self.round_weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.masks, self.keeps = state_dict["masks"], state_dict["keeps"]
        self.rewind_weights, self.round_weights = state_dict["rewind_weights"], state_dict["round_weights"]

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        start = time.perf_counter()
        self.cost = self._stage_costs()
        self.round = None
        merged = self._interpolate()
        restore(self.model, merged, {})
        self.use(DENSE)
        batches = self._recalibration_batches()
        dense = self._plain(self.model)
        recalibrate(dense, batches)
        device = torch.device("cuda" if hardware.accelerator == "gpu" and torch.cuda.is_available() else "cpu")
        for pattern, _, ratio in self.cfg.subnets():
            key = subnet_key(pattern, ratio)
            subnet = self.extract(key, hardware.channel_multiple)
            recalibrate(subnet, batches)
            self.subnets[key] = self._measure(key, pattern, ratio, dense, subnet, device, hardware)
        self._save_artifact()
        self.finalize_s = time.perf_counter() - start
        return dense

    def target_sparsity(self) -> None:
        return None  # the dense network is deployed; each subnetwork's sparsity is in the report

    def report(self) -> dict[str, Any]:
        steps = sum(c["steps"] for c in self.cost)
        return {
            "patterns": list(self.cfg.patterns),
            "rounds": self.cfg.rounds,
            "dense_pivot": self.cfg.dense_pivot,
            "rewind": self.cfg.rewind,
            "interpolation": self.cfg.interpolation,
            "interpolation_steps": self.interpolation_log,
            "training_cost": {"steps": steps, "time_s": round(sum(c["time_s"] for c in self.cost), 3),
                              "stages": self.cost, "finalize_s": round(self.finalize_s, 3)},
            "subnets": self.subnets,
            "points": list(self.subnets.values()),
        }

    # -- masks ---------------------------------------------------------------------------------
    def use(self, key: str) -> None:
        """Put subnetwork ``key``'s masks (all ones for ``dense``) on the model."""
        self.active = key
        cs.load_masks(self.masked, self._slices(key))

    def _slices(self, key: str) -> dict[tuple[str, str], Tensor]:
        if key == DENSE:
            return {}
        if key in self.keeps:
            if key not in self._channel_slices:  # a step's switch must not re-slice every parameter
                self._channel_slices[key] = cs.slice_masks(self.plan, self.keeps[key], self.model)
            return self._channel_slices[key]
        return {tuple(k.rsplit(".", 1)): v.float() for k, v in self.masks[key].items()}

    @torch.no_grad()
    def _generate_masks(self, index: int) -> None:
        """Unified Mask Generation (module docstring, step 2) for round ``index``: each mask among the
        previous ratio's survivors, so every pattern's masks nest."""
        weights = {n: _weight(m) for n, m in self.layers.items()}
        ratios = {p: r for p, i, r in self.cfg.subnets() if i == index}
        previous = {p: subnet_key(p, self.cfg.ratios(p)[index - 1]) if index > 0 else None for p in ratios}
        if "unstructured" in ratios:
            self.masks[subnet_key("unstructured", ratios["unstructured"])] = self._unstructured(
                weights, ratios["unstructured"], previous["unstructured"])
        if "nm" in ratios:
            self.masks[subnet_key("nm", ratios["nm"])] = self._nm(weights, ratios["nm"], previous["nm"])
        if "channel" in ratios:
            self.keeps[subnet_key("channel", ratios["channel"])] = self._channel(weights, index, ratios["channel"],
                                                                                previous["channel"])

    def _unstructured(self, weights: dict[str, Tensor], ratio: float, previous: str | None) -> dict[str, Tensor]:
        before = [self.masks[previous][f"{n}.weight"].float() if previous else torch.ones_like(w)
                  for n, w in weights.items()]
        total = sum(w.numel() for w in weights.values())
        kept = keep_largest([w.abs() for w in weights.values()], before, total - round(ratio * total))
        return {f"{n}.weight": k.bool() for n, k in zip(weights, kept, strict=True)}

    def _nm(self, weights: dict[str, Tensor], ratio: float, previous: str | None) -> dict[str, Tensor]:
        n = round(self.cfg.m * (1 - ratio))
        masks = {}
        for name in self.nm_layers:
            before = self.masks[previous][f"{name}.weight"].float() if previous else torch.ones_like(weights[name])
            # |w| + 1 on the survivors, 0 elsewhere: the top N of a group are always survivors
            masks[f"{name}.weight"] = nm_mask((weights[name].abs() + 1) * before, n, self.cfg.m).bool()
        return masks

    def _channel(self, weights: dict[str, Tensor], index: int, ratio: float, previous: str | None) -> dict[str, Tensor]:
        """Per channel group, Σ|w| of the producers' weights that survive this round's unstructured and
        N:M masks (|w| alone where a pattern is absent): the top (1 − ratio) of the previous channels."""
        unstructured = self.masks.get(subnet_key("unstructured", r)) if (r := self._ratio_at("unstructured", index)) else None
        nm = self.masks.get(subnet_key("nm", r)) if (r := self._ratio_at("nm", index)) else None
        keep = {}
        for group in self.plan.groups:
            producers = [m for m in group.producers if m.module in self.layers and m.dim == 0]
            if not producers:
                keep[group.name] = torch.ones(group.size, dtype=torch.bool)
                continue
            score = torch.zeros(group.size)
            for member in producers:
                w = weights[member.module].abs()
                for masks in (unstructured, nm):
                    if masks is not None and f"{member.module}.weight" in masks:
                        w = w * masks[f"{member.module}.weight"]
                score.index_add_(0, member.channel, w.flatten(1).sum(1).float())
            allowed = self.keeps[previous][group.name] if previous else torch.ones(group.size, dtype=torch.bool)
            count = max(1, math.ceil(group.size * (1 - ratio) - 1e-9))
            kept = torch.zeros(group.size, dtype=torch.bool)
            kept[torch.where(allowed, score, -1.0).topk(min(count, int(allowed.sum()))).indices] = True
            keep[group.name] = kept
        return self.plan.close(keep)

    def _ratio_at(self, pattern: str, index: int) -> float | None:
        ratios = self.cfg.ratios(pattern)
        return ratios[index] if index < len(ratios) else None

    # -- extraction and measurement ------------------------------------------------------------
    def extract(self, key: str, channel_multiple: int = 1) -> nn.Module:
        """Subnetwork ``key`` as a plain model of its own (the model is left as it was): masks folded
        into the weights; a channel subnetwork's channels cut out physically."""
        active = self.active
        self.use(key)
        try:
            if key in self.keeps:
                model, _ = cs.remove_channels(self.model, self.inputs, self.keeps[key], channel_multiple,
                                              output_layer=self.cfg.output_layer, plan=self.plan)
                return model
            return self._plain(self.model)
        finally:
            self.use(active)

    @staticmethod
    def _plain(model: nn.Module) -> nn.Module:
        """A copy with the masks folded in and no pruning reparametrization."""
        for module in model.modules():
            for param in ("weight", "bias"):
                if hasattr(module, f"{param}_orig"):
                    setattr(module, param, getattr(module, param).detach())  # deepcopy refuses graph nodes
        plain = copy.deepcopy(model)
        for module in plain.modules():
            for param in ("weight", "bias"):
                if hasattr(module, f"{param}_orig"):
                    prune.remove(module, param)
        return plain

    def _measure(self, key: str, pattern: str, ratio: float, dense: nn.Module, subnet: nn.Module,
                 device: torch.device, hardware) -> dict[str, Any]:
        """Accuracy, sparsity and FLOPs of one extracted subnetwork, and its latency against the dense
        network on the run's device (skipped with ``measure.enabled=false``, as the run's own)."""
        m = self.ctx.measure
        inputs = self.datamodule.example_inputs(m.batch_size)
        if m.enabled:
            speed = measure.compare_dense_compressed(dense, subnet, inputs, device, dtype=autocast_dtype(hardware, device),
                                                     warmup=m.warmup, iters=m.iters, min_time_s=m.min_time_s)
            flops = {"dense": speed["dense"]["flops_per_sample"], "compressed": speed["compressed"]["flops_per_sample"],
                     "effective": speed["compressed"]["effective_flops_per_sample"]}
            timing = {k: speed[k] for k in ("device_name", "batch_size", "speedup")} | {
                side: {"latency_ms": speed[side]["latency_ms"], "latency_p90_ms": speed[side]["latency_p90_ms"]}
                for side in ("dense", "compressed")}
        else:
            d, c = measure.count_flops(dense, inputs), measure.count_flops(subnet, inputs)
            flops = {"dense": d["total_per_sample"], "compressed": c["total_per_sample"],
                     "effective": c["effective_per_sample"]}
            timing = None
        # zeros, or weights cut out, as a fraction of the pruned layers' dense weights
        before, after = measure.sparsity_report(dense), measure.sparsity_report(subnet)
        pruned = [n for n in self.layers if n in after["layers"]]
        nonzero = sum(after["layers"][n]["numel"] * (1 - after["layers"][n]["sparsity"]) for n in pruned)
        numel = sum(before["layers"][n]["numel"] for n in pruned)
        modules = dict(subnet.named_modules())
        over_n = sum(groups_over_n(modules[n].weight, round(self.cfg.m * (1 - ratio)), self.cfg.m)
                     for n in self.nm_layers) if pattern == "nm" else None
        return {
            "pattern": pattern, "ratio": ratio, "key": key,
            "val_acc": round(accuracy(subnet, self.datamodule.val_dataloader()), 6),
            "test_acc": round(accuracy(subnet, self.datamodule.test_dataloader()), 6),
            "layer_sparsity": round(1 - nonzero / numel, 6) if numel else None,
            "sparsity": after["sparsity"],
            "params": after["params_total"],
            "params_nonzero": after["params_nonzero"],
            "groups_over_n": over_n,
            "channels_kept": self._channels_kept(key),
            "flops": flops,
            "speed": timing,
            "train_time_s": round(sum(c["time_s"] for c in self.cost), 3),  # the one co-training run's
            "train_steps": sum(c["steps"] for c in self.cost),
        }

    def _channels_kept(self, key: str) -> float | None:
        if key not in self.keeps:
            return None
        kept = sum(int(k.sum()) for k in self.keeps[key].values())
        return round(kept / sum(k.numel() for k in self.keeps[key].values()), 6)

    def _stage_costs(self) -> list[dict[str, Any]]:
        """Steps and seconds of each of our stages, from its ``record.json`` (a resumed stage's time
        includes the time before the kill, ``effml.checkpoints.ResumeState``)."""
        if self.ctx is None:
            return []
        records = [json.loads(s.record.read_text()) for s in self.ctx.run_dir.finished_stages()]
        return [{"stage": r["name"], "steps": r["steps"], "time_s": r["time_s"]} for r in records
                if r.get("owner") == self.name]

    def _recalibration_batches(self) -> list[dict[str, Tensor]]:
        """The first training batches of epoch 0's seeded order: the same in a resumed run."""
        batches = []
        for batch in self.datamodule.train_dataloader():
            if len(batches) >= self.cfg.recalibration_batches:
                break
            batches.append({k: v for k, v in batch.items() if k != "labels"})
        return batches

    # -- interpolation -------------------------------------------------------------------------
    def _interpolate(self) -> dict[str, Tensor]:
        """Sparse Network Interpolation (module docstring, step 4): greedy over the rounds' weights."""
        merged = self.round_weights[0]
        if self.cfg.interpolation == "none":
            return self.round_weights[-1]
        batches = self._recalibration_batches()
        for i, weights in enumerate(self.round_weights[1:], start=1):
            scores = {}
            for alpha in self.cfg.alphas:
                scores[alpha] = self._mean_val_acc(mix(merged, weights, alpha), batches)
            best = max(scores, key=lambda a: (scores[a], -abs(a - 0.5)))
            merged = mix(merged, weights, best)
            self.interpolation_log.append({"round": i, "alpha": best,
                                           "mean_val_acc": {str(a): round(s, 6) for a, s in scores.items()}})
        return merged

    def _mean_val_acc(self, weights: dict[str, Tensor], batches: list[dict[str, Tensor]]) -> float:
        """Mean validation accuracy over every subnetwork, each with its BN statistics re-estimated;
        the masked model stands for the cut one (equal outputs, tests/test_sparse_cocktail.py)."""
        restore(self.model, weights, {})
        accs = []
        for pattern, _, ratio in self.cfg.subnets():
            self.use(subnet_key(pattern, ratio))
            recalibrate(self.model, batches)
            accs.append(accuracy(self.model, self.datamodule.val_dataloader()))
        self.use(DENSE)
        return sum(accs) / len(accs)

    def _save_artifact(self) -> None:
        """``cocktail.pt``: every subnetwork's masks, beside ``model.pt`` (the dense weights)."""
        if self.ctx is None:
            return
        with atomic_file(self.ctx.run_dir.artifact("cocktail.pt")) as f:
            torch.save({"masks": self.masks, "keeps": self.keeps,
                        "subnets": [[p, r] for p, _, r in self.cfg.subnets()]}, f)


def _weight(module: nn.Module) -> Tensor:
    """The trained weight, masked entries included (the dense steps train them all)."""
    return (module.weight_orig if hasattr(module, "weight_orig") else module.weight).detach().clone()


def mix(a: dict[str, Tensor], b: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """α·a + (1 − α)·b for floating tensors; the others (BN's step counts) from b."""
    return {k: alpha * a[k] + (1 - alpha) * b[k] if b[k].is_floating_point() else b[k].clone() for k in b}


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = logits.logits if hasattr(logits, "logits") else logits
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)
