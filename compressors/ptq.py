"""Post-training quantization (PTQ): a trained model on an integer grid, without training it again.

The standard PTQ pipeline of Nagel et al., "A White Paper on Neural Network Quantization" (arXiv
2106.08295, §3) and Krishnamoorthi, "Quantizing deep convolutional networks for efficient
inference: A whitepaper" (arXiv 1806.08342): weights per output channel, symmetric, on their own
min-max (or MSE) range; every quantized layer's input per tensor, asymmetric, on a range calibrated
on ``calibration_batches`` training batches (``calibration``: minmax, percentile or mse; the math is
in ``_quant``). The output layer stays in full precision, as is common. Krishnamoorthi reports
per-channel int8 PTQ within 2% of floating point for a wide range of CNNs.

The trained model comes from ``compressor.weights`` (a finished run, e.g. ``source: recipe, recipe:
bert_finetune``; then the run has no training stage at all), or is trained plainly in this run
first. ``finalize`` calibrates, snaps the weights to their grids, and offers each quantized Linear
the ``kernel`` (torchao int8 dynamic by default) through the hardware's measured selection; layers
kept dense stay simulated, so the reported accuracy is the quantized accuracy either way, while the
speed measurement and ``model.pt`` take the deployable model (``Quantizer.deployable``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from effml.compressors._quant import (
    ActivationQuantizer,
    Observer,
    QuantConfig,
    Quantizer,
    quantizable,
    wrap,
)
from effml.compressors.base import Smoke, Stage
from effml.errors import EffmlError
from effml.kernels.select import hardware_device
from effml.registry import COMPRESSORS
from effml.task import split_batch


@dataclass
class PTQConfig(QuantConfig):
    """Post-training quantization (Nagel et al. 2021 §3; Krishnamoorthi 2018): int8 weights per channel
    (symmetric, min-max), int8 inputs per tensor (asymmetric) calibrated on 32 training batches,
    classifier in full precision; torchao int8 dynamic where the hardware measures it faster. Set
    compressor.weights to quantize a finished run."""

    name: str = "ptq"
    calibration: Observer = Observer.minmax  # the range of each layer's input
    calibration_batches: int = 32  # training batches the input ranges are calibrated on

    def __post_init__(self):
        super().__post_init__()
        if self.calibration_batches < 1:
            raise EffmlError(f"compressor.calibration_batches must be >= 1; got {self.calibration_batches}")


@COMPRESSORS.register("ptq", PTQConfig)
class PostTrainingQuantization(Quantizer):
    """Post-training quantization: per-channel weights, inputs calibrated on N batches, real kernels where faster."""

    smoke = Smoke(("mlp", "vit", "bert"))

    def __init__(self, cfg: PTQConfig):
        super().__init__(cfg)
        self.calibrated_batches = 0

    def stages(self) -> list[Stage]:
        if self.cfg.weights.source != "none":
            return []  # an already trained model: nothing to train
        return [Stage("train", owner=self.name, role="plain")]

    def input_quantizer(self) -> ActivationQuantizer:
        return ActivationQuantizer(self.activation_grid(), self.cfg.calibration, self.cfg.percentile)

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        self.targets = quantizable(model, self.cfg.layer_types, self.cfg.skip, self.name)
        self.layers = wrap(model, self.targets, self.quantized)
        self.calibrated_batches = self.calibrate(model, hardware)
        return self.realize(model, hardware)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, hardware) -> int:
        """Observe every quantized layer's input on the first training batches, in eval mode, on the
        hardware's device; returns how many batches there were."""
        if not self.input_quantizers():
            return 0
        device, home, was_training = hardware_device(hardware), next(model.parameters()).device, model.training
        model.eval().to(device)
        self.set_observing(True)
        batches = 0
        for batch in itertools.islice(self.datamodule.train_dataloader(), self.cfg.calibration_batches):
            inputs, _ = split_batch(batch)
            model(**{k: v.to(device) for k, v in inputs.items()})
            batches += 1
        self.set_observing(False)
        model.train(was_training).to(home)
        return batches

    def report(self) -> dict:
        return {**super().report(), "calibration": self.cfg.calibration, "calibration_batches": self.calibrated_batches}
