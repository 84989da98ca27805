"""The LightningModules runs train: a task per kind of label, each with the compressors' extra losses.

A Lightning callback cannot change the loss, so the task asks each compressor for its term
(``Compressor.loss``) and adds it, after scaling its own loss by the compressors'
``hard_loss_weight`` (docs/ARCHITECTURE.md §3). Which task a run trains is the dataset's
(``DataInfo.task``, ``TASKS``): ``classification`` (cross-entropy, accuracy) or ``lm`` (next-token
cross-entropy per token, perplexity, bits per byte). A task's ``recorded`` metrics are what stage
records, the final evaluation and tables read, as ``val_<metric>`` and ``test_<metric>``.
"""

from __future__ import annotations

import math
import time
from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from effml.config import TrainerConfig
from effml.errors import EffmlError


def split_batch(batch: dict) -> tuple[dict, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


class Task(L.LightningModule):
    """What every task shares: the compressors' losses, the NaN stop, optimizer and schedule.

    A subclass gives ``metrics(logits, labels, split) -> (loss, {name: (value, weight)})``: each
    value is logged as ``<split>/<name>``, averaged over the epoch with its weight."""

    name: ClassVar[str]
    recorded: ClassVar[tuple[str, ...]]  # the metrics a stage's record keeps (val_<m>, test_<m>)
    progress_bar: ClassVar[tuple[str, ...]] = ()  # the metrics shown while training (never the train loss)

    def __init__(self, model: nn.Module, cfg: TrainerConfig, compressors=()):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.compressors = list(compressors)  # callbacks, not submodules: their state travels via Lightning
        self.lr_scale = 1.0  # set per stage by the runner (Stage.lr_scale)
        self.stage_label = "train"  # set per stage by the runner, for messages

    @classmethod
    def for_data(cls, info, model: nn.Module, cfg: TrainerConfig, compressors=()) -> Task:
        return cls(model, cfg, compressors)

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor, split: str):
        raise NotImplementedError

    def _step(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = split_batch(batch)
        logits = self(**inputs)
        loss, values = self.metrics(logits, labels, split)
        for name, (value, weight) in values.items():
            show = name in self.progress_bar and (name != "loss" or split != "train")
            # sync_dist: under DDP a validation inside a fit (which a compressor may decide on) is
            # the mean over every rank's shard, the same on every rank (a no-op in one process)
            self.log(f"{split}/{name}", value, batch_size=weight, prog_bar=show, on_epoch=True, on_step=False,
                     sync_dist=split != "train")
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

    def record(self, results: dict, split: str) -> dict:
        """``{"<split>_<metric>": value}`` for the recorded metrics, from Lightning's validate/test results."""
        return {f"{split}_{name}": results[f"{split}/{name}"] for name in self.recorded}

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg, lr = self.cfg, self.cfg.lr * self.lr_scale
        fused = {"fused": True} if cfg.fused_optimizer else {}
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **fused)
        else:
            optimizer = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, **fused)
        if cfg.lr_schedule == "constant" and cfg.warmup_fraction == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def move_to_own_group(configured, params: list, lr: float) -> None:
    """Move ``params`` out of the first parameter group of ``configure_optimizers``'s result into a group
    of their own: ``lr``, no weight decay, and the same lr schedule (a LambdaLR's factor) as the rest.
    Movement's scores and EBERT's predictors train so (Sanh et al.'s and Liu et al.'s second group)."""
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    ids = {id(p) for p in params}
    first = optimizer.param_groups[0]
    first["params"] = [p for p in first["params"] if id(p) not in ids]
    optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
    if isinstance(configured, dict):  # a LambdaLR: the same factor for the new group
        schedule = configured["lr_scheduler"]["scheduler"]
        optimizer.param_groups[-1]["initial_lr"] = lr
        schedule.base_lrs.append(lr)
        schedule.lr_lambdas.append(schedule.lr_lambdas[0])
        optimizer.param_groups[-1]["lr"] = lr * schedule.lr_lambdas[0](schedule.last_epoch)


class ClassificationTask(Task):
    """Cross-entropy (with ``label_smoothing`` in training) and accuracy."""

    name = "classification"
    recorded = ("acc",)
    progress_bar = ("loss", "acc")

    def metrics(self, logits, labels, split):
        smoothing = self.cfg.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        size = labels.shape[0]
        return loss, {"loss": (loss, size), "acc": (acc, size)}


class Ratio(torchmetrics.Metric):
    """``transform(numerator / denominator)`` over an epoch, from per-batch sums: perplexity is
    exp(total NLL / tokens), not a mean of per-batch perplexities."""

    full_state_update = False

    def __init__(self, transform):
        super().__init__()
        self.transform = transform
        self.add_state("numerator", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        self.numerator += numerator.detach().double()
        self.denominator += denominator.detach().double()

    def compute(self) -> torch.Tensor:
        return self.transform(self.numerator / self.denominator.clamp(min=1))


class LanguageModelTask(Task):
    """Next-token cross-entropy per token; perplexity exp(loss) and bits per byte
    (total NLL / ln 2 / bytes of text the predicted tokens stand for, ``DataInfo.token_bytes``), which
    compares models across tokenizers. Tokens per second in the progress bar."""

    name = "lm"
    recorded = ("loss", "ppl", "bpb")
    progress_bar = ("loss", "ppl", "tok_s")

    def __init__(self, model: nn.Module, cfg: TrainerConfig, compressors=(), token_bytes: torch.Tensor | None = None):
        super().__init__(model, cfg, compressors)
        self.register_buffer("token_bytes", token_bytes, persistent=False)
        self.ratios = nn.ModuleDict({f"{split}_{name}": Ratio(transform) for split in ("train", "val", "test")
                                     for name, transform in (("ppl", torch.exp), ("bpb", nats_to_bits))})
        self._last_step_at: float | None = None

    @classmethod
    def for_data(cls, info, model: nn.Module, cfg: TrainerConfig, compressors=()) -> Task:
        return cls(model, cfg, compressors, token_bytes=info.token_bytes)

    def metrics(self, logits, labels, split):
        nll = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="sum")
        tokens = torch.tensor(labels.numel(), device=labels.device)
        ppl, bpb = self.ratios[f"{split}_ppl"], self.ratios[f"{split}_bpb"]
        ppl.update(nll, tokens)
        bpb.update(nll, self.token_bytes[labels].sum())
        loss = nll / labels.numel()
        return loss, {"loss": (loss, labels.numel()), "ppl": (ppl, 1), "bpb": (bpb, 1)}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        now = time.perf_counter()  # wall clock between steps (data included): what a user waits for
        if self._last_step_at is not None:
            self.log("train/tok_s", batch["labels"].numel() / (now - self._last_step_at), prog_bar=True,
                     logger=False, on_step=True, on_epoch=False, batch_size=1)  # a time: not in the logs
        self._last_step_at = now
        return super().training_step(batch, batch_idx)

    def on_train_epoch_start(self) -> None:
        self._last_step_at = None


def nats_to_bits(x: torch.Tensor) -> torch.Tensor:
    return x / math.log(2)


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "lm": LanguageModelTask}


def make_task(info, model: nn.Module, cfg: TrainerConfig, compressors=()) -> Task:
    """The task the dataset's labels are for (``DataInfo.task``)."""
    return TASKS[info.task].for_data(info, model, cfg, compressors)


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
