"""Random-LTD (compressors/random_ltd.py): the dropped tokens come back in their places, the kept ones
see their own positions in causal order, the full length is the unmodified model exactly, and the
schedule and its bookkeeping are what the paper describes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import one_line_error, smoke_args
from effml.compressors._token_schedule import ramp_length
from effml.compressors.random_ltd import (
    RandomLTD,
    RandomLTDConfig,
    drop_inputs,
    gather_mask,
    keep_indices,
    scatter_tokens,
)
from effml.errors import EffmlError


def tiny_lm(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    from effml.models.causal_lm import CausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=64, use_cache=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return CausalLM(LlamaForCausalLM(config).train())


def attached(model, start: int, full: int = 16, ramp_steps: int = 10, step_size: int = 4, **fields) -> RandomLTD:
    ltd = RandomLTD(RandomLTDConfig(start=start, step_size=step_size, ramp_steps=ramp_steps, **fields))
    ltd.attach(model)
    ltd.start, ltd.full, ltd.ramp_steps = start, full, ramp_steps
    return ltd


def training_step(ltd: RandomLTD, step: int) -> None:
    """What on_train_batch_start does, without a Trainer."""
    ltd.step, ltd.keep = step, ltd.kept_at(step)


class Recorder(nn.Module):
    """A 'layer' that adds 1000 + its input's position (as seen by it) and remembers what it saw."""

    def forward(self, hidden, position_ids=None, **kwargs):
        self.seen, self.positions = hidden.clone(), position_ids
        return hidden + 1000


def test_dropped_tokens_bypass_the_layer_and_every_token_returns_to_its_place():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 4)
    index = keep_indices(3, 10, 4, torch.Generator().manual_seed(1), hidden.device)
    assert torch.equal(index, index.sort(dim=1).values)  # sorted: the causal order is kept
    assert all(len(set(row.tolist())) == 4 for row in index)
    layer = Recorder()
    args, kwargs = drop_inputs((hidden,), {"position_ids": torch.arange(10)[None]}, index)
    out = scatter_tokens(hidden, layer(*args, **kwargs), index)
    for b in range(3):
        kept = set(index[b].tolist())
        assert torch.equal(layer.seen[b], hidden[b, index[b]])  # the layer saw the kept tokens, in order
        assert torch.equal(layer.positions[b], index[b])  # with their own positions
        for t in range(10):  # exact: kept tokens carry the layer's output, dropped ones their input
            assert torch.equal(out[b, t], hidden[b, t] + 1000 if t in kept else hidden[b, t])


def test_an_attention_mask_is_cut_to_the_kept_queries_and_keys():
    mask = torch.arange(36.0).view(1, 1, 6, 6)
    index = torch.tensor([[0, 2, 5], [1, 3, 4]])
    cut = gather_mask(mask, index)
    assert cut.shape == (2, 1, 3, 3)
    assert torch.equal(cut[1, 0], mask[0, 0][index[1]][:, index[1]])


def test_at_the_full_length_the_model_is_the_unmodified_one_exactly():
    plain, hooked = tiny_lm(), tiny_lm()
    ltd = attached(hooked, start=16)  # start = full: nothing to drop at any step
    ids = torch.randint(0, 50, (2, 16))
    training_step(ltd, 0)
    assert torch.equal(hooked(ids), plain(ids))
    # the gather/scatter path itself, forced with every index kept, changes nothing either
    layer = plain.blocks()[1]
    hidden = torch.randn(2, 16, 32)
    cos_sin = plain.lm.model.rotary_emb(hidden, position_ids=torch.arange(16)[None])
    kwargs = {"position_embeddings": cos_sin, "position_ids": torch.arange(16)[None], "attention_mask": None}
    index = torch.arange(16).expand(2, 16)
    args, dropped = drop_inputs((hidden,), kwargs, index)
    assert torch.equal(scatter_tokens(hidden, layer(*args, **dropped), index), layer(hidden, **kwargs))


def test_a_dropped_layer_runs_the_kept_tokens_at_their_own_rotary_positions():
    model = tiny_lm()
    ltd = attached(model, start=8)
    layer, rotary = model.blocks()[1], model.lm.model.rotary_emb
    hidden = torch.randn(2, 16, 32)
    full = rotary(hidden, position_ids=torch.arange(16)[None])
    training_step(ltd, 0)
    out = layer(hidden, position_embeddings=full, position_ids=torch.arange(16)[None], attention_mask=None)
    index = ltd.draw(1, hidden, True)  # the same draw: seeded by (seed, stage, step, layer)
    dropped = torch.ones(2, 16, dtype=torch.bool)
    dropped[torch.arange(2)[:, None], index] = False
    assert torch.equal(out[dropped], hidden[dropped])  # bypassed exactly
    for b in range(2):  # each kept token: the layer on the kept tokens alone, at their true positions
        alone = layer.__class__.forward(layer, hidden[b:b + 1, index[b]],
                                        position_embeddings=rotary(hidden, position_ids=index[b][None]),
                                        attention_mask=None)
        torch.testing.assert_close(out[b, index[b]], alone[0], rtol=1e-5, atol=1e-6)
    model.eval()  # evaluation sees every token, even inside a training step's schedule
    assert torch.equal(layer(hidden, position_embeddings=full, attention_mask=None),
                       layer.__class__.forward(layer, hidden, position_embeddings=full, attention_mask=None))


def test_the_kept_count_grows_linearly_in_steps_and_the_layer_tokens_are_counted():
    assert [ramp_length(t, 8, 64, 160, 8) for t in (0, 22, 23, 80, 159, 160, 500)] == [8, 8, 16, 32, 56, 64, 64]
    values = [ramp_length(t, 8, 64, 160, 8) for t in range(200)]
    assert values == sorted(values) and all(v % 8 == 0 for v in values)
    model = tiny_lm(layers=4)
    ltd = attached(model, start=4, full=16, ramp_steps=10, step_size=4)
    assert ltd.dropped == [1, 2]  # the first and the last layer see every token
    ids = torch.randint(0, 50, (2, 16))
    for step in range(12):
        training_step(ltd, step)
        model(ids)
    kept = [ltd.kept_at(t) for t in range(12)]
    assert kept[0] == 4 and kept[-1] == 16
    assert ltd.baseline == 12 * 4 * 2 * 16
    assert ltd.consumed == sum(2 * (2 * 16 + 2 * k) for k in kept)
    assert ltd.report()["layer_tokens_saved_pct"] == pytest.approx(100 * (1 - ltd.consumed / ltd.baseline), abs=1e-3)
    ltd.keep = None  # outside a training step (validation): every token, nothing counted
    before = ltd.consumed
    model(ids)
    assert ltd.consumed == before
    ltd.finalize(model, None)
    assert not any(block._forward_pre_hooks or block._forward_hooks for block in model.blocks())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compressor.ramp_steps=100"], "compressor.ramp_steps (100) is longer than the run (8 training steps)"),
        (["compressor.start=64"], "compressor.start (64) is longer than the sequence (32 tokens"),
        (["compressor.layers=null"], "has no middle layer"),
    ],
)
def test_bad_schedules_are_one_line(effml, tmp_path, overrides, message):
    code, _, err = effml("train", "trainer.max_epochs=2", *smoke_args("lm", ["random_ltd"]), *overrides)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


def test_bad_fields_are_refused_by_the_config():
    with pytest.raises(EffmlError, match="compressor.step_size must be >= 1, got 0"):
        RandomLTDConfig(step_size=0)
    with pytest.raises(EffmlError, match="compressor.layers must be distinct layer indices"):
        RandomLTDConfig(layers=[1, 1])
