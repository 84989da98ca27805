"""Quantization-aware training (QAT): train through simulated quantization so the weights adapt to it.

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018 (arXiv 1712.05877), §3: the forward pass fake-quantizes every quantized
layer's weight (on its own current range) and input (on a range averaged over the training batches
by an exponential moving average), the backward pass treats the rounding as the identity inside the
range (the straight-through estimator) and 0 where it clamps. Weights are per output channel and
symmetric, as Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference: A
whitepaper" (arXiv 1806.08342) recommends; he reports QAT closing the int8 gap to floating point to
about 1%. The input ranges stop moving after ``freeze_observers_after`` optimizer steps, so the
last steps train against a fixed grid (torch.ao's QAT recipe disables its observers the same way).

``layer_bits`` gives some layers other weight bit widths (``{"*.output.dense": 4}``). Usually QAT
fine-tunes a trained model (``compressor.weights``, e.g. the finished ``bert_finetune`` run); without
one it trains from the model's own initialization (pre-trained weights for BERT). The observed
ranges are buffers of the model, so a killed run resumes them exactly. ``finalize`` snaps the weights
to their grids, removes the fake quantization where the hardware's selector takes the real
``kernel``, and keeps it (frozen) where dense stays faster.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from effml.compressors._quant import ActivationQuantizer, Observer, QuantConfig, Quantizer, wrap
from effml.compressors.base import Smoke, Stage
from effml.errors import EffmlError
from effml.registry import COMPRESSORS


@dataclass
class QATConfig(QuantConfig):
    """Quantization-aware training (Jacob et al. 2018): fake-quantized int8 weights (per channel,
    symmetric) and inputs (EMA min-max ranges, frozen after 1000 steps), straight-through gradients,
    classifier in full precision; torchao int8 dynamic at finalize where the hardware measures it
    faster. Set compressor.weights to fine-tune a finished run."""

    name: str = "qat"
    activation_observer: Observer = Observer.minmax  # each batch's input range
    ema_decay: float = 0.99  # the moving average of the input ranges (Jacob et al.: close to 1)
    freeze_observers_after: int | None = 1000  # optimizer steps; None: the ranges move until the end

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.ema_decay < 1:
            raise EffmlError(f"compressor.ema_decay must be in (0, 1); got {self.ema_decay}")
        if self.freeze_observers_after is not None and self.freeze_observers_after < 1:
            raise EffmlError(f"compressor.freeze_observers_after must be >= 1 step; got {self.freeze_observers_after}")


@COMPRESSORS.register("qat", QATConfig)
class QuantizationAwareTraining(Quantizer):
    """Quantization-aware training (Jacob et al. 2018): fake quantization with a straight-through estimator."""

    smoke = Smoke(("mlp", "vit", "bert"))
    owns = frozenset({"quantization", "training quantization"})

    def stages(self) -> list[Stage]:
        return [Stage("train", owner=self.name, role="plain")]

    def attach(self, model: nn.Module) -> nn.Module:
        super().attach(model)
        self.layers = wrap(model, self.targets, self.quantized)  # before any checkpoint loads: its keys match
        return model

    def input_quantizer(self) -> ActivationQuantizer:
        cfg = self.cfg
        return ActivationQuantizer(self.activation_grid(), cfg.activation_observer, cfg.percentile, cfg.ema_decay)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # A function of the restored step count, so a resumed run freezes where an uninterrupted one does.
        freeze = self.cfg.freeze_observers_after
        self.set_observing(freeze is None or trainer.global_step < freeze)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.set_observing(False)  # validation never moves a range

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        return self.realize(model, hardware)

    def report(self) -> dict:
        updates = [int(q.updates) for q in self.input_quantizers()]
        return {
            **super().report(),
            "freeze_observers_after": self.cfg.freeze_observers_after,
            "observer_updates": max(updates, default=0),  # training batches the input ranges saw
        }
