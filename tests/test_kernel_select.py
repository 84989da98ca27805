"""Kernel selection by measurement (effml.kernels.select): what is kept, why, and never a slowdown."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from conftest import TINY, metrics_of, one_line_error
from effml.config import HardwareConfig
from effml.errors import EffmlError
from effml.kernels import library, select
from effml.measure import holds_kernels


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(256, 512), nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def cpu(tmp_path):
    return HardwareConfig(kernels=["int8_dynamic", "int8_weight_only"], kernel_cache=str(tmp_path / "kernels.json"))


@pytest.fixture(autouse=True)
def own_cache(monkeypatch):
    monkeypatch.delenv("EFFML_KERNEL_CACHE")  # these tests point hardware.kernel_cache at their own file


INPUTS = {"x": torch.randn(64, 256)}


def seed_cache(hardware, layer: nn.Linear, timings: dict[str, float]) -> None:
    """Write timings into the cache the selector reads, as an earlier run on this machine would have."""
    selector = select.KernelSelector(hardware)
    shape = f"x[64, {layer.in_features}] w{list(layer.weight.shape)} float32"
    for name, ms in timings.items():
        selector.cache.put(f"{selector.key_prefix}|{shape}|{name}", ms)
    selector.cache.save()


def test_kernels_say_why_they_cannot_run_on_a_cpu():
    layer, cpu = nn.Linear(64, 64), torch.device("cpu")
    assert "needs a CUDA GPU (sm_89+)" in library.kernel("fp8_dynamic").unsupported(layer, cpu, torch.bfloat16)
    assert "needs a CUDA GPU" in library.kernel("sparse_2to4").unsupported(layer, cpu, torch.bfloat16)
    assert library.kernel("int8_dynamic").unsupported(layer, cpu, torch.float32) is None
    with pytest.raises(EffmlError, match="unknown kernel 'int3'"):
        library.kernel("int3")


def test_a_kernel_measured_faster_by_the_margin_is_kept_and_the_reason_says_so(cpu):
    model = MLP()
    seed_cache(cpu, model.fc1, {"dense": 2.0, "int8_dynamic": 1.0})
    seed_cache(cpu, model.fc2, {"dense": 1.0, "int8_dynamic": 0.99})  # 1.01x: under the 1.05x margin
    guard_off = dataclasses.replace(cpu, selection_margin=1.05)
    selector = select.KernelSelector(guard_off)
    kept = selector.choose("fc1", model.fc1, (64, 256), ["int8_dynamic"])
    dense = selector.choose("fc2", model.fc2, (64, 512), ["int8_dynamic"])
    first, second = selector.decisions
    assert first.kernel == "int8_dynamic" and "2.00x faster" in first.reason and kept is not model.fc1
    assert second.kernel == "dense" and "1.01x (< 1.05x)" in second.reason and dense is model.fc2
    assert first.timings_ms == {"dense": 2.0, "int8_dynamic": 1.0}


def test_kernels_the_hardware_does_not_allow_or_cannot_run_stay_dense_with_the_reason(cpu):
    selector = select.KernelSelector(cpu)
    layer = nn.Linear(256, 512)
    assert selector.choose("fc1", layer, (64, 256), ["fp8_dynamic", "sparse_2to4"]) is layer
    reason = selector.decisions[0].reason
    assert reason.startswith("dense: no alternative runs here")
    assert "fp8_dynamic: not in hardware.kernels" in reason and "sparse_2to4: not in hardware.kernels" in reason


def test_force_uses_the_kernel_unmeasured_and_refuses_one_the_device_cannot_run(cpu):
    forced = dataclasses.replace(cpu, selection="force")
    selector = select.KernelSelector(forced)
    converted = selector.choose("fc1", nn.Linear(256, 512), (64, 256), ["int8_dynamic"])
    assert type(converted.weight).__name__ == "Int8Tensor"
    assert selector.decisions[0].forced and selector.decisions[0].reason.startswith("forced, not selected")
    allowing_fp8 = select.KernelSelector(dataclasses.replace(forced, kernels=["fp8_dynamic"]))
    with pytest.raises(EffmlError, match="selection=force: kernel fp8_dynamic cannot run for fc1: fp8 needs a CUDA"):
        allowing_fp8.choose("fc1", nn.Linear(256, 512), (64, 256), ["fp8_dynamic"])


def test_force_never_overrides_the_allow_list(cpu):
    """Once int8_dynamic was forced on every layer of a run whose hardware.kernels held only fp8_rowwise."""
    selector = select.KernelSelector(dataclasses.replace(cpu, selection="force", kernels=["fp8_rowwise"]))
    with pytest.raises(EffmlError, match=r"kernel int8_dynamic is not in hardware.kernels \(cpu allows fp8_rowwise\)"):
        selector.choose("fc1", nn.Linear(256, 512), (64, 256), ["int8_dynamic"])
    assert not selector.decisions


def test_a_forced_kernel_outside_the_allow_list_is_one_line_before_training(effml, tmp_path):
    code, _, err = effml("train", "recipe=ptq_lenet", "compressor.weights.source=none", "hardware.selection=force",
                         "hardware.kernels=[fp8_rowwise]", "compressor.kernel=int8_dynamic", "data=digits")
    one_line_error(code, err, "kernel int8_dynamic is not in hardware.kernels (cpu allows fp8_rowwise)")
    assert not (tmp_path / "outputs").exists()


def test_selection_off_keeps_every_layer_dense(cpu):
    model = MLP()
    decisions = select.convert_linears(model, {"fc1": ["int8_dynamic"]}, INPUTS, dataclasses.replace(cpu, selection="off"))
    assert [d.kernel for d in decisions] == ["dense"] and decisions[0].reason == "hardware.selection=off"
    assert isinstance(model.fc1.weight, nn.Parameter) and type(model.fc1.weight.data) is torch.Tensor


def test_timings_are_cached_per_device_torch_shape_dtype_and_kernel(cpu, tmp_path):
    select.convert_linears(MLP(), {"fc1": ["int8_dynamic"]}, INPUTS, dataclasses.replace(cpu, selection_margin=100.0))
    keys = json.loads((tmp_path / "kernels.json").read_text())
    prefix = f"{select.KernelSelector(cpu).key_prefix}|x[64, 256] w[512, 256] float32|"
    assert {prefix + "dense", prefix + "int8_dynamic"} <= set(keys)
    assert f"torch {torch.__version__}|torchao" in prefix
    again = select.KernelSelector(cpu)
    again.choose("fc1", MLP().fc1, (64, 256), ["int8_dynamic"])
    assert again.cache.new == {}  # nothing re-measured


def test_the_whole_model_goes_back_to_dense_when_it_is_not_faster(cpu):
    """Per-layer timings claim int8 is 10x faster; the whole model, really measured, is not (int8
    matmuls are much slower than fp32 on this CPU): every layer reverts and the record says why."""
    model = MLP()
    seed_cache(cpu, model.fc1, {"dense": 10.0, "int8_dynamic": 1.0})
    seed_cache(cpu, model.fc2, {"dense": 10.0, "int8_dynamic": 1.0})
    reference = model(INPUTS["x"])
    decisions = select.convert_linears(model, {"fc1": ["int8_dynamic"], "fc2": ["int8_dynamic"]}, INPUTS, cpu)
    *layers, whole = decisions
    assert whole.layer == "(whole model)" and whole.kernel == "dense" and "reverted" in whole.reason
    assert all(d.kernel == "dense" and d.reason.startswith("reverted to dense") for d in layers)
    assert type(model.fc1.weight.data) is torch.Tensor and torch.equal(model(INPUTS["x"]), reference)


def test_attention_capture_records_the_training_call_and_leaves_the_rng_alone():
    from effml.data import DataInfo
    from effml.registry import MODELS

    entry = MODELS.get("vit")
    vit = entry.target.from_config(entry.make_config({"attention_dropout": 0.1}), DataInfo(10, "image", (1, 28, 28)))
    images = {"x": torch.randn(4, 1, 28, 28)}
    state = torch.get_rng_state()
    call = select.capture_attention_call(vit, images)
    assert torch.equal(torch.get_rng_state(), state)
    assert call.q[0] == 4 and call.q[1] == vit.blocks[0].attn.heads and call.dropout_p == 0.1 and call.mask is None
    assert select.capture_attention_call(MLP(), INPUTS) is None


def test_the_measured_sdpa_order_puts_the_fastest_backend_that_runs_first(cpu):
    call = select.AttentionCall((2, 4, 64, 16), (2, 4, 64, 16), (2, 4, 64, 16), None, None, 0.1, False)
    order, decision = select.measured_sdpa_order(call, cpu, ["flash", "math"])
    assert order[-1] == "math" or order == ["math", "flash"]
    assert decision.kernel == order[0] and set(decision.timings_ms) <= {"flash", "math"} and "math" in decision.timings_ms
    timed = [b for b in order if b in decision.timings_ms]
    assert timed == sorted(timed, key=decision.timings_ms.__getitem__)


def test_a_vit_run_records_its_measured_attention_choice(effml, tmp_path):
    code, _, err = effml("train", "recipe=vit_fmnist", "seed=0", *TINY, "trainer.max_epochs=1",
                         "trainer.limit_train_batches=2", "model.depth=1", "measure.train_step=false")
    assert code == 0, err
    kernels = metrics_of(tmp_path / "outputs")["kernels"]
    attention = kernels["attention"]
    assert attention["kernel"] == kernels["sdpa_backends"][0] and "measured fastest" in attention["reason"]
    assert kernels["sdpa_backends"][-1] == "math" and kernels["selection"] == "measure"


def test_a_bad_selection_setting_is_one_line(effml):
    code, _, err = effml("train", "recipe=dense_lenet", "hardware.selection=bogus")
    one_line_error(code, err, "hardware.selection must be one of measure, force, off")
    code, _, err = effml("train", "recipe=dense_lenet", "hardware.kernels=[int3]")
    one_line_error(code, err, "hardware.kernels must be one of")


def test_fp8_training_on_a_cpu_stays_dense_and_says_why_or_refuses_under_force(effml, tmp_path):
    code, _, err = effml("train", "recipe=dense_lenet", *TINY, "trainer.max_epochs=1", "hardware.fp8_training=true")
    assert code == 0, err
    training = metrics_of(tmp_path / "outputs")["kernels"]["training"]
    assert len(training) == 3 and all(d["kernel"] == "dense" and "fp8 needs a CUDA GPU" in d["reason"] for d in training)
    code, _, err = effml("train", "recipe=dense_lenet", *TINY, "hardware.fp8_training=true", "hardware.selection=force",
                         "output_root=forced")
    one_line_error(code, err, "cannot train in fp8: fp8 needs a CUDA GPU (sm_89+)")
    assert not (tmp_path / "forced").exists()  # refused before anything was written


@pytest.mark.e2e
def test_a_compiled_run_trains_through_dynamo_and_saves_plain_parameter_names(effml, tmp_path):
    """``hardware.compile`` once crashed every training run (dynamo traced Lightning's ``self.log``:
    the whole LightningModule was compiled); the model alone is, for each fit, and its checkpoints
    keep their names. ``compile_mode`` and the fused optimizer ride along (issue 25)."""
    from torch._dynamo.utils import counters

    counters.clear()
    code, _, err = effml("train", "recipe=magnitude_lenet", *TINY, "trainer.max_epochs=1", "hardware.compile=true",
                         "hardware.compile_mode=reduce-overhead", "trainer.fused_optimizer=true")
    assert code == 0, err
    assert counters["stats"]["unique_graphs"] > 0  # the fits ran compiled
    m = metrics_of(tmp_path / "outputs")
    assert m["kernels"]["compile"] is True and m["kernels"]["compile_mode"] == "reduce-overhead"
    model = torch.load(next((tmp_path / "outputs").rglob("model.pt")), weights_only=True)
    assert model and not any("_orig_mod" in key for key in model)


def test_fp8_rowwise_linear_computes_the_layer_within_e4m3_precision():
    """e4m3 keeps 3 mantissa bits: each operand is off by at most 1/16 relative, so the output's
    error stays a few percent of its norm; the weight is stored in one byte per value."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    fp8 = library.Fp8Linear(layer)
    x = torch.randn(2, 16, 256)
    expected, got = layer(x), fp8(x)
    assert got.shape == expected.shape and fp8.weight.dtype == torch.float8_e4m3fn
    assert (got - expected).norm() / expected.norm() < 0.05
    assert holds_kernels(nn.Sequential(fp8))  # so no training step is timed through it


def test_fp8_rowwise_linear_returns_what_a_linear_would_under_autocast():
    """BERT's LayerNorm hands the next layer fp32 under bf16 autocast; the layer must answer in bf16
    as ``nn.Linear`` does (and ``_scaled_mm`` cannot add a bias to an fp32 output)."""
    layer = nn.Linear(64, 32)
    fp8, x = library.Fp8Linear(layer), torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = layer(x), fp8(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert (got.float() - expected.float()).norm() / expected.float().norm() < 0.05
    assert fp8(x).dtype == torch.float32  # no autocast: x's dtype, the bias added after the matmul


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows, width", [(65536, 1024), (1000, 1920), (7, 384), (3, 16384)])
def test_triton_row_quantization_is_bit_identical_to_the_reference(rows, width):
    from effml.kernels.fp8_quant import quantize_rows

    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    x = x * torch.rand(rows, 1, device="cuda", dtype=torch.bfloat16) * 10  # rows of different ranges
    q, scale = quantize_rows(x)
    q_ref, scale_ref = library._quantize_rows(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def whole_model_timed_as(monkeypatch, ms: dict[str, float]) -> None:
    """The guard's whole-model timings read ``ms`` (as a GPU might measure them); layer timings stay real."""
    real = select.measure._time_interleaved

    def timed(fns, device, **kwargs):
        seconds = real(fns, device, **kwargs)
        return {k: [ms[k]] * 5 for k in seconds} if set(seconds) == set(ms) else seconds

    monkeypatch.setattr(select.measure, "_time_interleaved", timed)


def test_every_layer_converted_is_kept_when_the_whole_model_is_faster_so(cpu, monkeypatch):
    """Alone, fc2 is no faster (1.0x, below the margin); with every layer converted the model is the
    fastest (what fusions across layers do): that layout is kept, and fc2's record says why."""
    model = MLP()
    seed_cache(cpu, model.fc1, {"dense": 10.0, "int8_dynamic": 1.0})
    seed_cache(cpu, model.fc2, {"dense": 10.0, "int8_dynamic": 10.0})
    whole_model_timed_as(monkeypatch, {"dense": 3.0, "selected": 2.9, "every layer": 1.0})
    decisions = {d.layer: d for d in select.convert_linears(model, {"fc1": ["int8_dynamic"], "fc2": ["int8_dynamic"]},
                                                             INPUTS, cpu)}
    whole = decisions["(whole model)"]
    assert whole.kernel == "converted" and whole.reason.startswith("kept every layer (2 layers converted)")
    assert "selected 1.03x, every layer 3.00x" in whole.reason
    assert decisions["fc1"].kernel == decisions["fc2"].kernel == "int8_dynamic"
    assert decisions["fc2"].reason.startswith("converted with every layer") and "1.00x (< 1.05x)" in decisions["fc2"].reason
    assert type(model.fc2.weight.data) is not torch.Tensor  # the int8 layer is in the model


def test_a_whole_model_gain_below_the_margin_is_not_kept(cpu, monkeypatch):
    model = MLP()
    seed_cache(cpu, model.fc1, {"dense": 10.0, "int8_dynamic": 1.0})
    seed_cache(cpu, model.fc2, {"dense": 10.0, "int8_dynamic": 1.0})
    whole_model_timed_as(monkeypatch, {"dense": 1.02, "selected": 1.0})
    *layers, whole = select.convert_linears(model, {"fc1": ["int8_dynamic"], "fc2": ["int8_dynamic"]}, INPUTS, cpu)
    assert whole.kernel == "dense" and "selected 1.02x" in whole.reason
    assert all(d.kernel == "dense" for d in layers) and type(model.fc1.weight.data) is torch.Tensor


def test_forced_fp8_training_keeps_a_layer_fp8_cannot_take_dense_instead_of_refusing_the_run(monkeypatch):
    """A 2-class head (768 -> 2) is no multiple of 16: under selection=force it stays dense with the
    reason recorded, the other layers go fp8 (it refused the whole run, so no 2-class BERT could train
    in fp8 forced). The device is faked: here only the decision logic runs."""
    from types import SimpleNamespace

    from effml.kernels import fp8_training

    def unsupported(layer, device, dtype):
        return None if layer.in_features % 16 == 0 and layer.out_features % 16 == 0 else "widths not multiples of 16"

    monkeypatch.setattr(fp8_training.library, "kernel", lambda name: SimpleNamespace(unsupported=unsupported))
    monkeypatch.setattr(fp8_training, "_float8", lambda layer: nn.Identity())
    monkeypatch.setattr(fp8_training, "_train_timings", lambda *args: {"dense": 1.0, "fp8": 2.0})
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 2))
    hardware = SimpleNamespace(name="fake", accelerator="cpu", fp8_training=True, selection="force",
                               selection_margin=1.05, kernels=[], kernel_cache="", precision="32-true")
    decisions = fp8_training.apply(model, hardware, {"input": torch.randn(4, 32)})
    assert [d.kernel for d in decisions] == ["fp8_training", "dense"]
    assert "widths not multiples of 16" in decisions[1].reason and isinstance(model[0], nn.Identity)
