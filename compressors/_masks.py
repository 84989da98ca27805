"""Masks on weights, shared by every unstructured method (magnitude, imp, nm_sparsity, bert_lottery's
M-pruning) and the layer selection that quantization reuses.

A mask is ``torch.nn.utils.prune`` reparametrization: the masks travel in the model's state_dict
(``weight_orig``, ``weight_mask``), i.e. in every checkpoint, and ``make_permanent`` folds them into
the weights. Two ways to apply them:

- **hook** (``prune.identity``): ``weight = weight_orig * weight_mask`` recomputed in a forward-pre
  hook on every forward. Pruned entries of ``weight_orig`` keep their values, so a mask that grows
  back (movement pruning, SLTH's refill ranking) finds them. It costs a product per layer in the
  forward and one in the backward: +13% of a BERT-base train step on an H200
  (``benchmarks/results/mask_overhead_nvidia_h200.md``), as much as Lightning's ``ModelPruning``.
- **in place** (:func:`mask_in_place`), for masks that only shrink (magnitude, IMP): ``weight`` *is*
  ``weight_orig``, whose pruned entries are zeros; :func:`reapply_masks` re-zeroes them after each
  optimizer step (one ``torch._foreach_mul_`` for all layers) and the forward runs on the parameter
  as it is. The unpruned weights follow the same values as with the hook: their gradients do not
  depend on the pruned entries, which are zero either way. Only gradient-norm clipping sees the
  pruned entries' gradients, so under clipping :func:`mask_gradients` zeroes those first.
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


def mask_in_place(module: nn.Module) -> None:
    """Give ``module`` the names of prune's reparametrization (``weight_orig``, ``weight_mask``), so
    checkpoints keep their keys, but no hook: ``module.weight`` is the parameter ``weight_orig``."""
    weight = module._parameters.pop("weight")
    module.register_parameter("weight_orig", weight)
    module.register_buffer("weight_mask", torch.ones_like(weight))
    object.__setattr__(module, "weight", weight)  # an alias in __dict__, not a second parameter


def in_place(module: nn.Module) -> bool:
    weight = module.__dict__.get("weight")
    return weight is not None and weight is module._parameters.get("weight_orig")


def _unmask_in_place(module: nn.Module) -> None:
    weight = module._parameters.pop("weight_orig")
    del module._buffers["weight_mask"], module.__dict__["weight"]
    module.register_parameter("weight", weight)  # its masked entries are zeros already


def mask_layers(model: nn.Module, layer_types: list[str], skip: list[str], method: str,
                in_place_masks: bool = False) -> dict[str, nn.Module]:
    """Give every targeted layer an all-ones ``weight_mask``, applied by a hook or in place (module
    docstring).

    Done before any checkpoint is loaded, so the model's keys (``weight_orig``, ``weight_mask``)
    match a resumed run's from the start."""
    types = tuple(LAYER_TYPES[t] for t in layer_types)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and not matches(name, skip):
            if in_place_masks:
                mask_in_place(module)
            else:
                prune.identity(module, "weight")
            layers[name] = module
    if not layers:
        raise EffmlError(f"compressor {method} found no {layer_types} layers outside {skip}")
    return layers


@torch.no_grad()
def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    module.weight_mask.copy_(mask)
    _apply_mask(module)


@torch.no_grad()
def _apply_mask(module: nn.Module) -> None:
    if in_place(module):
        module.weight_orig.mul_(module.weight_mask)
    else:
        module.weight = module.weight_orig * module.weight_mask  # refresh the hook's cached product now


@torch.no_grad()
def reapply_masks(layers: dict[str, nn.Module]) -> None:
    """Zero the masked entries of in-place masked layers again, after an optimizer step moved them."""
    modules = [m for m in layers.values() if hasattr(m, "weight_mask") and in_place(m)]
    if modules:
        torch._foreach_mul_([m.weight_orig for m in modules], [m.weight_mask for m in modules])


@torch.no_grad()
def mask_gradients(layers: dict[str, nn.Module]) -> None:
    """Zero the masked entries' gradients of in-place masked layers (what the hook's product does),
    so that gradient-norm clipping measures the same norm."""
    pairs = [(m.weight_orig.grad, m.weight_mask) for m in layers.values()
             if hasattr(m, "weight_mask") and in_place(m) and m.weight_orig.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [mask.to(g.dtype) for g, mask in pairs])


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
            _apply_mask(module)


def make_permanent(layers: dict[str, nn.Module]) -> None:
    for module in layers.values():
        if in_place(module):
            _unmask_in_place(module)
        elif prune.is_pruned(module):
            prune.remove(module, "weight")
