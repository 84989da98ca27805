"""CIFAR-style ResNet: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, Section 4.2.

A 3x3 conv with 16 filters, then three stages of n basic blocks (two 3x3 convs + BN each) with 16,
32, 64 filters (stride 2 at the start of stages 2 and 3), global average pooling and a linear
classifier: 6n+2 layers. ResNet-20 (n=3) has 0.27M parameters, as in the paper's Table 6.

Shortcuts where the shape changes: option A (the paper's choice on CIFAR, the default) subsamples
and zero-pads the channels and has no parameters; option B uses a strided 1x1 conv + BN projection
(what most pruning code expects, since every channel then belongs to a weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models._common import check_choice, check_positive, image_shape
from effml.registry import MODELS


@dataclass
class ResNetConfig:
    name: str = "resnet"
    depth: int = 20  # 6n+2: 20, 32, 44, 56, 110, ...
    width: int = 16  # filters of the first stage; stages 2 and 3 have 2x and 4x
    shortcut: str = "A"  # "A": zero-padding identity (paper, CIFAR) | "B": 1x1 conv projection

    def __post_init__(self):
        if self.depth < 8 or (self.depth - 2) % 6:
            raise EffmlError(
                f"model.depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {self.depth}"
            )
        check_positive("model.width", self.width)
        check_choice("model.shortcut", self.shortcut, ("A", "B"))


class PadShortcut(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (parameter-free)."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def shortcut(option: str, in_planes: int, planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if option == "A":
        return PadShortcut(stride, planes - in_planes)
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the shortcut, ReLU after the sum (He et al. 2016, Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int, option: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(option, in_planes, planes, stride)
        # Activations are modules (no parameters, so the weights' keys are unchanged) so that methods
        # acting on activations can swap them: AutoReP's ReLU replacement, FATReLU.
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


@MODELS.register("resnet", ResNetConfig)
class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al., CVPR 2016, Section 4.2), BN, option A or B shortcuts."""

    def __init__(self, in_channels: int, depth: int, width: int, option: str, num_classes: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, planes = [], width
        for i, mult in enumerate((1, 2, 4)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(planes, width * mult, stride, option))
                planes = width * mult
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. initialise convolutions with their own "MSRA" scheme (He et al., ICCV 2015).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def from_config(cls, cfg: ResNetConfig, info: DataInfo) -> ResNet:
        channels, _, _ = image_shape(info, f"resnet{cfg.depth}")  # any H, W: pooling is global
        return cls(channels, cfg.depth, cfg.width, cfg.shortcut, info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.pool(x).flatten(1))
