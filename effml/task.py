"""The LightningModule every run trains: classification with the compressors' extra losses.

A Lightning callback cannot change the loss, so the task asks each compressor for its term
(``Compressor.loss``) and adds it, after scaling its own cross-entropy by the compressors'
``hard_loss_weight`` (docs/ARCHITECTURE.md §3).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from effml.config import TrainerConfig
from effml.errors import EffmlError


def split_batch(batch: dict) -> tuple[dict, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


class ClassificationTask(L.LightningModule):
    def __init__(self, model: nn.Module, cfg: TrainerConfig, compressors=()):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.compressors = list(compressors)  # callbacks, not submodules: their state travels via Lightning
        self.lr_scale = 1.0  # set per stage by the runner (Stage.lr_scale)
        self.stage_label = "train"  # set per stage by the runner, for messages

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs)

    def _step(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = split_batch(batch)
        logits = self(**inputs)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing if split == "train" else 0.0)
        acc = (logits.argmax(-1) == labels).float().mean()
        size = labels.shape[0]
        self.log(f"{split}/loss", loss, batch_size=size, prog_bar=split != "train", on_epoch=True, on_step=False)
        self.log(f"{split}/acc", acc, batch_size=size, prog_bar=True, on_epoch=True, on_step=False)
        return loss, logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logits = self._step(batch, "train")
        loss = loss * math.prod(c.hard_loss_weight for c in self.compressors)
        for compressor in self.compressors:
            extra = compressor.loss(self, batch, logits)
            if extra is not None:
                self.log(f"train/loss_{compressor.name}", extra, batch_size=logits.shape[0])
                loss = loss + extra
        if not torch.isfinite(loss):  # a NaN never heals: stop now, and the stage is not recorded as finished
            raise EffmlError(f"stage {self.stage_label}: the training loss became {float(loss)} at step "
                             f"{self.global_step}; lower trainer.lr (or the method's loss weights) and rerun")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg, lr = self.cfg, self.cfg.lr * self.lr_scale
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "constant" and cfg.warmup_fraction == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lr_factor(cfg: TrainerConfig, total_steps: int):
    """Linear warmup over ``warmup_fraction`` of the steps, then constant, cosine or linear decay."""
    warmup = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor
