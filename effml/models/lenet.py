"""LeNet-300-100: the fully connected network of the lottery-ticket MNIST experiments.

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks",
ICLR 2019, Figure 2: fully connected 784 → 300 → 100 → 10 with ReLU (266,610 parameters on MNIST).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from effml.data import DataInfo
from effml.models._common import check_positive, image_shape, relu_mlp
from effml.registry import MODELS


@dataclass
class LeNetConfig:
    name: str = "lenet_300_100"
    hidden: list[int] = field(default_factory=lambda: [300, 100])  # hidden widths; [] = linear model

    def __post_init__(self):
        for width in self.hidden:
            check_positive("model.hidden", width)


@MODELS.register("lenet_300_100", LeNetConfig)
class LeNet(nn.Module):
    """LeNet-300-100 (Frankle & Carbin, ICLR 2019): flatten → 300 → 100 → classes, ReLU."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        layers, out_features = relu_mlp(in_features, hidden)
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.classifier = nn.Linear(out_features, num_classes)

    @classmethod
    def from_config(cls, cfg: LeNetConfig, info: DataInfo) -> LeNet:
        c, h, w = image_shape(info, cfg.name)
        return cls(c * h * w, list(cfg.hidden), info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
