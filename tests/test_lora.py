"""LoRA / QLoRA (Hu et al. 2021; Dettmers et al. 2023) through PEFT: the merge is exact, NF4 stays
tensors-only in checkpoints, the counts and bytes are right, bad input is one line."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from transformers import AutoConfig, BertConfig, BertModel

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.lora import LoRA, LoRAConfig, NF4Linear
from effml.errors import EffmlError
from effml.models.bert import BertClassifier


def tiny_bert() -> BertClassifier:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertClassifier(BertModel(config, add_pooling_layer=True), num_classes=2).eval()


def inputs() -> dict:
    torch.manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}


def trained_adapters(model: nn.Module) -> None:
    """Stand-in for training: B is zero at the start (ΔW = 0), so give it values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


@pytest.mark.parametrize("qlora", [False, True])
def test_merge_gives_a_plain_model_with_the_adapted_function(qlora):
    method = LoRA(LoRAConfig(qlora=qlora))
    model = method.attach(tiny_bert())
    trained_adapters(model)
    with torch.no_grad():
        before = model(**inputs())
    merged = method.finalize(model, None)
    assert isinstance(merged, BertClassifier)
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    assert merged.state_dict().keys() == tiny_bert().state_dict().keys()  # loads as the dense model
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs()), before, atol=1e-5, rtol=1e-4)
    report = method.report()
    assert report["merged_layers"] == 4  # query and value of 2 layers
    assert ("requantization_error" in report) == qlora


@pytest.mark.parametrize("qlora", [False, True])
def test_the_merged_model_exports_as_a_transformers_classifier_with_the_same_function(qlora, tmp_path):
    """``<run>/model`` is a plain ``BertForSequenceClassification`` (safetensors) with its tokenizer:
    ``from_pretrained`` gives back the merged model's logits, with no effml code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from effml.models.bert import BertClassifierConfig

    method = LoRA(LoRAConfig(qlora=qlora))
    method.export_dir, method.model_cfg = tmp_path / "model", BertClassifierConfig(pretrained=None)
    model = method.attach(tiny_bert())
    trained_adapters(model)
    merged = method.finalize(model, None)
    assert method.report()["export"]["format"] == "BertForSequenceClassification"
    assert (tmp_path / "model" / "model.safetensors").is_file()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs()).logits, merged(**inputs()), atol=1e-6, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("a review")["input_ids"][0] == 101  # [CLS]


def test_only_adapters_and_the_head_train_and_the_fraction_is_small():
    method = LoRA(LoRAConfig(r=4))
    model = method.attach(tiny_bert())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".classifier." in n or ".pooler." in n for n in trainable)
    # r (in + out) per adapted layer, 4 of them; plus pooler 64x64+64 and classifier 64x2+2
    assert method.counts["adapter_params"] == 4 * 4 * (64 + 64)
    assert method.counts["trainable_params"] == 4 * 4 * 128 + 64 * 64 + 64 + 64 * 2 + 2
    full = method.full_bytes
    assert full["optimizer"] == 2 * full["gradients"] == 2 * 4 * method.counts["total_params"]


def test_qlora_stores_every_frozen_encoder_linear_in_nf4_in_plain_tensors():
    method = LoRA(LoRAConfig(qlora=True))
    model = method.attach(tiny_bert())
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 2 * 6 == method.counts["nf4_layers"]  # Q, K, V, attention output, FFN in/out of 2 layers
    assert method.counts["fp32_layers"] == []
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what every checkpoint load does
    assert all(type(v) is torch.Tensor for v in state.values())
    codes = [k for k in state if k.endswith("quantized_data")]
    assert codes and all(state[k].dtype == torch.uint8 for k in codes)


def test_nf4_linear_is_a_4_bit_copy_of_the_linear():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    nf4 = NF4Linear(linear, 64, 256)
    assert nf4.quantized_data.numel() == 256 * 128 // 2  # two 4-bit codes per byte
    x = torch.randn(5, 256)
    error = (nf4(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < float(error) < 0.15  # 4 bits: close, not exact
    torch.testing.assert_close(nf4.to_linear()(x), nf4(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field, value", [("r", 0), ("r", -2), ("alpha", 0.0), ("dropout", 1.0),
                                          ("target_modules", [])])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        LoRAConfig(**{field: value})


def test_bad_targets_a_non_transformer_and_r_0_are_one_line_and_write_nothing(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["lora"]), "compressor.target_modules=[q_proj]")
    one_line_error(code, err, "compressor.target_modules ['q_proj'] match no Linear layer of the model; "
                              "its Linear layers are named classifier, dense, key, query, value")
    code, _, err = effml("train", *TINY, "data=digits", "compressor=lora")
    one_line_error(code, err, "compressor lora adapts a transformer's attention and FFN layers; model LeNet")
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["lora"]), "compressor.r=0")
    one_line_error(code, err, "compressor.r must be > 0")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_lora_run_reports_counts_and_bytes_and_deploys_a_merged_model(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["lora"]), "compressor.qlora=false")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    report = m["compressors"]["lora"]
    assert report["trainable_fraction"] < 0.02 and report["merged_layers"] == 4
    held, full = report["training_bytes"], report["full_finetuning_bytes"]
    assert held["gradients"] == 4 * report["trainable_params"]  # fp32, one per trainable parameter
    assert held["optimizer"] >= 2 * held["gradients"]  # AdamW's two moments (and its step counters)
    assert 0 < report["memory_ratio"] < 1 and full["total"] > held["total"]
    model = torch.load(next((tmp_path / "outputs").rglob("model.pt")), weights_only=True)
    assert not any("lora_" in k or k.startswith("base_model") for k in model)
    assert report["export"]["format"] == "BertForSequenceClassification"
    config = AutoConfig.from_pretrained(report["export"]["path"])
    assert config.architectures == ["BertForSequenceClassification"] and config.num_labels == 2


@pytest.mark.slow  # two smoke runs, about a minute on 2 CPUs
def test_lora_on_an_earlybert_ticket_adapts_the_physically_smaller_model(effml, tmp_path):
    """Composition by pipeline: EarlyBERT's exported ticket (``<run>/model``) is LoRA's frozen base."""
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["earlybert"]))
    assert code == 0, err
    ticket = next((tmp_path / "outputs").rglob("model/config.json")).parent
    smaller = metrics_of(tmp_path / "outputs")["sparsity"]["params_total"]
    setup = [a for a in smoke_args("bert", ["lora"]) if not a.startswith(("model.pretrained", "+model.hf_config"))]
    code, _, err = effml("train", *TINY, *setup, f"model.pretrained={ticket}", "output_root=lora_out")
    assert code == 0, err
    m = metrics_of(tmp_path / "lora_out")
    assert m["compressors"]["lora"]["total_params"] == smaller  # the ticket, not a full-width model
    assert m["compressors"]["lora"]["merged_layers"] == 4
    assert m["compressors"]["lora"]["export"]["format"] == "effml_pruned"  # per-layer widths kept
