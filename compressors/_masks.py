"""Masks on weights, shared by every unstructured method (magnitude, imp, nm_sparsity, bert_lottery's
M-pruning) and the layer selection that quantization reuses.

A mask is ``torch.nn.utils.prune`` reparametrization (``weight = weight_orig * weight_mask`` on every
forward): pruned weights stay exactly zero through any optimizer step, and the masks travel in the
model's state_dict, i.e. in every checkpoint. ``make_permanent`` folds them into the weights.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn
from torch.nn.utils import prune

from effml.choice import choice
from effml.errors import EffmlError

LAYER_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}
Scope = choice("Scope", "layerwise global")  # a sparsity per layer, or one ranking over all layers


def matches(name: str, patterns: list[str]) -> bool:
    """Does a module's qualified name match one of the patterns (also as the last part of the name)?"""
    return any(fnmatch(name, p) or fnmatch(name, f"*.{p}") for p in patterns)


def mask_layers(model: nn.Module, layer_types: list[str], skip: list[str], method: str) -> dict[str, nn.Module]:
    """Give every targeted layer an all-ones ``weight_mask`` (``torch.nn.utils.prune.identity``).

    Done before any checkpoint is loaded, so the model's keys (``weight_orig``, ``weight_mask``)
    match a resumed run's from the start."""
    types = tuple(LAYER_TYPES[t] for t in layer_types)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and not matches(name, skip):
            prune.identity(module, "weight")
            layers[name] = module
    if not layers:
        raise EffmlError(f"compressor {method} found no {layer_types} layers outside {skip}")
    return layers


@torch.no_grad()
def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    module.weight_mask.copy_(mask)
    module.weight = module.weight_orig * module.weight_mask  # refresh the cached product now


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward uses (weight_orig * weight_mask while masked), never a stale cache."""
    if hasattr(module, "weight_orig"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


@torch.no_grad()
def refresh_masked_weights(model: nn.Module) -> None:
    """Recompute ``weight`` of every masked layer from ``weight_orig * weight_mask``. The prune hook
    does it only at the next forward, so after ``load_state_dict`` the attribute still holds the
    product of the weights before: a one-shot prune of a resumed run ranked the initial weights."""
    for module in model.modules():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            module.weight = module.weight_orig * module.weight_mask


def make_permanent(layers: dict[str, nn.Module]) -> None:
    for module in layers.values():
        if prune.is_pruned(module):
            prune.remove(module, "weight")
