"""Datasets as LightningDataModules, registered in ``effml.registry.DATASETS``.

Contract every datamodule follows (the runner and the compressors rely on it):
- constructed as ``cls(cfg, seed=run_seed, tokenizer=tokenizer_or_None)``;
- ``info`` (a ``DataInfo``) is known after ``setup()``; ``setup`` is idempotent;
- batches are dicts: ``labels`` plus the model's keyword inputs (``x`` for images,
  ``input_ids``/``attention_mask`` for text), so ``model(**inputs)`` returns logits;
- the train loader is a ``ResumableLoader`` shuffling with ``EpochSeededSampler``: a run resumed at an
  epoch boundary or mid-epoch sees the batches an uninterrupted run sees;
- ``example_inputs(batch_size)`` returns a batch of model inputs (no labels) for measurement, and
  ``example_labels(batch_size)`` labels of that shape for timing a training step;
- ``task`` (class attribute, also in ``info``) names the task the labels are for: ``classification``
  or ``lm``; ``restore_from(run_dir)`` / ``save_to(run_dir)`` keep what a rerun must reuse (a trained
  tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataInfo:
    num_classes: int
    modality: str  # "image" | "text"
    input_shape: tuple[int, ...] | None = None  # (C, H, W) for images
    class_names: list[str] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    task: str = "classification"  # "classification" | "lm" (next-token prediction: num_classes is the vocabulary)
    token_bytes: Any = None  # lm: int64 tensor, bytes of text per token id (bits per byte)
    seq_len: int | None = None  # lm: tokens per block


# The shared building blocks, importable as ``effml.data.X`` (after DataInfo, which they use).
from effml.data._base import DataConfig, EffmlDataModule, EpochSeededSampler, ResumableLoader  # noqa: E402

__all__ = ["DataConfig", "DataInfo", "EffmlDataModule", "EpochSeededSampler", "ResumableLoader"]
