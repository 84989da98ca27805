"""Sequence-length warmup (compressors/seqlen_warmup.py) and the loss spikes every run now counts
(effml/loss_curve.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.seqlen_warmup import SeqLenWarmup, SeqLenWarmupConfig, shorten
from effml.errors import EffmlError
from effml.loss_curve import loss_spikes


def warmup(full: int = 64, **fields) -> SeqLenWarmup:
    slw = SeqLenWarmup(SeqLenWarmupConfig(**fields))
    slw.full, slw.warmup_steps = full, fields.get("warmup_steps") or 1
    return slw


def test_the_length_grows_linearly_from_start_to_full_in_multiples_of_step():
    slw = warmup(start=8, step=8, warmup_steps=50)
    lengths = [slw.length_at(t) for t in range(60)]
    assert lengths[0] == 8 and lengths[50:] == [64] * 10
    assert lengths == sorted(lengths) and all(n % 8 == 0 for n in lengths)
    # linear: 8 + 56 t / 50, floored to a multiple of 8
    assert [slw.length_at(t) for t in (7, 8, 25, 49)] == [8, 16, 32, 56]


def test_truncation_and_reshaping_keep_next_token_labels_and_never_pad():
    stream = torch.arange(2 * 65).view(2, 65)
    batch = {"input_ids": stream[:, :-1].clone(), "labels": stream[:, 1:].clone()}
    cut = dict(batch)
    shorten(cut, 16, "truncate")
    assert cut["input_ids"].shape == (2, 16) and torch.equal(cut["labels"], cut["input_ids"] + 1)
    assert torch.equal(cut["input_ids"], batch["input_ids"][:, :16])
    pieces = dict(batch)
    shorten(pieces, 24, "reshape")  # 64 // 24 = 2 whole pieces per block; the last 16 tokens go
    assert pieces["input_ids"].shape == (4, 24) and torch.equal(pieces["labels"], pieces["input_ids"] + 1)
    assert torch.equal(pieces["input_ids"][1], batch["input_ids"][0, 24:48])


def test_spikes_are_steps_above_1_5x_the_running_minimum():
    assert loss_spikes([7.0, 6.0, 5.0, 4.0]) == (0, 1.0)
    spikes, worst = loss_spikes([7.0, 4.0, 6.1, 5.9, 3.0, 4.4, 4.6])
    assert spikes == 2 and worst == pytest.approx(4.6 / 3.0)  # 6.1 > 1.5 * 4; 4.6 > 1.5 * 3 (the worst)
    assert loss_spikes([5.0, 9.0, 9.0, 9.0])[0] == 3  # a diverged run counts every step it stays up


@pytest.mark.e2e
def test_a_warmup_run_trains_short_then_full_and_records_every_step_s_loss(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("lm", ["seqlen_warmup"]))
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    report = m["compressors"]["seqlen_warmup"]
    assert (report["first_length"], report["last_length"], report["warmup_steps"]) == (8, 32, 4)
    # 8 steps of 16 blocks: lengths 8, 8, 16, 24, then 32 (8 + 24 t / 4, floored to multiples of 8)
    assert report["tokens_trained"] == 16 * (8 + 8 + 16 + 24 + 4 * 32) and report["tokens_full_length"] == 16 * 32 * 8
    stage = m["stages"][0]
    assert len(stage["train_losses"]) == stage["steps"] == 8
    assert m["train_loss_spikes"] == stage["train_loss_spikes"] == loss_spikes(stage["train_losses"])[0]
    record = json.loads(next((tmp_path / "outputs").rglob("record.json")).read_text())
    assert record["train_losses"] == stage["train_losses"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compressor.warmup_steps=9"], "compressor.warmup_steps (9) is longer than the run (8 training steps)"),
        (["compressor.start=33"], "compressor.start (33) is longer than the training sequences (32 tokens"),
    ],
)
def test_bad_schedules_are_one_line(effml, tmp_path, overrides, message):
    code, _, err = effml("train", "trainer.max_epochs=2", *smoke_args("lm", ["seqlen_warmup"]), *overrides)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


def test_bad_fields_are_refused_by_the_config():
    with pytest.raises(EffmlError, match="compressor.start must be >= 1, got 0"):
        SeqLenWarmupConfig(start=0)
    with pytest.raises(EffmlError, match="compressor.mode"):
        SeqLenWarmupConfig(mode="pad")
