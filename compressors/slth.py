"""Structurally sparse lottery tickets: IMP whose masks are refilled into whole channels.

Chen, Chen, Ma, Wang & Wang, "Coarsening the Granularity: Towards Structurally Sparse Lottery
Tickets" (ICML 2022, arXiv 2202.04736), §3.2 "IMP-Refill" and "IMP-Refill+", and the official code
(VITA-Group/Structure-LTH, ``main_imp_fillback.py``, ``prune_model_custom_fillback``). Each round:

1. train; prune 20% of the surviving conv weights by magnitude, one global ranking (IMP);
2. **refill**: per layer, rank the output channels by their surviving weights (the code's
   ``criteria="remain"``) and keep the top k, where k is the number of channels the survivors would
   fill (survivors / weights per channel); the kept channels become dense again, the others are
   removed; **refill+** keeps k + (C − k) × ``refill_rate``, re-activating channels (ties among
   channels with no survivors go to the larger trained weights);
3. rewind the kept weights to θ0 (or θ_N) and train again.

This compressor *is* ``imp`` (``compressors/imp.py``: levels, rewinding, resume, the level report),
with the unstructured masks of step 1 replaced by refilled ones. effml refills per DepGraph channel
group (``effml/models/channel_surgery.py``) rather than per layer, because a ResNet's residual stream
couples every block's second conv: a channel is kept or removed in all of them, ranked by their
survivors summed, so that the ticket can be cut out physically. A removed channel's BN affine
parameters (and a conv bias) are masked too, so it outputs exactly zero while the ticket trains and
the cut changes nothing. ``finalize`` removes the channels with Torch-Pruning, every kept width
rounded up to the hardware's ``channel_multiple``; the run's speed measurement then times the shrunk
network against the dense one.

Differences from the paper's setup, stated: the stem conv is pruned too (the code skips ``conv1``
unless ``--conv1``; effml's skip patterns match any ``*.conv1``); the classifier stays dense, as in
the code (conv layers only).
``channel_budget`` is effml's own knob: a fixed fraction of every group's channels at the last level
(level k keeps ``channel_budget ** (k / levels)``), instead of the survivors' count.

**Regroup** (``refill=regroup``, the paper's IMP-Regroup, §3.2; the code's ``main_imp_regroup.py``):
each level's unstructured masks are regrouped per conv layer into at most ``regroup_blocks`` dense
blocks (rows × input channels × k × k), refilled, everything outside them pruned; then rewound and
trained as the other variants. The paper partitions with hMETIS, which no package here provides:
effml's partitioner is a stated approximation, recursive spectral bisection of the row–column
bipartite graph (Dhillon's spectral co-clustering), and the blocks' columns are whole input
channels rather than im2col entries (``effml/models/block_sparse.py`` says why). ``finalize``
removes the channels no block uses (as above), then runs every pruned conv as its dense blocks
(``BlockConv2d``: gathered input channels, one dense conv per block), which the speed measurement
times against dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from effml.choice import check_choices, choice
from effml.compressors._masks import Scope
from effml.compressors.base import RunContext, Smoke
from effml.compressors.imp import IMPConfig, IterativeMagnitudePruning
from effml.errors import EffmlError
from effml.models import block_sparse as bs
from effml.models import channel_surgery as cs
from effml.registry import COMPRESSORS

Refill = choice("Refill", "refill refill_plus regroup")  # the paper's IMP-Refill, IMP-Refill+, IMP-Regroup
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class SLTHConfig(IMPConfig):
    """Structurally sparse lottery tickets (Chen et al., ICML 2022, IMP-Refill): IMP on the conv layers,
    20% of the survivors per level, one global ranking, rewind to θ0; each level's masks refilled into
    whole channels; the ticket's channels removed physically at the end."""

    name: str = "slth"
    refill: Refill = Refill.refill
    refill_rate: float = 0.1  # refill_plus: share of the removed channels re-activated per level
    channel_budget: float | None = None  # effml's knob: kept channel fraction at the last level; None: survivors'
    regroup_blocks: int = 2  # regroup: dense blocks (row groups) per conv layer, at most
    # regroup: block rows and columns round to multiples of this where a layer allows: on the 2-core CPU a
    # conv of 9 input channels took 2.4x the time of one of 8 (mkldnn's blocked layouts)
    block_multiple: int = 8
    scope: Scope = Scope("global")  # the code's global_unstructured
    layer_types: list[str] = field(default_factory=lambda: ["Conv2d"])  # the code prunes conv layers only

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, "compressor")
        if not 0 <= self.refill_rate < 1:
            raise EffmlError(f"compressor.refill_rate must be in [0, 1); got {self.refill_rate}")
        if self.block_multiple < 1:
            raise EffmlError(f"compressor.block_multiple must be at least 1; got {self.block_multiple}")
        if self.regroup_blocks < 1:
            raise EffmlError(f"compressor.regroup_blocks must be at least 1; got {self.regroup_blocks}")
        if self.refill == "regroup" and self.channel_budget is not None:
            raise EffmlError("compressor.channel_budget is Refill's; refill=regroup sizes its blocks by the survivors")
        if self.channel_budget is not None and not 0 < self.channel_budget <= 1:
            raise EffmlError(f"compressor.channel_budget must be in (0, 1]; got {self.channel_budget}")
        if self.uses_source:
            raise EffmlError("compressor slth finds its own ticket: control and ticket_from are imp's options; "
                             "use compressor=imp for them")


@COMPRESSORS.register("slth", SLTHConfig)
class StructuredTicket(IterativeMagnitudePruning):
    """Structurally sparse lottery tickets (Chen et al., ICML 2022): IMP-Refill(+), channels removed."""

    smoke = Smoke(("resnet",), ("levels=1", "level_epochs=1"))
    owns = frozenset({"masks", "structure", "rewinding"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        problem = super().effect(name, metrics)
        if problem:
            return problem
        report = metrics["compressors"][name]
        if report["refill"] == "regroup":
            density = report["block_density"]
            return None if density is not None and density < 1 else f"no weight outside the blocks: density {density}"
        # its own widths, not metrics["flops"]: those compare with the speed reference, a teacher under kd
        after = metrics["compressors"][name]["channels_after_rounding"]
        return None if after is not None and after < 1 else f"no channel removed: {after} of the channels remain"

    def __init__(self, cfg: SLTHConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.plan: cs.ChannelPlan | None = None
        self.inputs: dict[str, Tensor] = {}
        self.extra: dict[str, nn.Module] = {}  # name → BN or biased layer whose channels are masked too
        self.widths: dict[str, dict[str, int]] = {}
        self.blocks: dict[str, dict[str, Any]] = {}  # regroup: per conv, its blocks' shapes

    # -- contract ---------------------------------------------------------------------------
    def masks_in_place(self) -> bool:
        return False  # the refill ranks channels by their trained weights, pruned entries included

    def attach(self, model: nn.Module) -> nn.Module:
        model = super().attach(model)
        # A removed channel must output zero: mask its BN affine parameters and conv biases as well.
        # Done here, before any checkpoint loads, so the keys (bias_mask, ...) match a resumed run's.
        for name, module in model.named_modules():
            if isinstance(module, NORMS) and module.affine or (name in self.layers and module.bias is not None):
                for param in ("weight", "bias") if isinstance(module, NORMS) else ("bias",):
                    prune.identity(module, param)
                self.extra[name] = module
        self.model = model
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        super().prepare(ctx, datamodule)
        self.inputs = datamodule.example_inputs(2)
        self.plan = cs.channel_plan(self.model, self.inputs, self.cfg.output_layer)

    def begin_stage(self, stage, task) -> None:
        super().begin_stage(stage, task)
        if stage.owner != self.name:
            return
        keep = self.channels_kept()
        self._mask_extra(keep)
        kept = sum(int(k.sum()) for k in keep.values())
        self.current["channels_remaining"] = round(kept / sum(g.size for g in self.plan.groups), 6)

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        keep, scores = self.channels_kept(), self._channel_scores(magnitude_only=True)
        model = super().finalize(model, hardware)
        for module in self.extra.values():
            for param in ("weight", "bias"):
                if prune.is_pruned(module) and hasattr(module, f"{param}_mask"):
                    prune.remove(module, param)
        shrunk, self.widths = cs.remove_channels(model, self.inputs, keep, hardware.channel_multiple, scores,
                                                 self.cfg.output_layer, self.plan)
        if self.cfg.refill == "regroup":
            self._run_as_blocks(shrunk)
        return shrunk

    def _run_as_blocks(self, shrunk: nn.Module) -> None:
        """Every pruned conv of the shrunk ticket replaced by its dense blocks (``BlockConv2d``)."""
        dense = {name: shrunk.get_submodule(name).weight.numel() for name in self.layers}
        for name in bs.to_blocks(shrunk, list(self.layers)):
            layer = shrunk.get_submodule(name)
            self.blocks[name] = {"shape": [layer.out_channels, layer.in_channels],
                                 "blocks": [list(w.shape[:2]) for w in layer.weights],
                                 "density": round(layer.block_weights() / dense[name], 6)}

    def target_sparsity(self) -> None:
        return None  # refilling decides the sparsity; the report has what was reached

    def report(self) -> dict[str, Any]:
        before = sum(w["before"] for w in self.widths.values())
        return {
            **super().report(),
            "refill": self.cfg.refill,
            "refill_rate": self.cfg.refill_rate if self.cfg.refill == "refill_plus" else None,
            "channel_budget": self.cfg.channel_budget,
            "channels_kept": round(sum(w["kept"] for w in self.widths.values()) / before, 6) if before else None,
            "channels_after_rounding": round(sum(w["after"] for w in self.widths.values()) / before, 6) if before else None,
            "groups": self.widths,
            **self._block_report(),
        }

    def _block_report(self) -> dict[str, Any]:
        if self.cfg.refill != "regroup":
            return {}
        total = sum(math.prod(b["shape"]) for b in self.blocks.values())
        inside = sum(b["density"] * math.prod(b["shape"]) for b in self.blocks.values())
        return {"regroup_blocks": self.cfg.regroup_blocks,
                "regroup_partitioner": "recursive spectral bisection (approximates hMETIS)",
                "block_multiple": self.cfg.block_multiple,
                "block_density": round(inside / total, 6) if total else None,  # of the shrunk convs' weights
                "blocks": self.blocks}

    # -- refilling ---------------------------------------------------------------------------
    def _next_masks(self, level: int) -> list[Tensor]:
        """IMP's unstructured masks of this level, refilled into whole channels (or regrouped into
        dense blocks)."""
        if self.cfg.refill == "regroup":
            return [bs.regroup_mask(mask, self.cfg.regroup_blocks, self.cfg.block_multiple) if bs.blockable(module) else mask
                    for module, mask in zip(self.layers.values(), super()._next_masks(level), strict=True)]
        for module, mask in zip(self.layers.values(), super()._next_masks(level), strict=True):
            module.weight_mask.copy_(mask)  # read by the refill below; begin_stage sets what we return
        keep = self._refill(level)
        masks = cs.slice_masks(self.plan, keep, self.model)
        return [masks.get((name, "weight"), torch.ones_like(m.weight_mask)) for name, m in self.layers.items()]

    def _refill(self, level: int) -> dict[str, Tensor]:
        keep = {}
        scores = self._channel_scores()
        for group in self.plan.groups:
            producers = self._producers(group)
            if not producers:  # no pruned layer makes these channels (fully connected layers): all stay
                keep[group.name] = torch.ones(group.size, dtype=torch.bool)
                continue
            count = min(group.size, max(1, self._budget(group, producers, level)))
            kept = torch.zeros(group.size, dtype=torch.bool)
            kept[scores[group.name].topk(count).indices] = True
            keep[group.name] = kept
        return self.plan.close(keep)

    def _budget(self, group: cs.Group, producers: list[cs.Member], level: int) -> int:
        if self.cfg.channel_budget is not None:
            return math.ceil(group.size * self.cfg.channel_budget ** (level / self.level_numbers()[-1]) - 1e-9)
        alive = sum(float(self.layers[m.module].weight_mask.sum()) for m in producers)
        per_channel = sum(self.layers[m.module].weight_mask[0].numel() for m in producers)
        k = alive / per_channel  # the channels the survivors would fill (the code's num_channel)
        if self.cfg.refill == "refill_plus":
            k += (group.size - k) * self.cfg.refill_rate
        return round(k)

    def _producers(self, group: cs.Group) -> list[cs.Member]:
        return [m for m in group.producers if m.module in self.layers and m.dim == 0]

    def _channel_scores(self, magnitude_only: bool = False) -> dict[str, Tensor]:
        """Per group and channel: surviving weights over its producers (the code's ``remain``), ties
        broken by the L1 norm of the trained weights (a number below 1 added)."""
        scores = {}
        for group in self.plan.groups:
            survivors = torch.zeros(group.size)
            magnitude = torch.zeros(group.size)
            for member in self._producers(group):
                module = self.layers[member.module]
                weight = module.weight_orig if hasattr(module, "weight_orig") else module.weight
                mask = module.weight_mask if hasattr(module, "weight_mask") else (weight != 0).float()
                survivors.index_add_(0, member.channel, mask.detach().flatten(1).sum(1).float())
                magnitude.index_add_(0, member.channel, weight.detach().abs().flatten(1).sum(1).float())
            magnitude = magnitude / (magnitude.max() + 1e-12) * 0.5
            scores[group.name] = magnitude if magnitude_only else survivors + magnitude
        return scores

    def channels_kept(self) -> dict[str, Tensor]:
        """Each group's channels that some pruned producer still has a weight in (all, for groups
        that no pruned layer makes)."""
        keep = {}
        for group in self.plan.groups:
            producers = self._producers(group)
            kept = torch.zeros(group.size, dtype=torch.bool) if producers else torch.ones(group.size, dtype=torch.bool)
            for member in producers:
                alive = self.layers[member.module].weight_mask.detach().flatten(1).sum(1) > 0
                kept[member.channel[alive]] = True
            keep[group.name] = kept
        return self.plan.close(keep)

    @torch.no_grad()
    def _mask_extra(self, keep: dict[str, Tensor]) -> None:
        cs.load_masks(self.extra, cs.slice_masks(self.plan, keep, self.model))
