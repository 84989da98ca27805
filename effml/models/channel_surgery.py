"""Physical channel removal for conv nets, shared by the structured methods (issue 22).

Torch-Pruning's DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023,
arXiv 2301.12900; ``torch_pruning.DependencyGraph``) traces the model once and groups every
parameter slice that must go with a channel: the conv or linear layer that makes it, its BN, the
next layers' input channels (through flatten, pooling and residual additions) and the classifier's
inputs. effml uses it for two things:

- ``ChannelPlan``: the groups as plain data (which rows or columns of which parameter belong to
  which channel of which group), so a method can *mask* whole channels while it trains, on the
  model with its pruning reparametrization, without a graph in hand;
- ``remove_channels``: the physical cut, with every dependent layer shrunk by Torch-Pruning, each
  group's kept width rounded up to the hardware's ``channel_multiple``
  (``effml.models.bert_surgery.round_up``; channels added back by rounding are the removed ones of
  highest score).

A channel whose producing weights, bias and BN affine parameters are all zero outputs exactly zero
(BN gives β + γ·(x − μ)/σ = 0), so removing it changes nothing: ``zero_channels`` does that
in place, and the tests check that the shrunk model's output equals the zeroed model's. A channel
that a shortcut also feeds is zero only when the shortcut's source channel is removed as well;
``ChannelPlan.close`` keeps the others.

ResNet's option-A shortcut (subsample, zero-pad channels: ``effml.models.resnet.PadShortcut``) is
an operation DepGraph does not know; traced as an element-wise op it would couple 16 channels with
32. Before tracing it becomes a ``MappedShortcut``: the same function written as a fixed 0/1
selection (output channel ← input channel or zero), whose input and output channels are pruned
independently by its own pruner. That is exact: the padded channels of the next stage are sums of
a conv's output and a shortcut term, and either side may lose a channel without the other.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from effml.errors import EffmlError
from effml.models.bert_surgery import round_up
from effml.models.resnet import PadShortcut

PRODUCERS = (nn.Conv2d, nn.Conv1d, nn.Linear)  # layers whose output channels root a group
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class MappedShortcut(nn.Module):
    """Option A's shortcut as a channel map: subsample by ``stride``, then output channel o is input
    channel ``source[o]``, or zero where ``source[o] == -1``. ``tracing`` makes the forward one
    strided 1x1 convolution with the 0/1 selection, so DepGraph sees one node with decoupled in and
    out channels; otherwise the forward gathers (no multiply-adds)."""

    def __init__(self, stride: int, source: Tensor, in_channels: int):
        super().__init__()
        self.stride, self.in_channels, self.tracing = stride, in_channels, False
        self.register_buffer("source", source.long(), persistent=False)

    @classmethod
    def from_pad(cls, pad: PadShortcut, in_channels: int) -> MappedShortcut:
        low = pad.extra // 2
        source = torch.full((in_channels + pad.extra,), -1, dtype=torch.long)
        source[low:low + in_channels] = torch.arange(in_channels)
        return cls(pad.stride, source, in_channels)

    def selection(self) -> Tensor:
        weight = torch.zeros(len(self.source), self.in_channels + 1)
        weight[torch.arange(len(self.source)), torch.where(self.source >= 0, self.source, self.in_channels)] = 1
        return weight[:, : self.in_channels, None, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.tracing:
            return F.conv2d(x, self.selection().to(x), stride=self.stride)
        x = x[:, :, :: self.stride, :: self.stride]
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)  # channel in_channels: zeros
        return x[:, torch.where(self.source >= 0, self.source, self.in_channels)]


class MappedShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner of ``MappedShortcut``: in and out channels are separate functions, so
    DepGraph couples neither with the other (``BasePruningFunc``'s rule)."""

    TARGET_MODULES = MappedShortcut

    def prune_out_channels(self, layer: MappedShortcut, idxs) -> MappedShortcut:
        keep = sorted(set(range(len(layer.source))) - set(int(i) for i in idxs))
        layer.source = layer.source[keep]
        return layer

    def prune_in_channels(self, layer: MappedShortcut, idxs) -> MappedShortcut:
        removed = set(int(i) for i in idxs)
        new_index = torch.full((layer.in_channels,), -1, dtype=torch.long)
        kept = [i for i in range(layer.in_channels) if i not in removed]
        new_index[kept] = torch.arange(len(kept))
        layer.source = torch.where(layer.source >= 0, new_index[layer.source.clamp(min=0)], -1)
        layer.in_channels = len(kept)
        return layer

    def get_out_channels(self, layer: MappedShortcut) -> int:
        return len(layer.source)

    def get_in_channels(self, layer: MappedShortcut) -> int:
        return layer.in_channels


def map_shortcuts(model: nn.Module) -> nn.Module:
    """Replace every ``PadShortcut`` by the equal ``MappedShortcut`` (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, PadShortcut):
                in_channels = _block_in_channels(module)
                setattr(module, child_name, MappedShortcut.from_pad(child, in_channels))
    return model


def _block_in_channels(block: nn.Module) -> int:
    conv = getattr(block, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise EffmlError(f"a zero-padding shortcut outside a basic block ({type(block).__name__}) cannot be mapped")
    return conv.in_channels


# --------------------------------------------------------------------------- the plan, as data
@dataclass
class Member:
    """One parameter slice of a group: ``channel[i]`` is the group channel that index ``i`` of the
    parameter's dimension ``dim`` belongs to (flatten maps one channel to many features)."""

    module: str  # qualified name in the model
    kind: str  # "out": the layer makes the channel (weight rows, bias, BN); "in": it reads it
    dim: int
    channel: Tensor


@dataclass
class Group:
    name: str  # the first producing layer's name
    size: int  # channels
    members: list[Member] = field(default_factory=list)

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.kind == "out"]


@dataclass
class Link:
    """A ``MappedShortcut``: its output channel o carries input channel ``source[o]`` (-1: zero), and
    its outputs and inputs are channels of two groups. A channel on its output side is zero only when
    its source channel is removed too, so keeping the source keeps the channel (``ChannelPlan.close``)."""

    module: str
    source: Tensor
    out_group: str = ""
    out_channel: Tensor | None = None  # shortcut output o → channel of out_group
    in_group: str = ""
    in_channel: Tensor | None = None  # shortcut input i → channel of in_group


@dataclass
class ChannelPlan:
    groups: list[Group]
    links: list[Link] = field(default_factory=list)

    def __getitem__(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def widths(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    def close(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``keep`` (group → bool per channel; a group left out keeps all) with every channel kept whose
        shortcut source is kept: only then is a removed channel exactly zero in the masked model."""
        keep = {g.name: keep[g.name].bool().clone() if g.name in keep else torch.ones(g.size, dtype=torch.bool)
                for g in self.groups}
        changed = True
        while changed:  # shortcuts chain (stage 1 → 2 → 3): until nothing changes
            changed = False
            for link in self.links:
                has_source = link.source >= 0
                source_kept = torch.zeros_like(has_source)
                source_kept[has_source] = keep[link.in_group][link.in_channel[link.source[has_source]]]
                targets = link.out_channel[source_kept]
                if not keep[link.out_group][targets].all():
                    keep[link.out_group][targets] = True
                    changed = True
        return keep


def _unwrap(model: nn.Module) -> nn.Module:
    """A copy without ``torch.nn.utils.prune`` reparametrization (``weight`` a Parameter again, with
    the masked values): DepGraph prunes ``module.weight``."""
    for module in model.modules():
        for param in ("weight", "bias"):
            if hasattr(module, f"{param}_orig"):
                # the cached product is a graph node, which deepcopy refuses; the next forward's
                # pre-hook recomputes it anyway, so its detached value changes nothing
                setattr(module, param, getattr(module, param).detach())
    model = copy.deepcopy(model)
    for module in model.modules():
        for param in ("weight", "bias"):
            if hasattr(module, f"{param}_orig"):
                torch.nn.utils.prune.remove(module, param)
    return model


def _graph(model: nn.Module, inputs: Mapping[str, Tensor]) -> tp.DependencyGraph:
    shortcuts = [m for m in model.modules() if isinstance(m, MappedShortcut)]
    for s in shortcuts:
        s.tracing = True
    try:
        with torch.enable_grad():  # DepGraph traces autograd's graph, also when called under no_grad
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=dict(inputs), customized_pruners={MappedShortcut: MappedShortcutPruner()},
                forward_fn=lambda m, x: m(**x))
    finally:
        for s in shortcuts:
            s.tracing = False


def _output_layers(model: nn.Module, output_layer: str) -> list[nn.Module]:
    from effml.compressors._masks import matches

    return [m for n, m in model.named_modules() if isinstance(m, PRODUCERS) and matches(n, [output_layer])]


def _dim(module: nn.Module, out: bool) -> int:
    if isinstance(module, NORMS):
        return 0
    if isinstance(module, PRODUCERS):
        return 0 if out else 1
    return -1  # no parameters (shortcut maps, element-wise ops)


def channel_plan(model: nn.Module, inputs: Mapping[str, Tensor], output_layer: str = "classifier") -> ChannelPlan:
    """Every group of coupled channels of ``model`` whose channels may be removed (the output layer's
    outputs are the classes: never), traced by DepGraph on a copy; ``inputs`` as the model's forward
    takes them. A model without conv or linear layers outside the output layer is one line."""
    clean = map_shortcuts(_unwrap(model).eval())
    names = {m: n for n, m in clean.named_modules()}
    graph = _graph(clean, inputs)
    groups, links = [], {}
    for group in graph.get_all_groups(ignored_layers=_output_layers(clean, output_layer), root_module_types=PRODUCERS):
        root = group[0].dep.target.module
        members = []
        for item in group:
            module = item.dep.target.module
            out = graph.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(module, MappedShortcut):
                _link(links, names[module], module, out, names[root], item)
            dim = _dim(module, out)
            if dim < 0:
                continue
            channel = torch.empty(_extent(module, dim), dtype=torch.long)
            channel[torch.tensor(item.idxs, dtype=torch.long)] = torch.tensor(item.root_idxs, dtype=torch.long)
            members.append(Member(names[module], "out" if out or isinstance(module, NORMS) else "in", dim, channel))
        groups.append(Group(names[root], graph.get_pruner_of_module(root).get_out_channels(root), members))
    if not groups:
        raise EffmlError(f"{type(model).__name__} has no conv or linear layer outside the output layer "
                         f"({output_layer}) whose channels could be removed")
    return ChannelPlan(groups, list(links.values()))


def _link(links: dict[str, Link], name: str, shortcut: MappedShortcut, out: bool, group: str, item) -> None:
    link = links.setdefault(name, Link(name, shortcut.source.clone()))
    extent = len(shortcut.source) if out else shortcut.in_channels
    channel = torch.full((extent,), -1, dtype=torch.long)
    channel[torch.tensor(item.idxs, dtype=torch.long)] = torch.tensor(item.root_idxs, dtype=torch.long)
    if out:
        link.out_group, link.out_channel = group, channel
    else:
        link.in_group, link.in_channel = group, channel


def _extent(module: nn.Module, dim: int) -> int:
    return module.weight.shape[dim] if module.weight is not None else module.num_features


# --------------------------------------------------------------------------- masks and zeroing
@torch.no_grad()
def load_masks(modules: Mapping[str, nn.Module], masks: Mapping[tuple[str, str], Tensor]) -> None:
    """Copy ``slice_masks`` into the prune masks of ``modules`` (all ones where none is given) and
    refresh their masked parameters at once."""
    for name, module in modules.items():
        for param in ("weight", "bias"):
            mask = getattr(module, f"{param}_mask", None)
            if mask is not None:
                mask.copy_(masks.get((name, param), torch.ones_like(mask)))
                setattr(module, param, getattr(module, f"{param}_orig") * mask)


def slice_masks(plan: ChannelPlan, keep: Mapping[str, Tensor], model: nn.Module) -> dict[tuple[str, str], Tensor]:
    """{(module, parameter): 0/1 mask}: the slices of removed channels (``keep[group]`` False) zero,
    for every parameter of every group member (weights, biases, BN affine parameters)."""
    modules = dict(model.named_modules())
    keep = plan.close(keep)
    masks: dict[tuple[str, str], Tensor] = {}
    for group in plan.groups:
        gone = ~keep[group.name].bool()
        for member in group.members:
            module = modules[member.module]
            params = ("weight", "bias") if member.kind == "out" else ("weight",)
            for param in params:
                value = _param(module, param)
                if value is None or value.dim() <= member.dim:
                    continue
                mask = masks.setdefault((member.module, param), torch.ones_like(value))
                shape = [1] * value.dim()
                shape[member.dim] = -1
                mask.mul_((~gone[member.channel]).to(value.dtype).view(shape))
    return masks


def _param(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, f"{name}_orig", None)
    return value if value is not None else getattr(module, name, None)


@torch.no_grad()
def zero_channels(model: nn.Module, plan: ChannelPlan, keep: Mapping[str, Tensor]) -> nn.Module:
    """Set the removed channels' parameter slices to zero, in place (the masked model)."""
    modules = dict(model.named_modules())
    for (name, param), mask in slice_masks(plan, keep, model).items():
        _param(modules[name], param).mul_(mask)
    return model


# --------------------------------------------------------------------------- the cut
def rounded_keep(plan: ChannelPlan, keep: Mapping[str, Tensor], multiple: int,
                 scores: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Each group's kept channels (closed over shortcuts, ``ChannelPlan.close``), their count rounded up
    to ``multiple`` (at most the group's width): the removed channels of highest score (default:
    lowest index) come back. Rounding and closing alternate until neither adds a channel."""
    keep = plan.close(keep)
    while True:
        rounded = {g.name: _round(keep[g.name], g.size, multiple, (scores or {}).get(g.name)) for g in plan.groups}
        closed = plan.close(rounded)
        if all(torch.equal(closed[n], keep[n]) for n in keep):
            return closed
        keep = closed


def _round(kept: Tensor, size: int, multiple: int, score: Tensor | None) -> Tensor:
    kept = kept.clone()
    target = round_up(int(kept.sum()), multiple, 1, size)
    if target > int(kept.sum()):
        score = -torch.arange(size, dtype=torch.float) if score is None else score.float()
        kept[torch.where(kept, -torch.inf, score).topk(target - int(kept.sum())).indices] = True
    return kept


def remove_channels(model: nn.Module, inputs: Mapping[str, Tensor], keep: Mapping[str, Tensor], multiple: int = 1,
                    scores: Mapping[str, Tensor] | None = None, output_layer: str = "classifier",
                    plan: ChannelPlan | None = None) -> tuple[nn.Module, dict[str, dict[str, int]]]:
    """The model with every group's removed channels cut out (a new module; ``model`` is untouched),
    widths rounded up to ``multiple``; and {group: {"before", "kept", "after"}} widths."""
    plan = plan or channel_plan(model, inputs, output_layer)
    unknown = set(keep) - set(plan.widths())
    if unknown:
        raise EffmlError(f"no channel group named {sorted(unknown)[0]}; groups: {', '.join(plan.widths())}")
    rounded = rounded_keep(plan, keep, multiple, scores)
    shrunk = map_shortcuts(_unwrap(model))
    modules = dict(shrunk.named_modules())
    graph = _graph(shrunk, inputs)
    for group in plan.groups:
        removed = torch.where(~rounded[group.name])[0].tolist()
        if removed:
            root = modules[group.name]
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, removed).prune()
    closed = plan.close(keep)
    widths = {g.name: {"before": g.size, "kept": int(closed[g.name].sum()), "after": int(rounded[g.name].sum())}
              for g in plan.groups}
    return shrunk, widths
