"""Decoder-only transformer language models, as transformers' own Llama classes.

Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", arXiv 2302.13971, §2.2:
pre-normalization (RMSNorm before attention and FFN), SwiGLU FFN, rotary position embeddings. Built
randomly initialised from a small ``LlamaConfig`` (``model=lm_tiny | lm_small | lm_base``), with
SDPA attention, so the hardware's SDPA backends apply and a finished run exports with
``save_pretrained`` into ``<run>/model`` and reloads with ``from_pretrained``
(``model.pretrained=<that folder>``). The vocabulary is the dataset's tokenizer's
(``DataInfo.num_classes``); the input and output embeddings are tied, as in GPT-2.

``forward(input_ids)`` returns next-token logits (batch, sequence, vocabulary): the language-modelling
task (``effml.task.LanguageModelTask``) shifts nothing, since the corpus's labels are the next tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models import efficient_attention as ea
from effml.models._common import check_positive
from effml.models.switch import SwitchFFN
from effml.paths import atomic_write_text
from effml.registry import MODELS

SWITCH_FILE = "switch.json"  # beside an export whose blocks hold Switch layers (compressors/switch_moe.py)
ATTENTION_FILE = "attention.json"  # beside an export whose attention is a variant (compressors/attention.py)


@dataclass
class CausalLMConfig:
    name: str = "causal_lm"
    hidden: int = 128  # model width
    layers: int = 4
    heads: int = 4  # hidden must be a multiple
    kv_heads: int | None = None  # grouped-query attention (None: as many as heads)
    ffn: int = 512  # SwiGLU intermediate width
    dropout: float = 0.0  # attention dropout (Llama has no other)
    max_positions: int = 2048
    rope_theta: float = 10000.0
    init_std: float = 0.02
    pretrained: str | None = None  # a folder written by save_pretrained (a finished run's <run>/model)

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "ffn", "max_positions"):
            check_positive(f"model.{name}", getattr(self, name))
        if self.hidden % self.heads:
            raise EffmlError(f"model.hidden ({self.hidden}) must be a multiple of model.heads ({self.heads})")
        if self.kv_heads is not None and (self.kv_heads <= 0 or self.heads % self.kv_heads):
            raise EffmlError(f"model.kv_heads must divide model.heads ({self.heads}), got {self.kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise EffmlError(f"model.dropout must be in [0, 1), got {self.dropout}")


@MODELS.register("causal_lm", CausalLMConfig)
class CausalLM(nn.Module):
    """A Llama-style decoder (transformers' ``LlamaForCausalLM``) for next-token prediction."""

    task = "lm"

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm  # transformers' LlamaForCausalLM: lm.model.layers[i].mlp is the FFN

    @classmethod
    def from_config(cls, cfg: CausalLMConfig, info: DataInfo) -> CausalLM:
        if info.task != "lm":
            raise EffmlError(f"model {cfg.name} is a language model and needs a language-modelling dataset "
                             f"(data=embedded_english), got a {info.task} dataset")
        from transformers import LlamaConfig, LlamaForCausalLM

        if cfg.pretrained is not None:
            return cls(load_exported(cfg.pretrained, info.num_classes))
        config = LlamaConfig(
            vocab_size=info.num_classes, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads or cfg.heads, max_position_embeddings=cfg.max_positions,
            rope_theta=cfg.rope_theta, attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
            tie_word_embeddings=True, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        return cls(LlamaForCausalLM(config).train())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def blocks(self) -> list[nn.Module]:
        """The decoder layers, each with ``.mlp`` (the FFN) and ``.self_attn``."""
        return list(self.lm.model.layers)

    def save_pretrained(self, folder: str | Path, tokenizer=None) -> None:
        """transformers' export (config.json, model.safetensors), plus the tokenizer when given, and
        ``switch.json`` naming the blocks whose FFN is a Switch layer and ``attention.json`` those whose attention
        is an efficient variant (``load_exported`` rebuilds both)."""
        self.lm.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        experts = {i: switch_options(block.mlp) for i, block in enumerate(self.blocks()) if isinstance(block.mlp, SwitchFFN)}
        if experts:
            atomic_write_text(Path(folder, SWITCH_FILE), json.dumps(experts, indent=1))
        variants = {i: ea.describe(block.self_attn.effml_attention) for i, block in enumerate(self.blocks())
                    if hasattr(block.self_attn, "effml_attention")}
        if variants:
            atomic_write_text(Path(folder, ATTENTION_FILE), json.dumps(variants, indent=1))


def load_exported(folder: str, vocab_size: int) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if not Path(folder, "config.json").is_file():
        raise EffmlError(f"model.pretrained={folder} is not a saved language model (no config.json); "
                         "give a finished run's model/ folder")
    switch, attention = Path(folder, SWITCH_FILE), Path(folder, ATTENTION_FILE)
    if switch.is_file() or attention.is_file():  # the layers first, then the weights, all of which then have a place
        lm = LlamaForCausalLM(LlamaConfig.from_pretrained(folder, attn_implementation="sdpa"))
        for i, options in (json.loads(switch.read_text()) if switch.is_file() else {}).items():
            block = lm.model.layers[int(i)]
            block.mlp = SwitchFFN.from_dense(block.mlp, upcycle=False, **options)
        for i, description in (json.loads(attention.read_text()) if attention.is_file() else {}).items():
            ea.install(lm.model.layers[int(i)].self_attn, ea.rebuild(description))
        missing, unexpected = lm.load_state_dict(load_file(Path(folder, "model.safetensors")), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embedding: saved once
            raise EffmlError(f"{folder} does not fit its {SWITCH_FILE} / {ATTENTION_FILE}: "
                             f"{(unexpected or sorted(missing))[0]}")
        lm.tie_weights()
    else:
        lm = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    if lm.config.vocab_size != vocab_size:
        raise EffmlError(f"{folder} has a vocabulary of {lm.config.vocab_size} tokens, the dataset's tokenizer "
                         f"{vocab_size}; train on the data it was trained on")
    return lm.train()


def switch_options(layer: SwitchFFN) -> dict:
    """The keywords that rebuild ``layer`` with ``SwitchFFN.from_dense`` (weights aside)."""
    return {"num_experts": layer.num_experts, "top_k": layer.top_k, "capacity_factor": layer.capacity_factor,
            "eval_capacity_factor": layer.eval_capacity_factor, "jitter_eps": layer.jitter_eps,
            "router_dtype": layer.router_dtype, "aux_loss_coef": layer.aux_loss_coef,
            "z_loss_coef": layer.z_loss_coef, "expert_dropout": layer.expert_dropout.p,
            "init_scale": layer.init_scale, "dispatch": layer.dispatch}
