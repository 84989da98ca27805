"""Helpers shared by the model families (private: not a plug-in)."""

from __future__ import annotations

import torch
from torch import nn

from effml.data import DataInfo
from effml.errors import EffmlError


def image_shape(info: DataInfo, model: str) -> tuple[int, int, int]:
    """The (C, H, W) of an image dataset, or a one-line error for text data or a missing shape."""
    if info.modality != "image":
        raise EffmlError(f"model {model} needs image data, got {info.modality} data")
    if info.input_shape is None or len(info.input_shape) != 3:
        raise EffmlError(f"model {model} needs an image input_shape (C, H, W), got {info.input_shape}")
    c, h, w = (int(d) for d in info.input_shape)
    return c, h, w


def check_positive(field: str, value: float) -> None:
    if value <= 0:
        raise EffmlError(f"{field} must be > 0, got {value}")


def check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise EffmlError(f"{field} must be one of {', '.join(map(str, choices))}, got {value}")


def relu_mlp(in_features: int, widths: list[int]) -> tuple[list[nn.Module], int]:
    """``Linear → ReLU`` for each width, in order, and the last width (``in_features`` if none)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return layers, in_features


@torch.no_grad()
def recalibrate(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Re-estimate every BN layer's running statistics on ``batches`` (a cumulative average), then eval
    mode: a subnetwork's activations (sparse_cocktail, metapruning) differ from those the statistics saw."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.track_running_stats]
    if not batches or not norms:
        model.eval()
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for batch in batches:
        model(**batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
