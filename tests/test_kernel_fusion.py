"""Fusions across fp8 layers (effml.kernels.fusion): same function, fewer passes, undone by the guard."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from effml.kernels import fusion, library, select

INPUTS = {"input_ids": torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))}


def tiny_bert() -> BertModel:
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=64, vocab_size=2048)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval()


def fp8_everywhere(model: nn.Module) -> nn.Module:
    """Every encoder Linear as an Fp8Linear (what selection would pick on an H100), on this CPU."""
    model = copy.deepcopy(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layer." in path:
            select.set_module(model, path, library.Fp8Linear(module))
    return model


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).last_hidden_state


def fused(model: nn.Module) -> tuple[nn.Module, fusion.Fusions]:
    model = copy.deepcopy(model)
    found = fusion.fp8_fusions(model)
    for path, (_, module) in found.swaps.items():
        select.set_module(model, path, module)
    return model, found


def test_fused_bert_computes_exactly_what_the_unfused_fp8_model_does():
    unfused = fp8_everywhere(tiny_bert())
    model, found = fused(unfused)
    block = model.encoder.layer[0]
    assert {type(block.attention.self.query), type(block.attention.self.value)} == {fusion.Fp8Sibling}
    assert block.attention.self.key.stacked is block.attention.self.query.stacked  # one matmul for three
    assert block.attention.self.query.stacked.out_features == 3 * 64
    assert isinstance(block.intermediate.intermediate_act_fn, nn.Identity) and block.output.dense.gelu_input
    assert not block.attention.output.dense.gelu_input  # a residual's input has no GELU before it
    assert not unfused.encoder.layer[0].output.dense.gelu_input  # the unfused model is left alone
    # the LayerNorms hand their output's fp8 form on; the last layer's output feeds no fp8 layer
    assert type(block.attention.output.LayerNorm) is type(block.output.LayerNorm) is fusion.Fp8LayerNorm
    assert type(model.encoder.layer[1].output.LayerNorm) is nn.LayerNorm
    assert block.intermediate.dense.handoff is block.attention.output.LayerNorm.handoff
    assert model.encoder.layer[1].attention.self.query.stacked.handoff is block.output.LayerNorm.handoff
    assert unfused.encoder.layer[0].intermediate.dense.handoff is None  # the unfused model is left alone
    assert torch.equal(out(model), out(unfused))
    assert found.notes["encoder.layer.0.attention.self.key"] == "one quantization and matmul with query, value"
    assert found.notes["encoder.layer.1.attention.self.key"] == ("one quantization and matmul with query, value; "
                                                                 "input's fp8 form from the LayerNorm before it")
    assert found.notes["encoder.layer.1.intermediate.dense"] == "input's fp8 form from the LayerNorm before it"
    assert "GELU" in found.notes["encoder.layer.1.output.dense"]
    assert "encoder.layer.1.attention.output.dense" not in found.notes


def test_a_handoff_serves_only_the_tensor_it_was_made_from_once_per_reader():
    handoff, y = fusion.QuantizedHandoff(readers=2), torch.randn(4, 8)
    handoff.put(y, library._quantize_rows(y))
    assert handoff.take(y.clone()) is None  # another tensor with the same values
    assert handoff.take(y) is not None and handoff.take(y) is not None
    assert handoff.take(y) is None and handoff._source is None  # both readers served: nothing held
    handoff.put(y, library._quantize_rows(y))
    y.add_(1)
    assert handoff.take(y) is None  # changed in place after it was quantized


def test_the_stacked_layer_gives_each_sibling_its_own_result():
    torch.manual_seed(0)
    layers = [library.Fp8Linear(nn.Linear(32, w)) for w in (16, 48)]
    stacked = library.Fp8Linear.stacked(layers)
    x = torch.randn(5, 32)
    a, b = stacked(x).split([16, 48], dim=-1)
    assert torch.equal(a, layers[0](x)) and torch.equal(b, layers[1](x))


def test_siblings_called_on_other_inputs_or_twice_recompute():
    """The shared result is only reused for the same, unchanged input, once per sibling."""
    torch.manual_seed(0)
    layers = [library.Fp8Linear(nn.Linear(32, 32)) for _ in range(3)]
    shared = fusion.SharedMatmul(library.Fp8Linear.stacked(layers), [32, 32, 32])
    q, k, v = (fusion.Fp8Sibling(shared, i, ("query", "key", "value")) for i in range(3))
    x, y = torch.randn(4, 32), torch.randn(4, 32)
    assert torch.equal(q(x), layers[0](x))
    assert torch.equal(k(y), layers[1](y))  # another input: computed afresh
    assert torch.equal(q(x), layers[0](x)) and torch.equal(q(x), layers[0](x))  # twice: afresh
    x.mul_(2)  # changed in place after the stacked matmul ran
    assert torch.equal(v(x), layers[2](x))
    k(x), q(x)
    assert shared._input is None  # every slice handed out: no activations held


def test_a_gelu_that_is_not_the_exact_one_is_left_alone():
    model = fp8_everywhere(tiny_bert())
    for layer in model.encoder.layer:
        layer.intermediate.intermediate_act_fn = nn.GELU(approximate="tanh")
    found = fusion.fp8_fusions(model)
    assert not any("intermediate_act_fn" in p for p in found.swaps)
    assert any(p.endswith("attention.self.query") for p in found.swaps)


def test_the_guard_restores_the_gelu_when_it_reverts_the_fused_model(monkeypatch, tmp_path):
    """Reverting to dense must also put back the GELU the down-projection had absorbed."""
    from effml.config import HardwareConfig

    monkeypatch.setitem(library.KERNELS, "fp8_rowwise",  # let fp8 "run" on this CPU
                        library.Kernel("fp8_rowwise", lambda *a: None, library._fp8_rowwise))
    real = select.measure._time_interleaved

    def fp8_layers_fast_model_slow(fns, device, **kwargs):
        seconds = real(fns, device, **kwargs)
        if "fp8_rowwise" in seconds:  # one layer's timing: every layer is selected
            seconds["fp8_rowwise"] = [s / 1e3 for s in seconds["fp8_rowwise"]]
        if "selected" in seconds:  # the guard's whole-model timing
            seconds["selected"] = [s * 1e3 for s in seconds["selected"]]
        return seconds

    monkeypatch.setattr(select.measure, "_time_interleaved", fp8_layers_fast_model_slow)
    model = tiny_bert()
    reference = out(model)
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in p]
    hardware = HardwareConfig(kernels=["fp8_rowwise"], kernel_cache=str(tmp_path / "k.json"))
    decisions = select.convert_linears(model, {p: ["fp8_rowwise"] for p in paths}, INPUTS, hardware)
    assert decisions[-1].kernel == "dense" and decisions[-1].reason.startswith("reverted to dense")
    assert type(model.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == "GELUActivation"
    assert all(type(model.get_submodule(p)) is nn.Linear for p in paths)
    assert torch.equal(out(model), reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows, width", [(65536, 4096), (1000, 1920), (7, 384)])
def test_triton_gelu_quantization_agrees_with_gelu_then_quantize(rows, width):
    """Up to the last bit of erf (Triton's libdevice and PyTorch's CUDA GELU may round it apart, which
    can move a bf16 GELU value, and so its e4m3 code, by one step): scales within one bf16 step,
    codes within one e4m3 step, and nearly all of them identical."""
    from torch.nn import functional as F

    from effml.kernels.fp8_quant import quantize_rows

    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = quantize_rows(x, gelu=True)
    q_ref, scale_ref = library._quantize_rows(F.gelu(x))
    assert ((scale - scale_ref).abs() <= scale_ref * 2**-7).all()
    codes, codes_ref = q.view(torch.uint8).int(), q_ref.view(torch.uint8).int()
    assert (codes - codes_ref).abs().max() <= 1
    assert (codes != codes_ref).float().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows, width", [(65536, 1024), (1000, 768), (7, 384)])
def test_triton_layer_norm_quantize_agrees_with_layer_norm_then_quantize(rows, width):
    """The output within one bf16 step of nn.LayerNorm's (a reciprocal square root and a sum order of
    its own), and quantized exactly as the Triton row quantization quantizes that output."""
    from effml.kernels.fp8_quant import layer_norm_quantize, quantize_rows

    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) * 4 + 1
    norm = nn.LayerNorm(width).cuda().bfloat16()  # as in a bf16 model
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.2, 0.2)
        y, q, scale = layer_norm_quantize(x, norm.weight, norm.bias, norm.eps, torch.bfloat16)
        y_ref = norm(x)
    y, y_ref = y.float(), y_ref.float()
    assert ((y - y_ref).abs() <= torch.maximum(y.abs(), y_ref.abs()) * 2**-7 + 1e-6).all()  # one bf16 step
    q_y, scale_y = quantize_rows(y)
    assert torch.equal(scale, scale_y) and torch.equal(q.view(torch.uint8), q_y.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_bert_on_the_gpu_matches_the_unfused_fp8_model():
    unfused = fp8_everywhere(tiny_bert().cuda().bfloat16())  # converted after the cast: fp8 stays fp8
    model, _ = fused(unfused)
    inputs = {"input_ids": INPUTS["input_ids"].cuda()}
    with torch.no_grad():
        a, b = unfused(**inputs).last_hidden_state.float(), model(**inputs).last_hidden_state.float()
    assert (a - b).norm() / a.norm() < 1e-2  # the stacked matmul may sum in another order than three
