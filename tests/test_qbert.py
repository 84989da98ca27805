"""Q-BERT (Shen et al., AAAI 2020): the Hessian estimates against exact Hessians, the bit allocation
under its budget, group-wise ranges against per-tensor, the compressor on a tiny BERT (sensitivity,
allocation, QAT grids), one run end to end with its stored sensitivity, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import metrics_of, one_line_error
from effml.compressors._quant import Grid, fake_quantize, observe_range, scale_zero_point
from effml.compressors.base import Stage
from effml.compressors.qbert import (
    QBERT,
    SENSITIVITY_FILE,
    QBERTConfig,
    allocate,
    block_hvp,
    hutchinson_trace,
    quantization_error,
    top_eigenvalue,
)
from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models.bert import BertClassifier, BertClassifierConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread, as the runs use


def quadratic(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """loss = ½ xᵀAx + bᵀx with a known symmetric A (its exact Hessian), and the HVP of x."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(-2.0, 10.0, n, dtype=torch.float64)  # top by magnitude: 10, gap to 8.9
    a = q @ torch.diag(eigenvalues) @ q.T
    x = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    loss = 0.5 * x @ a @ x + b @ x
    grads = list(torch.autograd.grad(loss, [x], create_graph=True))
    return a, eigenvalues, [x, grads]


def test_power_iteration_finds_the_top_eigenvalue_of_a_known_quadratic():
    a, eigenvalues, (x, grads) = quadratic(0)
    hvp = block_hvp(grads, [x])
    torch.testing.assert_close(hvp([torch.ones_like(x)])[0], a @ torch.ones_like(x))  # H v exactly
    found = top_eigenvalue(hvp, [x], iterations=500, tolerance=1e-10, generator=torch.Generator().manual_seed(0))
    assert found == pytest.approx(float(eigenvalues.abs().max()), rel=1e-6)
    # a spectrum whose largest magnitude is negative: power iteration returns it with its sign
    _, _, (x2, grads2) = quadratic(1)
    minus = block_hvp([-g for g in grads2], [x2])
    assert top_eigenvalue(minus, [x2], 500, 1e-10, torch.Generator().manual_seed(0)) == pytest.approx(-10.0, rel=1e-6)


def test_hutchinson_trace_is_near_the_exact_trace():
    a, eigenvalues, (x, grads) = quadratic(2)
    estimate = hutchinson_trace(block_hvp(grads, [x]), [x], samples=2000, generator=torch.Generator().manual_seed(0))
    exact = float(torch.trace(a))
    # the estimator's std is sqrt(2 Σ_{i≠j} a_ij² / samples); 4 of them
    std = float((2 * (a.square().sum() - a.diag().square().sum()) / 2000).sqrt())
    assert abs(estimate - exact) < 4 * std
    assert exact == pytest.approx(float(eigenvalues.sum()))


def test_allocation_respects_the_budget_and_gives_more_bits_to_more_sensitive_blocks():
    omega = {"a": 1.0, "b": 50.0, "c": 5.0, "d": 200.0}
    sizes = dict.fromkeys(omega, 100)

    def error(block, bits):  # the same weights everywhere: the error of b bits falls 4x a bit
        return 4.0 ** -bits

    for avg in (2.0, 2.5, 3.0, 4.0, 5.0):
        bits = allocate(omega, sizes, error, [2, 3, 4, 8], avg)
        assert sum(bits[b] * sizes[b] for b in bits) <= avg * sum(sizes.values())
        ranked = sorted(omega, key=omega.get)
        assert [bits[b] for b in ranked] == sorted(bits[b] for b in ranked)  # monotone in Ω
    assert allocate(omega, sizes, error, [2, 3, 4, 8], 2.0) == dict.fromkeys(omega, 2)
    mixed = allocate(omega, sizes, error, [2, 3, 4, 8], 3.0)
    assert mixed["d"] > mixed["a"] and len(set(mixed.values())) > 1  # Ω spans 200x: a mix, not uniform 3
    assert allocate(omega, sizes, error, [2, 3, 4, 8], 8.0) == dict.fromkeys(omega, 8)
    # a big block that does not fit stays low while smaller ones rise
    bits = allocate({"big": 10.0, "small": 1.0}, {"big": 1000, "small": 10}, error, [2, 8], 2.1)
    assert bits == {"big": 2, "small": 8}


def test_group_wise_error_is_below_per_tensor_and_groups_are_runs_of_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-2, 0, 64).unsqueeze(1)  # rows of unequal ranges
    per_tensor = quantization_error(w, Grid(3, groups=1))
    grouped = quantization_error(w, Grid(3, groups=16))
    per_row = quantization_error(w, Grid(3, groups=64))
    assert per_row < grouped < 0.5 * per_tensor
    lo, hi = observe_range(w, "minmax", Grid(3, groups=16))
    assert lo.shape == (64,) and torch.equal(lo[:4], lo[:1].expand(4))  # 4 consecutive rows share a range
    torch.testing.assert_close(hi[:4], w[:4].amax().expand(4))
    q = fake_quantize(w, *scale_zero_point(lo, hi, Grid(3, groups=16)), Grid(3, groups=16))
    for block in q.reshape(16, -1):
        assert len(block.unique()) <= 7  # 3 bits, symmetric: at most 7 levels per group


# -- the compressor on a tiny BERT ---------------------------------------------------------------------
def tiny_bert(seed=0) -> BertClassifier:
    torch.manual_seed(seed)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "vocab_size": 120, "max_position_embeddings": 32}
    return BertClassifier.from_config(BertClassifierConfig(pretrained=None, hf_config=shape), DataInfo(2, "text"))


class Data:
    """Enough of a datamodule for the Hessian phase: training examples and their collate."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(1)
        self.splits = {"train": [{"input_ids": torch.randint(5, 120, (9,), generator=g),
                                  "attention_mask": torch.ones(9, dtype=torch.long),
                                  "labels": torch.tensor(i % 2)} for i in range(n)]}

    def collate(self, examples):
        return torch.utils.data.default_collate(examples)


def compressor(**fields) -> tuple[QBERT, BertClassifier]:
    cfg = QBERTConfig(groups=8, hessian_batches=3, hessian_batch_size=8, power_iterations=30,
                      hutchinson_samples=4, **fields)
    q = QBERT(cfg)
    model = q.attach(tiny_bert())
    q.datamodule = Data()
    return q, model


class Task:
    def __init__(self, model):
        self.model = model


def test_sensitivity_per_layer_is_deterministic_and_drives_the_grids():
    q, model = compressor(avg_bits=3.0)
    assert set(q.blocks) == {"bert.encoder.layer.0", "bert.encoder.layer.1"} and len(q.layers) == 12
    q.begin_stage(Stage("train", owner="qbert", role="plain"), Task(model))
    for block in q.analysis.values():
        assert len(block["eigenvalue"]["values"]) == 3 and len(block["trace"]["values"]) == 3
        assert block["eigenvalue"]["var"] >= 0 and block["weights"] == 4 * 32 * 32 + 2 * 32 * 64
    # the grids follow the allocation; the fake quantization is back on after the fp32 analysis
    for path, layer in q.layers.items():
        assert layer.weight_quantizer.grid.bits == q.bits_for(path) in (2, 3, 4, 8)
        assert layer.input_quantizer is not None
        assert layer.weight_quantizer.grid.groups == 8
    assert q.realised_bits() <= 3.0
    again, model2 = compressor(avg_bits=3.0)
    again.begin_stage(Stage("train", owner="qbert", role="plain"), Task(model2))
    assert again.analysis == q.analysis and again.bits == q.bits  # the same seed, the same numbers
    # resume: a fresh compressor restores the allocation from the state, not by measuring again
    restored, _ = compressor(avg_bits=3.0)
    restored.load_state_dict(q.state_dict())
    assert restored.bits == q.bits
    assert all(restored.layers[p].weight_quantizer.grid.bits == q.bits_for(p) for p in q.layers)


def test_per_linear_granularity_by_trace_has_one_block_per_linear():
    q, model = compressor(granularity="linear", avg_bits=4.0, bit_choices=[2, 4, 8], sensitivity="trace")
    q.begin_stage(Stage("train", owner="qbert", role="plain"), Task(model))
    assert set(q.blocks) == set(q.layers)
    assert set(q.bits.values()) <= {2, 4, 8} and q.realised_bits() <= 4.0
    omega = q.omega()  # the trace's Ω per weight: its mean eigenvalue
    a = q.analysis["bert.encoder.layer.0.output.dense"]
    assert omega["bert.encoder.layer.0.output.dense"] == pytest.approx(
        (abs(a["trace"]["mean"]) + a["trace"]["std"]) / (32 * 64))


def test_non_transformer_model_is_refused():
    with pytest.raises(EffmlError, match="compressor qbert needs a BERT-family transformer"):
        QBERT(QBERTConfig()).attach(nn.Sequential(nn.Linear(4, 4)))


def test_config_is_validated():
    with pytest.raises(EffmlError, match=r"compressor.avg_bits must be >= the smallest of compressor.bit_choices \(2\)"):
        QBERTConfig(avg_bits=1.5)
    with pytest.raises(EffmlError, match="compressor.bit_choices must be in"):
        QBERTConfig(bit_choices=[1, 2])
    with pytest.raises(EffmlError, match="compressor.groups must be >= 1"):
        QBERTConfig(groups=0)
    assert QBERTConfig(bit_choices=[8, 2, 2]).bit_choices == [2, 8]


# -- end to end -------------------------------------------------------------------------------------------
RUN = ["compressor=qbert", "model=minilm_l6", "data=rotten_tomatoes", "data.train_subset=64",
       "data.max_length=24", "data.batch_size=32", "data.eval_batch_size=64", "trainer.limit_train_batches=2",
       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.progress_bar=off",
       "trainer.max_epochs=2", "measure.batch_size=4", "measure.iters=2", "measure.warmup=1",
       "measure.min_time_s=0", "measure.train_step=false", "model.pretrained=null",
       "+model.hf_config.hidden_size=32", "+model.hf_config.num_hidden_layers=2",
       "+model.hf_config.num_attention_heads=4", "+model.hf_config.intermediate_size=64",
       "compressor.hessian_batches=2", "compressor.hessian_batch_size=8", "compressor.power_iterations=5",
       "compressor.hutchinson_samples=2", "compressor.avg_bits=3"]


@pytest.mark.e2e
def test_run_end_to_end_stores_its_sensitivity_once_and_plots_it(effml, tmp_path):
    code, _, err = effml("train", *RUN)
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    report = m["compressors"]["qbert"]
    assert report["avg_bits"] <= 3.0 and set(report["allocation"]) == {"bert.encoder.layer.0", "bert.encoder.layer.1"}
    assert all(b["eigenvalue_var"] >= 0 and b["bits"] in (2, 3, 4, 8) for b in report["blocks"].values())
    assert {layer["bits"] for layer in report["layers"].values()} == set(report["allocation"].values())
    assert sum(report["kernels"].values()) == 12
    run = next((tmp_path / "outputs").rglob("metrics.json")).parent
    assert (run / "qbert_sensitivity.png").stat().st_size > 0
    stored = run / SENSITIVITY_FILE
    analysis = json.loads(stored.read_text())
    assert {b: round(a["eigenvalue"]["mean"], 6) for b, a in analysis.items()} == \
        {b: round(r["eigenvalue_mean"], 6) for b, r in report["blocks"].items()}
    # the weights are on their grids: at most 2^b − 1 levels per group of rows
    weights = torch.load(run / "model.pt", weights_only=True)
    w = weights["bert.encoder.layer.0.attention.self.query.weight"]
    bits = report["allocation"]["bert.encoder.layer.0"]
    assert all(len(group.unique()) <= 2**bits - 1 for group in w.reshape(32, -1))

    # rerun the stage from its start (its end.pt gone): the stored sensitivity is read, not measured
    import shutil

    stored.write_text(json.dumps({b: {**a, "eigenvalue": {**a["eigenvalue"], "mean": 123.0}}
                                  for b, a in analysis.items()}))
    shutil.rmtree(run / "stages/00_train")
    for f in ("metrics.json", "model.pt"):
        (run / f).unlink()
    code, _, err = effml("train", *RUN)
    assert code == 0, err
    assert all(b["eigenvalue_mean"] == 123.0 for b in metrics_of(tmp_path / "outputs")["compressors"]["qbert"]["blocks"].values())


@pytest.mark.e2e
def test_bad_input_is_one_line(effml):
    code, _, err = effml("train", *RUN, "compressor.avg_bits=1.5")
    one_line_error(code, err, "compressor.avg_bits must be >= the smallest of compressor.bit_choices (2)")
    code, _, err = effml("train", *RUN, "compressor.bit_choices=[3,4]", "compressor.avg_bits=2")
    one_line_error(code, err, "compressor.avg_bits must be >= the smallest of compressor.bit_choices (3)")
    code, _, err = effml("train", "recipe=dense_lenet", "compressor=qbert")
    one_line_error(code, err, "compressor qbert needs a BERT-family transformer")
    code, _, err = effml("train", *RUN, "compressor.granularity=head")
    one_line_error(code, err, "compressor.granularity must be one of layer, linear")
    assert not list(__import__("pathlib").Path("outputs").rglob("*"))  # nothing written
