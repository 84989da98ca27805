"""EBERT: dynamic structured pruning of BERT, per input, at inference.

Liu, Li, Li, Cheng, "EBERT: Efficient BERT Inference with Dynamic Structured Pruning", Findings of
ACL 2021 (doi 10.18653/v1/2021.findings-acl.425), §3. Every encoder layer gets two small predictors,
one for its attention heads and one for its FFN channels: ``Linear(hidden → 64) → BatchNorm → ReLU →
Linear(→ heads | channels)``, fed the [CLS] state entering the layer (layer 0: the mean of the token
embeddings, padding left out). Their outputs t become 0/1 masks through a sigmoid-Gumbel gate (§3.2):
in training hard(σ((t + g)/τ)) with logistic noise g and the straight-through gradient of the soft
value; at inference simply t > 0.

- **Phase 1, joint training** (§3.3): BERT and the predictors train together on the task loss plus
  λ_F·(F_c/F_o − C)², the batch's expected FLOPs F_c (of the masked heads and channels) against the
  dense F_o and the target ratio C = ``target_flops_ratio``, plus per-layer sparsity terms
  λ_M·mean_l(ρ^MHA_l − C)² and λ_FFN·mean_l(ρ^FFN_l − C)² (ρ: the share of a layer's heads or channels
  kept), which keep any one layer from being pruned far more than the others. The squared forms are
  our reading of the paper's equations (its text says "minimize the difference"); the official
  ``key_code.py`` was not available offline. The FLOPs and ρ are those of the masks inference will use
  (t > 0, straight through σ(t)), not of the noisy samples the forward trains with: counted on the
  samples, the target was met in training and missed at inference (0.95 of dense kept, measured).
- **Phase 2** (§3.3, "dynamic pruned models don't exercise each head as sufficiently"): after
  ``joint_fraction`` of the steps the predictors are frozen (no gradient, BatchNorm statistics fixed,
  deterministic masks) and BERT alone trains on.
- **Inference that skips** (``finalize``): the model becomes ``SkippingBert``, which for each sample
  gathers only its kept heads' Q/K/V rows and output-projection columns and its kept FFN channels
  (``index_select`` on the weights) and computes with those smaller matrices; nothing is multiplied by
  zero. Its logits equal the masked model's (tests/test_ebert.py). ``finalize`` also measures, on the
  validation set, the FLOPs actually realised (from every sample's masks, the encoder's FLOPs; and
  counted by ``torch.utils.flop_counter`` on the skipping and the dense model over ``flops_batches``
  batches, the predictors included), the paper's mask analysis (§5: the share of heads and channels always on,
  always off, input-dependent), and the latency at batch 1 and 32 against the dense model and
  against a static structured ticket of the same average width (the heads and channels EBERT keeps
  most often, removed physically through ``effml.models.bert_surgery``).

The masks are per sample, so a batch runs sample by sample: whether the smaller matrices pay for the
loop is measured on the run's device, not assumed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml import measure
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.models import bert_surgery as surgery
from effml.registry import COMPRESSORS
from effml.task import move_to_own_group, split_batch

PREDICTORS = "ebert_predictors"  # the attribute (and state-dict prefix) of the predictors on the model
LATENCY_BATCHES = (1, 32)


@dataclass
class EBERTConfig(CompressorConfig):
    """EBERT (Liu et al., Findings of ACL 2021): per-input head and FFN-channel masks from small
    predictors, trained jointly towards 60% of dense FLOPs, then BERT alone with the predictors frozen."""

    name: str = "ebert"
    target_flops_ratio: float = 0.6  # C: the FLOPs kept, as a fraction of dense (the paper's main setting)
    predictor_width: int = 64  # the predictors' hidden width (the paper's Linear(hidden → 64))
    tau: float = 1.0  # the sigmoid-Gumbel temperature
    gate_init: float = 2.0  # every gate's initial logit: σ(2) ≈ 0.88, so the pre-trained model starts near dense
    flops_weight: float = 10.0  # λ_F on (F_c/F_o − C)²
    mha_weight: float = 1.0  # λ_M on the per-layer head-sparsity term
    ffn_weight: float = 1.0  # λ_FFN on the per-layer channel-sparsity term
    # the predictors' own learning rate, no weight decay (they start from random weights; at 1e-3 a
    # MiniLM run's 19 joint steps left the FLOPs loss where it began, ~0.95 of dense against 0.6)
    predictor_lr: float = 1e-2
    joint_fraction: float = 0.5  # the share of training steps in phase 1; the rest is phase 2
    stats_batches: int | None = None  # validation batches for the mask statistics; None: all
    flops_batches: int = 2  # of them, the batches the skipping model is checked and its FLOPs counted on

    def __post_init__(self):
        if not 0 < self.target_flops_ratio <= 1:
            raise EffmlError(f"compressor.target_flops_ratio must be in (0, 1]; got {self.target_flops_ratio}")
        if not 0 < self.joint_fraction <= 1:
            raise EffmlError(f"compressor.joint_fraction must be in (0, 1]; got {self.joint_fraction}")
        for name in ("predictor_width", "stats_batches", "flops_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {value}")
        for name in ("tau", "predictor_lr"):
            if getattr(self, name) <= 0:
                raise EffmlError(f"compressor.{name} must be > 0; got {getattr(self, name)}")
        for name in ("flops_weight", "mha_weight", "ffn_weight"):
            if getattr(self, name) < 0:
                raise EffmlError(f"compressor.{name} must be >= 0; got {getattr(self, name)}")


# -- the predictors --------------------------------------------------------------------------
class Predictor(nn.Module):
    """Linear(hidden → width) → BatchNorm → ReLU → Linear(→ outputs): one gate logit per output."""

    def __init__(self, hidden: int, width: int, outputs: int, gate_init: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, outputs)
        nn.init.normal_(self.fc2.weight, std=0.01)  # small: every gate starts near gate_init
        nn.init.constant_(self.fc2.bias, gate_init)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        # a training batch of one has no batch statistics: use the running ones for it
        use_batch = self.bn.training and h.shape[0] > 1
        h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                         use_batch, self.bn.momentum, self.bn.eps)
        return self.fc2(F.relu(h))


class Predictors(nn.Module):
    """Each layer's head predictor and FFN-channel predictor."""

    def __init__(self, layers: list[nn.Module], hidden: int, width: int, gate_init: float):
        super().__init__()
        self.heads = nn.ModuleList(Predictor(hidden, width, surgery.num_heads(layer), gate_init) for layer in layers)
        self.ffn = nn.ModuleList(Predictor(hidden, width, surgery.ffn_width(layer), gate_init) for layer in layers)


def summary(hidden: Tensor, index: int, padding: Tensor | None) -> Tensor:
    """What layer ``index``'s predictors see: the [CLS] state, or in layer 0 the mean over real tokens."""
    if index:
        return hidden[:, 0]
    if padding is None:
        return hidden.mean(1)
    weights = padding.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def gumbel_gate(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """Hard 0/1 samples of σ((t + g)/τ) with logistic noise g, straight-through the soft value."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits.device, logits.dtype)
    soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return (soft - soft.detach()) + hard  # exactly hard forward (the difference is 0), soft backward


def inference_gate(logits: Tensor) -> Tensor:
    """The mask inference uses, t > 0, with the gradient of σ(t) (straight through)."""
    soft = torch.sigmoid(logits)
    return (soft - soft.detach()) + (logits > 0).to(logits.dtype)


def unit_flops(layer: nn.Module, tokens: int) -> tuple[int, int]:
    """FLOPs one sample of ``tokens`` tokens spends per attention head (Q/K/V and output projections,
    scores and weighted sum) and per FFN channel (up and down projection); a multiply-add is 2."""
    hidden, d = layer.attention.self.query.in_features, surgery.head_size(layer)
    per_head = 2 * tokens * hidden * d * 4 + 2 * 2 * tokens * tokens * d
    per_channel = 2 * 2 * tokens * hidden
    return per_head, per_channel


def flops_ratio(layers: list[nn.Module], masks: list[tuple[Tensor, Tensor]], tokens: int) -> Tensor:
    """Each sample's encoder FLOPs under its masks, as a fraction of the dense encoder's."""
    kept, dense = 0, 0
    for layer, (heads, ffn) in zip(layers, masks, strict=True):
        per_head, per_channel = unit_flops(layer, tokens)
        kept = kept + heads.sum(-1) * per_head + ffn.sum(-1) * per_channel
        dense += heads.shape[-1] * per_head + ffn.shape[-1] * per_channel
    return kept / dense


# -- inference that skips --------------------------------------------------------------------
def _rows(heads: Tensor, size: int) -> Tensor:
    """The Q/K/V rows (output-projection columns) of the kept heads."""
    kept = heads.nonzero().flatten()
    return (kept[:, None] * size + torch.arange(size, device=heads.device)).flatten()


def skip_layer(layer: nn.Module, x: Tensor, keys: Tensor, heads: Tensor, channels: Tensor) -> Tensor:
    """One BERT layer on one sample (tokens × hidden) with only its kept heads and FFN channels:
    smaller matrices gathered from the weights, the pruned ones never touched."""
    attention, out = layer.attention.self, layer.attention.output
    size = surgery.head_size(layer)
    rows = _rows(heads, size)
    if rows.numel():
        q, k, v = (F.linear(x, m.weight.index_select(0, rows), m.bias.index_select(0, rows))
                   .unflatten(-1, (-1, size)).transpose(0, 1) for m in (attention.query, attention.key, attention.value))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[None, :]).transpose(0, 1).flatten(1)
        projected = F.linear(context, out.dense.weight.index_select(1, rows), out.dense.bias)
    else:  # every head pruned: the projection of nothing is its bias
        projected = torch.zeros_like(x) + out.dense.bias  # not a view of the bias: hooks need a grad_fn
    x = out.LayerNorm(out.dropout(projected) + x)
    kept = channels.nonzero().flatten()
    up, down = layer.intermediate.dense, layer.output.dense
    if kept.numel():
        inner = layer.intermediate.intermediate_act_fn(
            F.linear(x, up.weight.index_select(0, kept), up.bias.index_select(0, kept)))
        projected = F.linear(inner, down.weight.index_select(1, kept), down.bias)
    else:
        projected = torch.zeros_like(x) + down.bias
    return layer.output.LayerNorm(layer.output.dropout(projected) + x)


class SkippingBert(nn.Module):
    """A trained EBERT classifier that really skips: per sample, per layer, the predictors decide and
    only the kept heads and channels are computed. Its modules (and state-dict keys) are the
    trained ``BertClassifier``'s with the predictors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert, self.dropout, self.classifier = model.bert, model.dropout, model.classifier
        setattr(self, PREDICTORS, getattr(model, PREDICTORS))
        self.last_masks: list[tuple[Tensor, Tensor]] = []  # the last forward's, for the mask statistics

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.bert.embeddings(input_ids=input_ids, **extra)
        keys, predictors = attention_mask.bool(), getattr(self, PREDICTORS)
        self.last_masks = []
        for index, layer in enumerate(self.bert.encoder.layer):
            seen = summary(hidden, index, attention_mask)
            heads, channels = predictors.heads[index](seen) > 0, predictors.ffn[index](seen) > 0
            self.last_masks.append((heads, channels))
            hidden = torch.stack([skip_layer(layer, hidden[b], keys[b], heads[b], channels[b])
                                  for b in range(hidden.shape[0])])
        pooler = getattr(self.bert, "pooler", None)
        pooled = pooler(hidden) if pooler is not None else hidden[:, 0]
        return self.classifier(self.dropout(pooled))


# -- the compressor --------------------------------------------------------------------------
@COMPRESSORS.register("ebert", EBERTConfig)
class EBERT(Compressor):
    """Per-input head and FFN-channel masks (Liu et al. 2021): joint training, then BERT alone."""

    smoke = Smoke(("bert",), ("gate_init=0.0",))  # half the gates closed from the start: the skip path works
    owns = frozenset({"modules", "gathered inference"})  # the predictors; SkippingBert

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        r = metrics["compressors"][name]
        if r["skip_max_abs_diff"] is None or r["skip_max_abs_diff"] > 1e-3:
            return f"the skipping model's logits differ from the masked model's: {r['skip_max_abs_diff']}"
        if not 0 < r["flops_ratio_encoder"] <= 1:
            return f"realised encoder FLOPs ratio out of (0, 1]: {r['flops_ratio_encoder']}"
        return None

    def __init__(self, cfg: EBERTConfig):
        super().__init__(cfg)
        self.layers: list[nn.Module] = []
        self.predictors: Predictors | None = None
        self.generator = torch.Generator()
        self.handles: list[Any] = []
        self.padding: Tensor | None = None  # the current forward's attention mask (batch × tokens)
        self.masks: list[tuple[Tensor, Tensor] | None] = []  # the current forward's, per layer
        self.counted: list[tuple[Tensor, Tensor] | None] = []  # the same forward's inference masks, for the losses
        self.tokens = 0
        self.mine = False  # inside this compressor's own stage
        self.switch_step: int | None = None  # the first step of phase 2
        self.frozen = False
        self.last_train_ratio: Tensor | None = None  # the expected FLOPs ratio of the last phase-1 batch
        self.ctx: RunContext | None = None
        self.datamodule = None
        self.results: dict[str, Any] = {}
        self.kept_frequency: list[list[Tensor]] | None = None  # per layer: how often each head, channel was kept

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("train", owner=self.name)]

    def attach(self, model: nn.Module) -> nn.Module:
        self.layers = surgery.encoder_layers(model, self.name)  # one line for a non-transformer model
        self.generator.manual_seed(int(torch.randint(2**31 - 1, ())))  # from the run's seeded RNG
        hidden = self.layers[0].attention.self.query.in_features
        self.predictors = Predictors(self.layers, hidden, self.cfg.predictor_width, self.cfg.gate_init)
        setattr(model, PREDICTORS, self.predictors)  # trained, checkpointed and moved with the model
        self.masks = [None] * len(self.layers)
        self.counted = [None] * len(self.layers)
        self.handles = [model.register_forward_pre_hook(self._capture_padding, with_kwargs=True)]
        for index, layer in enumerate(self.layers):
            self.handles += [
                layer.register_forward_pre_hook(self._predictor_hook(index), with_kwargs=True),
                layer.attention.output.dense.register_forward_pre_hook(self._head_hook(index)),
                layer.intermediate.register_forward_hook(self._channel_hook(index)),
            ]
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.ctx, self.datamodule = ctx, datamodule

    def begin_stage(self, stage: Stage, task) -> None:
        self.mine = stage.of(self.name)
        if not getattr(task, "_ebert_grouped", False):  # one task serves every stage: wrap once
            task.configure_optimizers = predictors_in_own_group(task, self.cfg.predictor_lr)
            task._ebert_grouped = True

    def on_train_start(self, trainer, pl_module) -> None:
        if self.mine:
            total = max(1, int(trainer.estimated_stepping_batches))
            self.switch_step = math.ceil(self.cfg.joint_fraction * total)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mine and self.switch_step is not None and trainer.global_step >= self.switch_step:
            self.frozen = True
        if self.frozen:  # Lightning sets train() on the whole model every epoch: keep BN's statistics fixed
            self.predictors.requires_grad_(False).eval()

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if self.frozen or not task.training or any(m is None for m in self.counted):
            return None
        # the losses count the masks inference will use (t > 0), not the noisy training samples: counted
        # on the samples, a MiniLM run met 0.645 of dense FLOPs in training and kept 0.947 at inference
        # (logits just above 0, switched off by the noise 40% of the time)
        target, masks = self.cfg.target_flops_ratio, self.counted
        ratio = flops_ratio(self.layers, masks, self.tokens).mean()
        self.last_train_ratio = ratio.detach()
        heads = torch.stack([(h.mean() - target).square() for h, _ in masks]).mean()
        channels = torch.stack([(c.mean() - target).square() for _, c in masks]).mean()
        return (self.cfg.flops_weight * (ratio - target).square() + self.cfg.mha_weight * heads
                + self.cfg.ffn_weight * channels)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "frozen": self.frozen, "switch_step": self.switch_step}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.frozen, self.switch_step = state["frozen"], state["switch_step"]
        if self.frozen:
            self.predictors.requires_grad_(False)

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        """The skipping model, checked against the masked one and measured on validation data."""
        model.eval()
        batches = self._validation_batches()
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        with torch.no_grad():
            # the masks' statistics from the batched masked model (the same decisions, one pass each)
            self.results = self._mask_statistics(model, batches)
            masked = [model(**b) for b in batches[: self.cfg.flops_batches]]
            for handle in self.handles:  # from here `model` is the dense model with the same weights
                handle.remove()
            self.handles = []
            skipping = SkippingBert(model).eval()
            skipped = [skipping(**b) for b in batches[: self.cfg.flops_batches]]
        self.results["skip_max_abs_diff"] = max(
            (float((a - b).abs().max()) for a, b in zip(skipped, masked, strict=True)), default=None)
        self.results["flops_ratio"] = counted_ratio(model, skipping, batches[: self.cfg.flops_batches])
        self.results["latency"] = self._latency(model, skipping, hardware)
        delattr(model, PREDICTORS)  # the dense view no longer carries them; the skipping model does
        return skipping

    def report(self) -> dict:
        return {
            "target_flops_ratio": self.cfg.target_flops_ratio,
            "joint_steps": self.switch_step,
            "predictors_frozen": self.frozen,
            "train_flops_ratio": None if self.last_train_ratio is None else round(float(self.last_train_ratio), 4),
            **self.results,
        }

    # -- the hooks of the masked (training) model -----------------------------------------
    def _capture_padding(self, module, args, kwargs):
        self.padding = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def _predictor_hook(self, index: int):
        def predict(layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen = summary(hidden, index, self.padding)
            stochastic = self.predictors.training and not self.frozen
            masks, counted = [], []
            for predictor in (self.predictors.heads[index], self.predictors.ffn[index]):
                logits = predictor(seen)
                masks.append(gumbel_gate(logits, self.cfg.tau, self.generator) if stochastic
                             else (logits > 0).to(logits.dtype))
                counted.append(inference_gate(logits))
            self.masks[index] = (masks[0], masks[1])
            self.counted[index] = (counted[0], counted[1])
            if index == 0:
                self.tokens = hidden.shape[1]
        return predict

    def _head_hook(self, index: int):
        def scale_heads(module, args):  # the context (batch, tokens, heads·size) before the output projection
            (context,) = args
            heads = self.masks[index][0]
            return (context.unflatten(-1, (heads.shape[-1], -1)) * heads.to(context.dtype)[:, None, :, None]).flatten(-2),
        return scale_heads

    def _channel_hook(self, index: int):
        def scale_channels(module, args, output):
            return output * self.masks[index][1].to(output.dtype)[:, None, :]
        return scale_channels

    # -- measurements after training ----------------------------------------------------------
    def _validation_batches(self) -> list[dict]:
        """The validation inputs the statistics cover: ``stats_batches``, else the run's
        ``trainer.limit_val_batches`` (a count), else all of them."""
        if self.datamodule is None:
            return []
        limit = self.cfg.stats_batches
        if limit is None and self.ctx is not None:
            run_limit = getattr(self.ctx.trainer, "limit_val_batches", None)
            limit = int(run_limit) if run_limit is not None and run_limit >= 1 else None
        batches = []
        for batch in self.datamodule.val_dataloader():
            batches.append(split_batch(batch)[0])
            if limit is not None and len(batches) >= limit:
                break
        return batches

    def _mask_statistics(self, model: nn.Module, batches: list[dict]) -> dict:
        """Over ``batches``: each sample's encoder FLOPs ratio under its masks (mean), and how often
        each head and channel was kept (the paper's always on / always off / input-dependent)."""
        ratio, samples, kept = 0.0, 0, None
        for inputs in batches:
            model(**inputs)
            ratio += float(flops_ratio(self.layers, self.masks, self.tokens).sum())
            samples += inputs["input_ids"].shape[0]
            counts = [[h.sum(0).cpu(), c.sum(0).cpu()] for h, c in self.masks]
            kept = counts if kept is None else [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(kept, counts, strict=True)]
        if not samples:
            return {"flops_ratio_encoder": None, "stats_samples": 0, "masks": None}
        self.kept_frequency = [[k / samples for k in layer] for layer in kept]
        return {
            "flops_ratio_encoder": round(ratio / samples, 4),
            "stats_samples": samples,
            "masks": {kind: mask_statistics([layer[i] for layer in self.kept_frequency])
                      for i, kind in enumerate(("heads", "ffn"))},
        }

    def _latency(self, dense: nn.Module, skipping: SkippingBert, hardware) -> dict | None:
        """Dense, EBERT and a static ticket of EBERT's average widths, timed interleaved at batch 1
        (one real sentence, unpadded) and batch 32 (real sentences padded to the longest)."""
        if self.datamodule is None or self.ctx is None or not self.ctx.measure.enabled \
                or self.kept_frequency is None:
            return None
        models = {"dense": dense, "ebert": skipping}
        try:
            static = static_ticket(dense, self.kept_frequency, getattr(hardware, "channel_multiple", 1))
            models["static"] = static.model
            result = {"static_ticket": static.structure}
        except (TypeError, RuntimeError) as err:  # a composed method's hooks that do not copy (movement's)
            result = {"static_ticket": None, "static_skipped": f"{type(err).__name__}: {err}"}
        val = self.datamodule.splits["val"]
        device = "cuda" if getattr(hardware, "accelerator", "cpu") == "gpu" and torch.cuda.is_available() else "cpu"
        m = self.ctx.measure
        for size in LATENCY_BATCHES:
            inputs = self.datamodule.collate([val[i % len(val)] for i in range(size)])
            inputs.pop("labels")
            timed = measure.compare_models(models, inputs, device, warmup=m.warmup, iters=m.iters,
                                           min_time_s=m.min_time_s, max_time_s=30.0)  # a loaded CPU is slow
            ms = {k: round(v["latency_ms"], 3) for k, v in timed.items()}
            result[f"batch_{size}"] = {**{f"{k}_ms": v for k, v in ms.items()},
                                       "speedup_vs_dense": round(ms["dense"] / ms["ebert"], 3)}
            if "static" in ms:
                result[f"batch_{size}"]["speedup_vs_static"] = round(ms["static"] / ms["ebert"], 3)
        result["device"] = timed["dense"]["device_name"]
        return result


@dataclass
class StaticTicket:
    model: nn.Module
    structure: dict[str, Any]


def static_ticket(dense: nn.Module, frequency: list[list[Tensor]], multiple: int) -> StaticTicket:
    """A physically smaller copy of ``dense`` that keeps, per layer, as many heads and channels as
    EBERT keeps on average (rounded; widths to the hardware's multiple), the most often kept ones."""
    ticket = copy.deepcopy(dense)
    if hasattr(ticket, PREDICTORS):
        delattr(ticket, PREDICTORS)
    heads, channels = [], []
    for layer, (head_freq, channel_freq) in zip(surgery.encoder_layers(ticket, "ebert"), frequency, strict=True):
        n_heads = surgery.round_up(max(1, round(float(head_freq.sum()))), multiple, surgery.head_size(layer),
                                   head_freq.numel())
        n_channels = surgery.round_up(max(1, round(float(channel_freq.sum()))), multiple, 1, channel_freq.numel())
        heads.append(surgery.top_indices(head_freq, n_heads))
        channels.append(surgery.top_indices(channel_freq, n_channels))
    surgery.shrink(ticket, heads, channels, "ebert")
    return StaticTicket(ticket.eval(), {"heads_per_layer": [len(h) for h in heads],
                                        "ffn_per_layer": [len(c) for c in channels]})


def counted_ratio(dense: nn.Module, skipping: SkippingBert, batches: list[dict]) -> float | None:
    """FLOPs of the skipping model (predictors included) over the dense model's, counted by
    ``torch.utils.flop_counter`` on the same batches."""
    if not batches:
        return None
    counted = [sum(measure.count_flops(m, b)["total"] for b in batches) for m in (skipping, dense)]
    return round(counted[0] / counted[1], 4)


def mask_statistics(frequency: list[Tensor]) -> dict[str, Any]:
    """The paper's §5 analysis: of all units (heads or channels), the share kept for every sample,
    for none, and for some (input-dependent); and the mean share kept, overall and per layer."""
    flat = torch.cat(frequency)
    return {
        "always_on": round(float((flat == 1).float().mean()), 4),
        "always_off": round(float((flat == 0).float().mean()), 4),
        "input_dependent": round(float(((flat > 0) & (flat < 1)).float().mean()), 4),
        "mean_kept": round(float(flat.mean()), 4),
        "kept_per_layer": [round(float(f.mean()), 4) for f in frequency],
    }


def predictors_in_own_group(task, base_lr: float):
    """The task's ``configure_optimizers`` with the predictors in a parameter group of their own: their
    own learning rate (times the stage's ``lr_scale``), no weight decay, on the same lr schedule.
    Set before the fit, so a resumed optimizer's state loads into groups of the same shape."""
    original = task.configure_optimizers

    def configure_optimizers():
        configured = original()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        predictors = getattr(task.model, PREDICTORS, None)
        if predictors is None:
            return configured
        # a composed method's own groups keep theirs (movement's scores, also on the predictors' layers)
        elsewhere = {id(p) for g in optimizer.param_groups[1:] for p in g["params"]}
        mine = [p for n, p in predictors.named_parameters()
                if id(p) not in elsewhere and not n.endswith("mask_scores")]
        move_to_own_group(configured, mine, base_lr * task.lr_scale)
        return configured

    return configure_optimizers
