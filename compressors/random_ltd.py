"""Random-LTD: random and layerwise token dropping in the middle layers of a language model.

Yao, Wu, Li, Youn, He, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient Training for
Large-scale Transformers", NeurIPS 2022 (arXiv 2211.11586); DeepSpeed's data efficiency library.
- §3.1: in training, each middle layer (every layer but the first and the last, which see all tokens)
  processes a random subset of the sequence, drawn anew per layer and per sample, with no scoring; the
  dropped tokens bypass the layer (their hidden states pass through unchanged) and are put back in their
  original places. The kept indices are sorted, so a causal model keeps its causal order, and the
  attention mask, the rotary position embeddings (cos/sin of each kept token's own position) and the
  position ids are gathered for the kept tokens too (DeepSpeed's ``gpt_sample_tokens`` and
  ``GatherTokens``/``ScatterTokens``).
- §3.2 MSLG, monotonic sequence length growth: the kept count grows linearly from ``start`` to the full
  length over ``ramp_steps`` (in multiples of ``step_size``; DeepSpeed's ``fixed_linear`` schedule with
  ``min_value``, ``require_steps``, ``seq_per_step``). The paper's GPT-3 runs keep 128 of 2048 tokens at
  first (1/16) and reach the full length after about 2/3 of training; those are the defaults here.
- Evaluation sees every token in every layer.

What the run reports: the layer-tokens (tokens × layers) trained, their share saved against processing
every token in every layer (the paper's LayerToken saving: 33.3% for GPT-3 1.3B), and the schedule. The
measured wall-clock time is the run's ``train_time_s``: the paper stresses that a LayerToken saving is
not a time saving one for one (its GPT-3 1.3B saved 25.6% of the time).

The dropping is a forward pre-hook and a forward hook on each dropped layer: the model's modules and
parameter names do not change (checkpoints, ``save_pretrained`` and every other compressor see the same
model), and ``finalize`` removes them. The draws come from a generator seeded by (run seed, stage,
global step, layer), and the counters are the compressor's state, so a resumed run drops the same tokens
and reports the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from effml.compressors._token_schedule import (
    check_positive,
    check_start,
    ramp_length,
    resolve_ramp,
    run_steps,
)
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.registry import COMPRESSORS

DEFAULT_START_FRACTION = 1 / 16  # 128 of 2048 tokens (the paper's GPT-3)
DEFAULT_RAMP_FRACTION = 2 / 3  # the kept length reaches the full length after 2/3 of training


@dataclass
class RandomLTDConfig(CompressorConfig):
    """Random-LTD (Yao et al., NeurIPS 2022): the middle layers train on a random subset of the tokens,
    growing linearly from 1/16 of the sequence to all of it over 2/3 of the run, in steps of 16."""

    name: str = "random_ltd"
    start: int | None = None  # kept tokens at step 0; None: 1/16 of data.seq_len (at least step_size)
    step_size: int = 16  # the kept count is a multiple of this (DeepSpeed's seq_per_step)
    ramp_steps: int | None = None  # steps until every token is kept; None: 2/3 of the training steps
    layers: list[int] | None = None  # decoder layers that drop tokens; None: all but the first and last

    def __post_init__(self):
        check_positive(self, "start", "step_size", "ramp_steps")
        if self.layers is not None and (not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers)):
            raise EffmlError(f"compressor.layers must be distinct layer indices >= 0, got {list(self.layers)}")


def keep_indices(batch: int, length: int, keep: int, generator: torch.Generator, device) -> Tensor:
    """``keep`` distinct positions of each sample, drawn uniformly, sorted (the causal order): (batch, keep)."""
    scores = torch.rand(batch, length, generator=generator, device=generator.device).to(device)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` along dim 1; ``x`` may have batch size 1 (shared cos/sin), broadcast first."""
    x = x.expand(index.shape[0], *x.shape[1:])
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


def gather_mask(mask: Tensor, index: Tensor) -> Tensor:
    """A (batch or 1, heads or 1, query, key) attention mask restricted to the kept queries and keys."""
    mask = mask.expand(index.shape[0], *mask.shape[1:])
    b, h, k = mask.shape[0], mask.shape[1], index.shape[1]
    rows = mask.gather(2, index[:, None, :, None].expand(b, h, k, mask.shape[3]))
    return rows.gather(3, index[:, None, None, :].expand(b, h, k, k))


def scatter_tokens(full: Tensor, kept: Tensor, index: Tensor) -> Tensor:
    """``full`` with each sample's kept positions replaced by the layer's outputs: the dropped tokens
    bypass the layer, and every token is back in its own place."""
    return full.scatter(1, index[..., None].expand(*index.shape, full.shape[-1]), kept)


def drop_inputs(args: tuple, kwargs: dict, index: Tensor) -> tuple[tuple, dict]:
    """A Llama decoder layer's inputs for the kept tokens only: the hidden states, the rotary cos/sin,
    the position ids and the attention mask (None stays None: SDPA's causal mask over the sorted kept
    tokens is the causal order among them)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    kwargs = dict(kwargs)
    if kwargs.get("position_embeddings") is not None:
        kwargs["position_embeddings"] = tuple(gather_tokens(t, index) for t in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = gather_tokens(kwargs["position_ids"], index)
    if isinstance(kwargs.get("attention_mask"), Tensor):
        kwargs["attention_mask"] = gather_mask(kwargs["attention_mask"], index)
    kept = gather_tokens(hidden, index)
    if args:
        return (kept, *args[1:]), kwargs
    kwargs["hidden_states"] = kept
    return args, kwargs


class TokenDropper:
    """The hooks of one dropped layer: gather the kept tokens before it, scatter its output back after."""

    def __init__(self, owner: RandomLTD, layer_index: int):
        self.owner, self.layer_index = owner, layer_index
        self.pending: tuple[Tensor, Tensor] | None = None  # (the full hidden states, the kept indices)

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = self.owner.draw(self.layer_index, hidden, module.training)
        if index is None:
            return None
        self.pending = (hidden, index)
        return drop_inputs(args, kwargs, index)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.pending is None:
            return None
        (full, index), self.pending = self.pending, None
        if isinstance(output, tuple):
            return (scatter_tokens(full, output[0], index), *output[1:])
        return scatter_tokens(full, output, index)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    blocks = model.blocks() if hasattr(model, "blocks") else None
    if not blocks or not hasattr(blocks[0], "self_attn"):
        raise EffmlError(f"compressor random_ltd drops tokens in a language model's decoder layers (model=lm_tiny, "
                         f"lm_small, lm_base); {type(model).__name__} has none")
    return blocks


@COMPRESSORS.register("random_ltd", RandomLTDConfig)
class RandomLTD(Compressor):
    """Random-LTD: random, layerwise token dropping with monotonic sequence length growth."""

    smoke = Smoke(setups=("lm",), settings=("layers=[1]", "start=8", "step_size=8", "ramp_steps=8"))
    owns = frozenset({"token dropping"})
    tasks = ("lm",)

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        report = metrics["compressors"][name]
        if not 0 < report["layer_tokens_saved_pct"] < 100:
            return f"no layer-tokens saved in training: {report}"
        return None

    def __init__(self, cfg: RandomLTDConfig):
        super().__init__(cfg)
        self.dropped: list[int] = []
        self.depth = 0
        self.hooks: list = []
        self.seed = 0
        self.stage_index = 0
        self.start = 0
        self.full = 0
        self.ramp_steps = 1
        self.keep: int | None = None  # the kept count of the training step in progress (None: no dropping)
        self.step = 0
        # layer-tokens trained, and as many as without dropping: the report's saving (resume: state)
        self.consumed = 0
        self.baseline = 0

    # -- contract ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        blocks = decoder_layers(model)
        self.depth = len(blocks)
        self.dropped = list(self.cfg.layers) if self.cfg.layers is not None else list(range(1, self.depth - 1))
        if not self.dropped:
            raise EffmlError(f"compressor random_ltd keeps the first and last layers whole; a model of {self.depth} "
                             "layers has no middle layer (use model.layers >= 3, or name compressor.layers)")
        if max(self.dropped) >= self.depth:
            raise EffmlError(f"compressor.layers must be in [0, {self.depth - 1}] (the model's layers), got {self.dropped}")
        for i, block in enumerate(blocks):  # first, so each sees its full input: every layer counts its layer-tokens
            self.hooks.append(block.register_forward_pre_hook(partial(self.count, i), with_kwargs=True))
        for i in self.dropped:
            dropper = TokenDropper(self, i)
            self.hooks.append(blocks[i].register_forward_pre_hook(dropper.before, with_kwargs=True))
            self.hooks.append(blocks[i].register_forward_hook(dropper.after, with_kwargs=True))
        return model

    def prepare(self, ctx: RunContext, datamodule: Any) -> None:
        self.seed = ctx.seed
        self.full = ctx.data.seq_len
        default = max(self.cfg.step_size, round(self.full * DEFAULT_START_FRACTION))
        self.start = min(self.cfg.start if self.cfg.start is not None else default, self.full)
        if self.cfg.start is not None:
            check_start("start", self.cfg.start, self.full, "sequence")
        self.ramp_steps = resolve_ramp("ramp_steps", self.cfg.ramp_steps, DEFAULT_RAMP_FRACTION,
                                       run_steps(ctx, datamodule))

    def begin_stage(self, stage: Stage, task) -> None:
        self.stage_index += 1  # the draws of each stage differ (its global steps start again at 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a function of the global step: a resumed run continues the schedule exactly
        self.step = trainer.global_step
        self.keep = self.kept_at(self.step)
        pl_module.log("random_ltd/kept_tokens", float(self.keep), on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keep = None  # validation and everything outside a training step sees every token

    def kept_at(self, step: int) -> int:
        return ramp_length(step, self.start, self.full, self.ramp_steps, self.cfg.step_size)

    # -- the hooks --------------------------------------------------------------------------------
    def draw(self, layer_index: int, hidden: Tensor, training: bool) -> Tensor | None:
        """The kept positions of each sample for this layer now, or None when it sees every token."""
        if self.keep is None or not training or self.keep >= hidden.shape[1]:
            return None
        generator = torch.Generator(device="cpu")
        generator.manual_seed(((self.seed * 1_000_003 + self.stage_index) * 1_000_003 + self.step) * 1_009 + layer_index)
        return keep_indices(hidden.shape[0], hidden.shape[1], self.keep, generator, hidden.device)

    def count(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.keep is None or not module.training:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[0], hidden.shape[1]
        kept = min(self.keep, length) if layer in self.dropped else length
        self.consumed += batch * kept
        self.baseline += batch * length

    # -- resume and report ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "baseline": self.baseline, "stage_index": self.stage_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed, self.baseline = int(state["consumed"]), int(state["baseline"])
        self.stage_index = int(state.get("stage_index", self.stage_index))

    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        return model

    def report(self) -> dict[str, Any]:
        saved = 100 * (1 - self.consumed / self.baseline) if self.baseline else 0.0
        return {
            "layers": self.depth,
            "dropping_layers": self.dropped,
            "start_tokens": self.start,
            "full_tokens": self.full,
            "step_size": self.cfg.step_size,
            "ramp_steps": self.ramp_steps,
            "layer_tokens": self.consumed,
            "layer_tokens_full": self.baseline,
            "layer_tokens_saved_pct": round(saved, 3),
        }
