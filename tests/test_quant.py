"""Quantization (ptq, qat): the grid math by hand, observers, resume, accuracy end to end, kernel selection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import one_line_error, train_in
from effml.compressors._quant import (
    ActivationQuantizer,
    FakeQuantized,
    Grid,
    WeightQuantizer,
    fake_quantize,
    observe_range,
    plain_keys_to_wrapped,
    scale_zero_point,
)
from effml.compressors.qat import QuantizationAwareTraining

DIGITS = ["data=digits", "trainer.progress_bar=off", "trainer.limit_val_batches=2", "measure.enabled=false",
          "hardware.kernel_cache=''"]


def quantize(x, observer="minmax", **grid):
    """x fake-quantized on the grid fitted to it by the observer."""
    g = Grid(**grid)
    return fake_quantize(x, *scale_zero_point(*observe_range(x, observer, g), g), g)


# -- the grid, by hand ---------------------------------------------------------------------------
def test_scale_and_zero_point_by_hand():
    lo, hi = torch.tensor(-1.0), torch.tensor(2.0)
    scale, zero = scale_zero_point(lo, hi, Grid(8, symmetric=True))  # [-127, 127], Z = 0
    assert scale.item() == pytest.approx(2 / 127) and zero.item() == 0
    scale, zero = scale_zero_point(lo, hi, Grid(8, symmetric=False))  # [0, 255]: -1 ↦ 0, 0 ↦ Z
    assert scale.item() == pytest.approx(3 / 255) and zero.item() == 85
    scale, zero = scale_zero_point(torch.tensor(1.0), torch.tensor(3.0), Grid(8, symmetric=False))
    assert scale.item() == pytest.approx(3 / 255) and zero.item() == 0  # widened to contain 0
    assert Grid(2, symmetric=True).qmin == -1 and Grid(2, symmetric=True).qmax == 1  # ternary
    assert Grid(4, symmetric=False).qmax == 15


def test_per_channel_scales_follow_each_row():
    w = torch.tensor([[0.01, -0.02, 0.005], [1.0, -3.0, 2.0]])
    lo, hi = observe_range(w, "minmax", Grid(8, per_channel=True))
    scale, _ = scale_zero_point(lo, hi, Grid(8, per_channel=True))
    assert torch.allclose(scale, torch.tensor([0.02, 3.0]) / 127)
    per_tensor = quantize(w, bits=8)
    per_channel = quantize(w, bits=8, per_channel=True)
    assert (per_tensor[0] == 0).sum() >= 2  # the small row drowns in the large row's step
    assert (per_channel[0] - w[0]).abs().max() <= 0.02 / 127 / 2 + 1e-9


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_round_trip_error_is_at_most_half_a_step(symmetric, per_channel):
    torch.manual_seed(0)
    x = torch.randn(16, 64) * torch.linspace(0.1, 5, 16)[:, None] + (0 if symmetric else 1.0)
    grid = Grid(8, symmetric, per_channel)
    scale, zero = scale_zero_point(*observe_range(x, "minmax", grid), grid)
    error = (fake_quantize(x, scale, zero, grid) - x).abs()
    step = scale[:, None] if per_channel else scale
    assert (error <= step / 2 + 1e-6).all()


def test_percentile_and_mse_clip_a_heavy_tail_below_min_max():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))  # extremes near ±10, mass within ±3
    grid = Grid(4, symmetric=True)
    clip = {o: max(-lo, hi).item() for o in ("minmax", "percentile", "mse")
            for lo, hi in [observe_range(x, o, grid, percentile=99.9)]}
    assert clip["percentile"] < 0.8 * clip["minmax"] and clip["mse"] < 0.6 * clip["minmax"]
    assert 4.0 < clip["mse"] < 6.0  # the MSE-optimal 4-bit clip of a unit Laplace is about 5 (Banner et al. 2019)
    error = {o: (quantize(x, o, bits=4) - x).square().mean() for o in ("minmax", "mse")}
    assert error["mse"] < 0.5 * error["minmax"]


def test_straight_through_gradient_passes_inside_the_range_and_stops_outside():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.3, 0.9, 5.0], requires_grad=True)
    grid = Grid(8, symmetric=True)
    scale, zero = scale_zero_point(torch.tensor(-1.0), torch.tensor(1.0), grid)
    fake_quantize(x, scale, zero, grid).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]


def test_a_fake_quantized_layer_trains_its_weight_and_snaps_it_to_the_grid():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 4, 3)
    wrapped = FakeQuantized(layer, WeightQuantizer(Grid(4, per_channel=True)))
    wrapped(torch.randn(2, 2, 5, 5)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    error = wrapped.snap()
    assert 0 < error < 0.2 and wrapped.weight_quantizer is None
    steps = layer.weight.detach().flatten(1) / (layer.weight.detach().flatten(1).abs().amax(1, keepdim=True) / 7)
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # every weight is k · scale, |k| <= 7


# -- observers -----------------------------------------------------------------------------------
def test_activation_ranges_move_by_ema_only_while_observing_and_resume_from_buffers():
    observer = ActivationQuantizer(Grid(8, symmetric=False), ema_decay=0.9)
    x = torch.randn(8, 4)
    assert torch.equal(observer(x), x)  # nothing observed yet: passes through
    observer.observing = True
    observer(torch.tensor([-1.0, 2.0]))
    observer(torch.tensor([-3.0, 4.0]))
    assert observer.lo.item() == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert observer.hi.item() == pytest.approx(0.9 * 2 + 0.1 * 4)
    observer.observing = False  # frozen
    frozen = dict(observer.state_dict())
    observer(torch.tensor([-100.0, 100.0]))
    assert all(torch.equal(frozen[k], v) for k, v in observer.state_dict().items())
    assert observer.updates.item() == 2
    restored = ActivationQuantizer(Grid(8, symmetric=False), ema_decay=0.9)
    restored.load_state_dict(frozen)
    assert torch.equal(restored(x), observer(x))


@pytest.mark.parametrize("observer, expected", [("minmax", (-3.0, 4.0)), ("percentile", (-2.0, 3.0))])
def test_calibration_keeps_the_extremes_or_averages_the_batch_estimates(observer, expected):
    quantizer = ActivationQuantizer(Grid(8, symmetric=False), observer, percentile=100)
    quantizer.observing = True
    quantizer(torch.tensor([-1.0, 2.0]))
    quantizer(torch.tensor([-3.0, 4.0]))
    assert (quantizer.lo.item(), quantizer.hi.item()) == expected


def test_plain_weights_are_keyed_for_wrapped_layers():
    state = {"features.1.weight": 1, "features.1.bias": 2, "classifier.weight": 3}
    assert plain_keys_to_wrapped(state, {"features.1"}) == {
        "features.1.layer.weight": 1, "features.1.layer.bias": 2, "classifier.weight": 3}


def test_layer_bits_override_the_width_by_pattern_first_match_wins():
    from effml.compressors.qat import QATConfig

    qat = QuantizationAwareTraining(QATConfig(bits=8, layer_bits={"features.1": 4, "*.3": 6, "features.*": 2}))
    assert [qat.bits_for(p) for p in ("features.1", "features.3", "features.5", "classifier")] == [4, 6, 2, 8]


# -- end to end on digits ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    """A finished dense LeNet-300-100 on digits (recipe dense_lenet): what ptq and qat start from."""
    return train_in(tmp_path_factory.mktemp("dense"), "recipe=dense_lenet", "trainer.max_epochs=3", *DIGITS)


def metrics(root: Path, recipe: str) -> dict:
    files = list((root / "outputs" / recipe).rglob("metrics.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture
def from_dense(tmp_path, dense_run) -> float:
    """The dense run copied into this test's outputs; returns its test accuracy."""
    shutil.copytree(dense_run, tmp_path / "outputs")
    return metrics(tmp_path, "dense_lenet")["test_acc"]


def test_ptq_keeps_accuracy_at_8_bits_and_loses_it_at_2(effml, tmp_path, from_dense):
    for bits in (8, 2):
        code, _, err = effml("train", "recipe=ptq_lenet", f"compressor.bits={bits}", f"compressor.activation_bits={bits}",
                             "compressor.skip=[]", *DIGITS)
        assert code == 0, err
    runs = [json.loads(f.read_text()) for f in (tmp_path / "outputs" / "ptq_lenet").rglob("metrics.json")]
    accuracy = {m["compressors"]["ptq"]["bits"]: m["test_acc"] for m in runs}
    for m in runs:
        assert m["stages"] == []  # a trained model: no training stage
        report = m["compressors"]["ptq"]
        assert report["trained_weights"] == "recipe:dense_lenet" and report["calibration_batches"] == 18
        assert set(report["layers"]) == {"features.1", "features.3", "classifier"}
    assert accuracy[8] >= from_dense - 0.01
    assert accuracy[2] <= from_dense - 0.05  # a ternary grid and 4 input levels cost real accuracy


def test_qat_fine_tunes_at_8_bits_within_a_point_and_freezes_its_observers(effml, tmp_path, from_dense):
    code, _, err = effml("train", "recipe=qat_lenet", "trainer.max_epochs=1", "compressor.freeze_observers_after=10",
                         *DIGITS)
    assert code == 0, err
    m = metrics(tmp_path, "qat_lenet")
    assert m["test_acc"] >= from_dense - 0.01
    report = m["compressors"]["qat"]
    assert report["observer_updates"] == 10 and report["trained_weights"] == "recipe:dense_lenet"
    assert 0 < report["mean_weight_error"] < 0.01


def test_a_forced_int8_kernel_runs_for_real_on_cpu(effml, tmp_path, from_dense):
    code, _, err = effml("train", "recipe=ptq_lenet", "hardware.selection=force", "compressor.kernel=int8_dynamic",
                         *DIGITS)
    assert code == 0, err
    m = metrics(tmp_path, "ptq_lenet")
    assert [d["kernel"] for d in m["kernels"]["layers"]] == ["int8_dynamic", "int8_dynamic"]
    assert all(d["forced"] for d in m["kernels"]["layers"])
    assert m["compressors"]["ptq"]["kernels"] == {"int8_dynamic": 2}
    assert m["test_acc"] >= from_dense - 0.01  # torchao's int8 matmuls, on the snapped weights
    model = torch.load(next((tmp_path / "outputs" / "ptq_lenet").rglob("model.pt")), weights_only=False)
    assert "Int8" in type(model["features.1.weight"]).__name__


def test_under_measure_a_kernel_outside_the_allow_list_is_one_line_too(effml, tmp_path):
    """Once: simulated layers and a reason in kernels.layers, a finished run that could never get the
    kernel asked for. Now the same line as under selection=force, before anything is written."""
    code, _, err = effml("train", "compressor=ptq", "compressor.kernel=fp8_dynamic", "trainer.max_epochs=1", *DIGITS)
    one_line_error(code, err, "kernel fp8_dynamic is not in hardware.kernels (cpu allows int8_dynamic, int8_weight_only)")
    assert not (tmp_path / "outputs").exists()


def test_under_measure_an_allowed_kernel_that_cannot_run_leaves_the_layer_simulated_and_says_why(effml, tmp_path):
    code, _, err = effml("train", "compressor=ptq", "compressor.kernel=fp8_dynamic", "hardware.kernels=[fp8_dynamic]",
                         "trainer.max_epochs=1", *DIGITS)
    assert code == 0, err
    m = metrics(tmp_path, "custom")
    layers = m["kernels"]["layers"]
    assert [d["kernel"] for d in layers] == ["dense", "dense"]
    assert all("fp8_dynamic: " in d["reason"] and "CUDA" in d["reason"] for d in layers), layers
    assert m["compressors"]["ptq"]["kernels"] == {"simulated": 2}


# -- resume ----------------------------------------------------------------------------------------
class Crash(Exception):
    """A kill in the middle of QAT's second epoch (after the first epoch's checkpoint)."""


QAT_RUN = ["train", "compressor=qat", "trainer.max_epochs=2", "compressor.freeze_observers_after=25", *DIGITS]


def test_qat_killed_mid_epoch_resumes_exactly(effml, tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    monkeypatch.chdir(straight)
    assert effml(*QAT_RUN)[0] == 0

    start = QuantizationAwareTraining.on_train_batch_start

    def crash_in_epoch_two(self, trainer, *args):
        start(self, trainer, *args)
        if trainer.current_epoch == 1 and trainer.global_step == 20:
            raise Crash

    monkeypatch.chdir(killed)
    monkeypatch.setattr(QuantizationAwareTraining, "on_train_batch_start", crash_in_epoch_two)
    assert effml(*QAT_RUN)[0] != 0
    assert list(killed.rglob("last.ckpt")) and not list(killed.rglob("metrics.json"))
    monkeypatch.setattr(QuantizationAwareTraining, "on_train_batch_start", start)
    assert effml(*QAT_RUN)[0] == 0  # the same command again: resumes after epoch 1

    for name in ("model.pt", "end.pt"):  # the deployable weights; the last stage's state, observers included
        a = torch.load(next(straight.rglob(name)), weights_only=True)
        b = torch.load(next(killed.rglob(name)), weights_only=True)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(k.endswith("input_quantizer.lo") for k in a)
    ma, mb = metrics(straight, "custom"), metrics(killed, "custom")
    assert ma["test_acc"] == mb["test_acc"] and ma["compressors"]["qat"]["observer_updates"] == 25


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compressor=ptq", "compressor.bits=1"], "compressor.bits must be in [2, 16] bits; got 1"),
        (["compressor=qat", "compressor.bits=17"], "compressor.bits must be in [2, 16] bits; got 17"),
        (["compressor=ptq", "compressor.activation_bits=1"], "compressor.activation_bits must be in [2, 16]"),
        (["compressor=qat", "+compressor.layer_bits.classifier=32"], "compressor.layer_bits['classifier'] must be in [2, 16]"),
        (["compressor=ptq", "compressor.kernel=int2_magic"], "compressor.kernel must be one of int8_dynamic"),
        (["compressor=ptq", "compressor.calibration=median"], "compressor.calibration must be one of minmax"),
        (["compressor=qat", "compressor.activation_observer=median"], "compressor.activation_observer must be one of"),
        (["compressor=ptq", "compressor.weights.source=recipe"], "compressor.weights.recipe is needed"),
        (["compressor=ptq", "compressor.weights.source=recipe", "compressor.weights.recipe=dense_lenet"],
         "trained model: no finished run of recipe dense_lenet (seed 0)"),
        (["compressor=ptq", "hardware.selection=force", "hardware.kernels=[fp8_dynamic]", "compressor.kernel=fp8_dynamic"],
         "hardware.selection=force: kernel fp8_dynamic cannot run for features.1: fp8 needs a CUDA GPU"),
    ],
)
def test_bad_quantization_settings_are_one_line_errors(effml, tmp_path, overrides, message):
    code, _, err = effml("train", *overrides, *DIGITS)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()
