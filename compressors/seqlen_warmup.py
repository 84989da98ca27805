"""Sequence-length warmup: a language model trains on short sequences first, and the length grows
linearly to the full length.

Li, Zhang & He, "The Stability-Efficiency Dilemma: Investigating Sequence Length Warmup for Training GPT
Models", NeurIPS 2022 (arXiv 2108.06084). §3: long sequences early in training go with extreme gradient
variance and loss spikes, above all at large batches and learning rates; §4 (SLW): the training sequence
length starts at ``start`` and grows linearly to the full length over ``warmup_steps``, in multiples of
``step`` (8, for the hardware), then stays full. The paper trains GPT-2 stably at 8x the batch and 4x the
learning rate this way, where the baseline's loss spikes. DeepSpeed implements it as curriculum learning
of type ``seqlen`` (``min_difficulty`` 8 or 64, ``difficulty_step`` 8, ``total_curriculum_step``), the
defaults here.

How the batch shrinks (``mode``), never by padding:
- ``truncate`` (the paper's, DeepSpeed's default): each block keeps its first L tokens (and their next
  tokens as labels), so a warmup step trains on fewer tokens;
- ``reshape`` (DeepSpeed's ``seqlen_reshape``): each block is cut into blocks of L tokens, batch
  ``B * (N // L)``, so a step trains on (nearly) as many tokens at the shorter length. The corpus's
  labels are the next tokens of the same stream, so every cut piece keeps its true targets.

The batch is shortened in ``on_train_batch_start``, before the training step sees it; the length is a
function of the global step alone, so a resumed run continues the schedule exactly. The report gives
the schedule and the tokens trained against the full length. Evaluation always runs at the full length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effml.choice import check_choices, choice
from effml.compressors._token_schedule import (
    check_positive,
    check_start,
    ramp_length,
    resolve_ramp,
    run_steps,
)
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke
from effml.registry import COMPRESSORS

Mode = choice("Mode", "truncate reshape")
DEFAULT_WARMUP_FRACTION = 0.25  # ours: the paper tunes the duration per setting (§5)
SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask")  # what a language-modelling batch holds per token


@dataclass
class SeqLenWarmupConfig(CompressorConfig):
    """Sequence-length warmup (Li, Zhang & He, NeurIPS 2022): training sequences grow linearly from 8
    tokens to the full length, in multiples of 8, over the first quarter of the run, truncated."""

    name: str = "seqlen_warmup"
    start: int = 8  # tokens per sequence at step 0 (DeepSpeed's min_difficulty)
    step: int = 8  # the length is a multiple of this (DeepSpeed's difficulty_step)
    warmup_steps: int | None = None  # steps until the full length; None: a quarter of the training steps
    mode: Mode = Mode.truncate

    def __post_init__(self):
        check_choices(self, "compressor")
        check_positive(self, "start", "step", "warmup_steps")


def shorten(batch: dict, length: int, mode: str) -> None:
    """Cut the batch's per-token tensors to sequences of ``length`` tokens, in place (the training step
    receives this same dict): the first ``length`` tokens, or every whole piece of ``length`` tokens."""
    for key in (k for k in SEQUENCE_KEYS if isinstance(batch.get(k), torch.Tensor)):
        x = batch[key]
        if mode == "truncate":
            batch[key] = x[:, :length]
        else:
            pieces = x.shape[1] // length
            batch[key] = x[:, :pieces * length].reshape(x.shape[0] * pieces, length, *x.shape[2:])


@COMPRESSORS.register("seqlen_warmup", SeqLenWarmupConfig)
class SeqLenWarmup(Compressor):
    """Sequence-length warmup: truncated (or re-chunked) training batches, growing linearly to full length."""

    smoke = Smoke(setups=("lm",), settings=("start=8", "step=8", "warmup_steps=4"))
    owns = frozenset({"training data"})
    tasks = ("lm",)

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        report = metrics["compressors"][name]
        if report["first_length"] != report["start_tokens"] or report["last_length"] != report["full_tokens"]:
            return f"the training length did not grow from start to full: {report}"
        return None

    def __init__(self, cfg: SeqLenWarmupConfig):
        super().__init__(cfg)
        self.full = 0
        self.warmup_steps = 1
        # what training saw (resume: state): tokens trained, as many at the full length, first/last length
        self.tokens = 0
        self.tokens_full = 0
        self.first_length: int | None = None
        self.last_length: int | None = None

    def prepare(self, ctx: RunContext, datamodule: Any) -> None:
        self.full = ctx.data.seq_len
        check_start("start", self.cfg.start, self.full, "training sequences")
        self.warmup_steps = resolve_ramp("warmup_steps", self.cfg.warmup_steps, DEFAULT_WARMUP_FRACTION,
                                         run_steps(ctx, datamodule))

    def length_at(self, step: int) -> int:
        return ramp_length(step, self.cfg.start, self.full, self.warmup_steps, self.cfg.step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        length = self.length_at(trainer.global_step)  # the global step alone: a resume continues exactly
        before = batch["labels"].numel()
        if length < batch["labels"].shape[1]:
            shorten(batch, length, self.cfg.mode)
        self.tokens += batch["labels"].numel()
        self.tokens_full += before
        self.first_length = length if self.first_length is None else self.first_length
        self.last_length = length
        pl_module.log("seqlen_warmup/length", float(length), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "tokens_full": self.tokens_full, "first_length": self.first_length,
                "last_length": self.last_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens, self.tokens_full = int(state["tokens"]), int(state["tokens_full"])
        self.first_length, self.last_length = state["first_length"], state["last_length"]

    def report(self) -> dict[str, Any]:
        saved = 100 * (1 - self.tokens / self.tokens_full) if self.tokens_full else 0.0
        return {
            "start_tokens": self.cfg.start,
            "full_tokens": self.full,
            "step": self.cfg.step,
            "warmup_steps": self.warmup_steps,
            "mode": self.cfg.mode,
            "first_length": self.first_length,
            "last_length": self.last_length,
            "tokens_trained": self.tokens,
            "tokens_full_length": self.tokens_full,
            "tokens_saved_pct": round(saved, 3),
        }
