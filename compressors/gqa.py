"""Multi-query and grouped-query attention, uptrained from a finished multi-head run.

Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", arXiv 1911.02150: multi-query
attention (MQA), one key/value head shared by every query head, so the decode-time KV cache and its
memory traffic shrink by the number of heads. Ainslie et al., "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints", EMNLP 2023 (arXiv 2305.13245): grouped-query
attention (GQA-G), G key/value heads each shared by a contiguous group of heads/G query heads
(G = 1 is MQA, G = heads is MHA), and §2.1 *uptraining*: convert a finished multi-head checkpoint by
mean-pooling the key and value projection heads of each group (better than keeping the first head of
the group or a random init, their Fig. 5), then train for a fraction α of the original steps
(α = 0.05 in the paper, §3.1).

``groups`` is G, the number of K/V heads. The conversion shrinks each attention's ``k_proj`` and
``v_proj`` and sets ``num_key_value_heads`` in the model's config, so the HF Llama model is the one
``LlamaConfig(num_key_value_heads=G)`` builds: its SDPA call shares the K/V heads (``repeat_kv`` or
SDPA's ``enable_gqa``), its KV cache holds G heads, and ``save_pretrained`` writes a config that
reloads as GQA. ``init_from`` names the finished MHA run (as ``switch_moe`` names the dense run it
upcycles); ``model.pretrained`` pointing at an MHA export works too. The uptraining stage then runs
``uptrain_fraction`` of the steps the recipe's own trainer settings give (the base run's length, when
the uptraining recipe inherits the base recipe, as ``recipes/gqa_lm.yaml`` does). With neither, the
model is a GQA model trained from scratch: the K/V projections are drawn fresh and the run trains for
its full length.

Language models only: a BERT classifier has no decode-time KV cache for GQA to shrink, and HF's
``BertConfig`` has no ``num_key_value_heads`` for an export to reload with (the task check refuses it
in one line).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.registry import COMPRESSORS
from effml.teachers import TrainedWeightsConfig, load_weights, trained_state

WHO = "multi-head model"
CACHE_TOKENS = 64  # the prompt length at which the report measures the KV cache


@dataclass
class GQAConfig(CompressorConfig):
    """GQA uptraining (Ainslie et al. 2023, §2.1): K/V heads mean-pooled into ``groups``, then 5% of
    the original steps. groups=1 is multi-query attention (Shazeer 2019)."""

    name: str = "gqa"
    groups: int = 8  # K/V heads after conversion (the paper's GQA-8); must divide the model's heads
    uptrain_fraction: float = 0.05  # α: uptraining steps as a fraction of the original run's
    lr_scale: float = 1.0  # the uptraining learning rate, relative to trainer.lr
    init_from: TrainedWeightsConfig = field(default_factory=TrainedWeightsConfig)  # the finished MHA run

    def __post_init__(self):
        if self.groups < 1:
            raise EffmlError(f"compressor.groups must be >= 1 (1 is multi-query attention), got {self.groups}")
        if not 0 < self.uptrain_fraction <= 1:
            raise EffmlError(f"compressor.uptrain_fraction must be in (0, 1], got {self.uptrain_fraction}")
        if self.lr_scale <= 0:
            raise EffmlError(f"compressor.lr_scale must be > 0, got {self.lr_scale}")


def llama_of(model: nn.Module) -> nn.Module:
    """The HF Llama model inside effml's CausalLM; one line for any other model."""
    lm = getattr(model, "lm", None)
    if lm is None or not hasattr(getattr(lm, "config", None), "num_key_value_heads"):
        raise EffmlError(f"compressor gqa needs a language model with multi-head attention (model=lm_tiny, "
                         f"lm_small, lm_base); {type(model).__name__} has none")
    return lm


def pool_heads(weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean-pool the heads of a K or V projection (out = heads × head_dim rows) into ``groups`` heads:
    group g averages the contiguous heads g·r … g·r + r − 1 (r = heads / groups), the query heads that
    HF's ``repeat_kv`` will pair with K/V head g."""
    heads = weight.shape[0] // head_dim
    per = heads // groups
    pooled = weight.reshape(groups, per, head_dim, -1).mean(1).reshape(groups * head_dim, -1)
    if bias is not None:
        bias = bias.reshape(groups, per, head_dim).mean(1).reshape(-1)
    return pooled, bias


def pooled_linear(linear: nn.Linear, groups: int, head_dim: int) -> nn.Linear:
    weight, bias = pool_heads(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                              groups, head_dim)
    new = nn.Linear(linear.in_features, weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def convert(model: nn.Module, groups: int) -> int:
    """Turn every attention of ``model`` into GQA with ``groups`` K/V heads, in place, by mean-pooling
    its K/V projection heads; returns the K/V heads it had. One line for groups that do not divide
    the heads (or the K/V heads the model already has: pooling cannot split a head)."""
    lm = llama_of(model)
    config = lm.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % groups:
        raise EffmlError(f"compressor.groups ({groups}) must divide the model's attention heads ({heads})")
    if kv % groups:
        raise EffmlError(f"compressor.groups ({groups}) must divide the model's K/V heads ({kv}): "
                         "mean pooling merges heads, it cannot split them")
    for layer in lm.model.layers:
        attn = layer.self_attn
        attn.k_proj = pooled_linear(attn.k_proj, groups, attn.head_dim)
        attn.v_proj = pooled_linear(attn.v_proj, groups, attn.head_dim)
        attn.num_key_value_groups = heads // groups  # what HF's SDPA call repeats K/V by
    config.num_key_value_heads = groups  # save_pretrained writes it; from_pretrained rebuilds GQA
    return kv


def pool_state(state: dict[str, torch.Tensor], groups: int, head_dim: int) -> dict[str, torch.Tensor]:
    """A multi-head state dict with its K/V projections pooled to ``groups`` heads."""
    pooled = dict(state)
    for key, value in state.items():
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            bias_key = key[: -len("weight")] + "bias"
            pooled[key], bias = pool_heads(value, state.get(bias_key), groups, head_dim)
            if bias is not None:
                pooled[bias_key] = bias
    return pooled


def kv_cache_bytes(model: nn.Module, batch: int = 1, tokens: int = CACHE_TOKENS) -> int:
    """The KV cache of the model after a forward over ``batch`` × ``tokens`` tokens, measured: the
    bytes of every key and value tensor the HF cache holds."""
    from transformers import DynamicCache

    lm = llama_of(model)
    device = next(lm.parameters()).device
    cache = DynamicCache(config=lm.config)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    was_training = lm.training
    with torch.no_grad():
        lm.eval()(input_ids=ids, use_cache=True, **cache_argument(lm, cache))
    lm.train(was_training)
    return cache_bytes(cache)


def cache_argument(lm: nn.Module, cache) -> dict:
    """``cache`` as the keyword this transformers release takes: ``cache`` from 5.2x, ``past_key_values``
    before (5.17 ignores an unknown ``cache=`` silently and decodes without one)."""
    accepts = inspect.signature(lm.forward).parameters
    return {"cache" if "cache" in accepts else "past_key_values": cache}


def cache_bytes(cache) -> int:
    """The bytes of every key and value tensor an HF cache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@COMPRESSORS.register("gqa", GQAConfig)
class GroupedQueryAttention(Compressor):
    """GQA / MQA: K/V heads mean-pooled into groups, then uptraining."""

    smoke = Smoke(setups=("lm",), settings=("groups=1",))
    owns = frozenset({"structure"})  # removes K/V heads; another method's load by name would not fit them
    tasks = ("lm",)

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        report = metrics["compressors"][name]
        if report.get("kv_heads") != report.get("groups"):
            return f"the model does not have groups K/V heads: {report}"
        # both measured: the cache shrinks by exactly the K/V heads removed
        if report["kv_cache_bytes"] * report["kv_heads_before"] != report["kv_cache_bytes_before"] * report["kv_heads"]:
            return f"KV cache not shrunk by kv_heads_before/groups: {report}"
        return None

    def __init__(self, cfg: GQAConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.kv_before = 0
        self.kv_bytes_before = 0  # measured on the model as built, before the conversion
        self.heads = 0
        self.uptrained_from: str | None = None
        self.uptraining = False
        self.base_steps = 0
        self.uptrain_epochs = 1
        self.uptrain_batches: int | None = None  # per epoch of the uptraining stage
        self.current: Stage | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        self.kv_bytes_before = kv_cache_bytes(model)
        self.kv_before = convert(model, self.cfg.groups)
        self.heads = llama_of(model).config.num_attention_heads
        self.model = model
        return model

    def prepare(self, ctx: RunContext, datamodule: Any) -> None:
        if self.cfg.init_from.source != "none":
            self.load_multi_head(ctx, datamodule)
        self.uptraining = self.uptrained_from is not None or getattr(ctx.model, "pretrained", None) is not None
        if not self.uptraining:
            self.fresh_kv()
        else:
            self.plan_uptraining(ctx, datamodule)

    def load_multi_head(self, ctx: RunContext, datamodule: Any) -> None:
        """The finished MHA run's weights, its K/V heads mean-pooled (§2.1)."""
        state, where, _ = trained_state(self.cfg.init_from, ctx.output_root, ctx.seed, datamodule.info, WHO, ctx.data)
        head_dim = self.model.blocks()[0].self_attn.head_dim
        k_rows = next((v.shape[0] for k, v in state.items() if k.endswith("self_attn.k_proj.weight")), None)
        if k_rows != self.kv_before * head_dim:
            raise EffmlError(f"{WHO} in {where} has {k_rows} K projection rows per layer, the model "
                             f"{self.kv_before} heads of {head_dim}: give a run of this recipe's model")
        load_weights(self.model, pool_state(state, self.cfg.groups, head_dim), where, WHO)
        self.uptrained_from = where

    def fresh_kv(self) -> None:
        """Training from scratch: pooled random heads would start with a smaller spread (1/√r), so the
        K/V projections are drawn again with the model's own init."""
        lm = llama_of(self.model)
        for block in self.model.blocks():
            for linear in (block.self_attn.k_proj, block.self_attn.v_proj):
                nn.init.normal_(linear.weight, std=lm.config.initializer_range)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def plan_uptraining(self, ctx: RunContext, datamodule: Any) -> None:
        """α of the steps the recipe's trainer settings give (the original run's length), as whole
        epochs of at most an epoch's batches."""
        batches = len(datamodule.train_dataloader())
        limit = ctx.trainer.limit_train_batches
        if limit is not None:
            batches = min(batches, int(limit)) if limit >= 1 else max(1, int(batches * limit))
        self.base_steps = ctx.trainer.max_epochs * batches
        steps = max(1, round(self.cfg.uptrain_fraction * self.base_steps))
        self.uptrain_epochs = math.ceil(steps / batches)
        self.uptrain_batches = math.ceil(steps / self.uptrain_epochs)

    def stages(self) -> list[Stage]:
        if not self.uptraining:
            return [Stage("train", owner=self.name, role="plain")]
        return [Stage("uptrain", max_epochs=self.uptrain_epochs, owner=self.name, lr_scale=self.cfg.lr_scale)]

    def begin_stage(self, stage: Stage, task) -> None:
        self.current = stage

    def setup(self, trainer, pl_module, stage: str) -> None:
        """The uptraining stage stops after its share of the steps: the batch limit is set before the
        optimizer's schedule reads the stage's length (``estimated_stepping_batches``)."""
        if stage == "fit" and self.uptrain_batches and self.current is not None and self.current.of(self.name, "uptrain"):
            trainer.limit_train_batches = self.uptrain_batches

    def end_stage(self, stage: Stage, record: dict[str, Any]) -> dict[str, Any] | None:
        return {"gqa_steps": record["steps"]} if stage.of(self.name, "uptrain") else None

    def state_dict(self) -> dict[str, Any]:
        return {"uptrained_from": self.uptrained_from}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.uptrained_from = state.get("uptrained_from", self.uptrained_from)

    def report(self) -> dict[str, Any]:
        lm = llama_of(self.model)
        kv_bytes = kv_cache_bytes(self.model)
        return {
            "groups": self.cfg.groups,
            "heads_before": self.heads,
            "kv_heads_before": self.kv_before,
            "kv_heads": lm.config.num_key_value_heads,
            "kv_cache_tokens": CACHE_TOKENS,
            "kv_cache_bytes": kv_bytes,  # measured, one sequence of kv_cache_tokens
            "kv_cache_bytes_before": self.kv_bytes_before,  # the same, measured on the model before conversion
            "uptrained_from": self.uptrained_from,
            "uptrain_fraction": self.cfg.uptrain_fraction if self.uptraining else None,
            "base_steps": self.base_steps or None,
            "uptrain_steps": self.uptrain_epochs * self.uptrain_batches if self.uptraining else None,
        }
