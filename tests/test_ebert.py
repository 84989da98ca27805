"""EBERT (Liu et al., Findings of ACL 2021): the predictors and their gates, the FLOPs loss, the two
phases, the skipping inference (equal to the masked model, fewer FLOPs), end to end, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.ebert import (
    EBERT,
    EBERTConfig,
    SkippingBert,
    flops_ratio,
    gumbel_gate,
    mask_statistics,
)
from effml.data import DataInfo
from effml.errors import EffmlError
from effml.measure import count_flops
from effml.models.bert import BertClassifier, BertClassifierConfig

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def tiny_bert(seed: int = 0) -> BertClassifier:
    torch.manual_seed(seed)
    return BertClassifier.from_config(BertClassifierConfig(pretrained=None, hf_config=SMALL), DataInfo(2, "text"))


def inputs(batch: int = 6, tokens: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(1000, 5000, (batch, tokens), generator=generator),
         "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}
    x["attention_mask"][1, 6:] = 0  # padded samples must give the same logits both ways
    x["attention_mask"][3, 3:] = 0
    return x


def attached(**fields) -> tuple[EBERT, BertClassifier]:
    ebert = EBERT(EBERTConfig(**fields))
    model = ebert.attach(tiny_bert())
    with torch.no_grad():  # input-dependent masks: spread the gate logits around 0
        for predictor in [*ebert.predictors.heads, *ebert.predictors.ffn]:
            predictor.fc2.weight.normal_(0, 2.0)
    return ebert, model.eval()


def test_the_skipping_model_gives_the_masked_model_s_logits_with_fewer_flops():
    ebert, model = attached(gate_init=0.0)
    with torch.no_grad():
        ebert.predictors.heads[1].fc2.bias.fill_(-100.0)  # layer 1 loses every head: its empty path runs too
        x = inputs()
        masked = model(**x)
        heads, channels = ebert.masks[0]
        assert 0 < heads.mean() < 1 and 0 < channels.mean() < 1  # some kept, some dropped
        assert not torch.equal(heads[0], heads[2]) or not torch.equal(channels[0], channels[2])  # per input
        assert ebert.masks[1][0].sum() == 0
        dense_flops = count_flops(model, x)["total"]
        for handle in ebert.handles:
            handle.remove()
        unmasked = model(**x)
        skipping = SkippingBert(model).eval()
        skipped = skipping(**x)
    assert torch.allclose(skipped, masked, atol=1e-6), (skipped - masked).abs().max()
    # the masks do change the function (a random classifier's logits are small: ~0.02)
    assert (unmasked - masked).abs().max() > 1e-4
    assert [torch.equal(a, b.bool()) for (a, _), (b, _) in zip(skipping.last_masks, ebert.masks, strict=True)]
    # the gathered matrices really are smaller: counted FLOPs (predictors included) below dense
    assert count_flops(skipping, x)["total"] < 0.8 * dense_flops


def test_gumbel_gate_is_hard_with_a_straight_through_gradient_and_replays_its_noise():
    logits = torch.tensor([[-8.0, 0.0, 8.0] * 100], requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    gates = gumbel_gate(logits, 1.0, generator)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    assert gates[0, 2::3].mean() > 0.95 and gates[0, 0::3].mean() < 0.05  # σ(±8): almost always on / off
    assert 0.3 < gates[0, 1::3].mean() < 0.7  # σ(0): a coin
    gates.sum().backward()
    assert (logits.grad > 0).all()  # the soft value's gradient
    generator.set_state(state)  # a resumed run replays the same noise
    assert torch.equal(gumbel_gate(logits.detach(), 1.0, generator), gates.detach())


def test_flops_ratio_counts_heads_with_their_attention_and_channels():
    ebert, model = attached()
    layers = ebert.layers
    full = [(torch.ones(1, 4), torch.ones(1, 64)) for _ in layers]
    none = [(torch.zeros(1, 4), torch.zeros(1, 64)) for _ in layers]
    assert flops_ratio(layers, full, 10).item() == 1.0 and flops_ratio(layers, none, 10).item() == 0.0
    half_heads = [(torch.tensor([[1.0, 1, 0, 0]]), torch.ones(1, 64)) for _ in layers]
    # per layer, tokens T=10, hidden 32, head size 8: a head is 2·T·32·8·4 + 4·T²·8 FLOPs, a channel 4·T·32
    head, channel = 2 * 10 * 32 * 8 * 4 + 4 * 100 * 8, 4 * 10 * 32
    expected = (2 * head + 64 * channel) / (4 * head + 64 * channel)
    assert flops_ratio(layers, half_heads, 10).item() == pytest.approx(expected)


def test_joint_training_pulls_the_flops_towards_the_target_then_phase_two_freezes():
    ebert = EBERT(EBERTConfig(gate_init=3.0, target_flops_ratio=0.5, flops_weight=10.0))
    model = ebert.attach(tiny_bert()).train()  # gates start at σ(3): nearly dense
    task = SimpleNamespace(training=True)
    optimizer = torch.optim.Adam(ebert.predictors.parameters(), lr=0.05)
    x = inputs(16)
    ratios = []
    for _ in range(40):  # the FLOPs and sparsity losses alone move the predictors
        model(**x)
        loss = ebert.loss(task, x, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ratios.append(float(ebert.last_train_ratio))
    assert ratios[0] > 0.85 and abs(sum(ratios[-5:]) / 5 - 0.5) < 0.15, ratios
    # counted on the masks inference uses: the eval model keeps about the target too
    model.eval()
    with torch.no_grad():
        model(**x)
    assert abs(flops_ratio(ebert.layers, ebert.masks, ebert.tokens).mean().item() - 0.5) < 0.15
    model.train()
    # phase 2: from the switch step on, the predictors are frozen, in eval mode, and add no loss
    ebert.mine, ebert.switch_step = True, 10
    ebert.on_train_batch_start(SimpleNamespace(global_step=10), None, None, 0)
    assert ebert.frozen and not ebert.predictors.training
    assert not any(p.requires_grad for p in ebert.predictors.parameters())
    model(**x)
    assert ebert.loss(task, x, None) is None
    restored = EBERT(EBERTConfig())
    restored.attach(tiny_bert())
    restored.load_state_dict(ebert.state_dict())
    assert restored.frozen and restored.switch_step == 10
    assert torch.equal(restored.generator.get_state(), ebert.generator.get_state())


def test_mask_statistics_split_units_into_always_on_off_and_input_dependent():
    stats = mask_statistics([torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.tensor([0.25, 0.0, 1.0, 1.0])])
    assert (stats["always_on"], stats["always_off"], stats["input_dependent"]) == (0.5, 0.25, 0.25)
    assert stats["kept_per_layer"] == [0.625, 0.5625]


@pytest.mark.parametrize("field, value", [("target_flops_ratio", 0.0), ("target_flops_ratio", 1.5),
                                          ("target_flops_ratio", -0.2), ("joint_fraction", 0.0),
                                          ("predictor_width", 0), ("tau", 0.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        EBERTConfig(**{field: value})


@pytest.mark.parametrize("args, message", [
    (["compressor.target_flops_ratio=1.2"], "compressor.target_flops_ratio must be in (0, 1]"),
    (["compressor.target_flops_ratio=0"], "compressor.target_flops_ratio must be in (0, 1]"),
    (["model=lenet_300_100", "data=digits"], "compressor ebert needs a BERT encoder"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(effml, tmp_path, args, message):
    code, _, err = effml("train", "recipe=ebert_minilm", *args)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_a_smoke_run_reports_realised_flops_mask_statistics_and_latency(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["ebert"]), "measure.train_step=false")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    r = m["compressors"]["ebert"]
    assert r["skip_max_abs_diff"] < 1e-4
    assert r["joint_steps"] == 2 and r["predictors_frozen"]  # 2 epochs of 2 steps: half of them joint
    for kind in ("heads", "ffn"):
        s = r["masks"][kind]
        assert s["always_on"] + s["always_off"] + s["input_dependent"] == pytest.approx(1.0, abs=1e-3)
    assert 0 < r["flops_ratio_encoder"] <= 1 and r["flops_ratio"] > 0
    for size in (1, 32):
        latency = r["latency"][f"batch_{size}"]
        assert latency["dense_ms"] > 0 and latency["ebert_ms"] > 0 and latency["static_ms"] > 0
    assert EBERT.effect("ebert", m) is None


@pytest.mark.parametrize("other, why", [("ptq", "quantizes the weights"),
                                        ("attention", "replaces the attention function of every layer"),
                                        ("earlybert", "removes heads and neurons physically")])
def test_methods_whose_layers_the_skipping_path_cannot_read_are_refused_in_one_line(effml, tmp_path, other, why):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["ebert", other]))
    one_line_error(code, err, f"compressors ebert and {other} cannot compose: ebert ")
    assert why in err
    assert not (tmp_path / "outputs").exists()
