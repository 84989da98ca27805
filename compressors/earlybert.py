"""EarlyBERT: structured early-bird lottery tickets that make BERT training cheaper.

Chen, Cheng, Wang, Gan, Wang, Liu, "EarlyBERT: Efficient BERT Training via Early-bird Lottery
Tickets", ACL 2021 (arXiv 2012.15498). Three stages, each a stage of the run:

1. ``search``: a slimming coefficient c on every attention head's output and every FFN
   intermediate neuron (initialized to 1) trains jointly with the model under the penalty
   λ_h‖c_heads‖₁ + λ_f‖c_ffn‖₁ (the official code: 1e-4 for both). Every ``check_every`` steps the
   ticket that would be drawn now is compared with the previous one (normalized Hamming distance,
   heads and neurons separately); the search stops as soon as both distances stay below
   ``threshold`` over the last ``window`` masks: the early-bird criterion of You et al.,
   "Drawing Early-Bird Tickets", ICLR 2020 (their default: 0.1 over 5 masks).
2. draw (at the start of ``ticket``): per layer, the ``head_fraction`` heads with the smallest |c|
   are pruned (paper: 4 of 12, i.e. 1/3; heads differ by layer, so layers are pruned separately);
   FFN neurons are ranked globally by |c| and ``ffn_fraction`` of them pruned (the paper found
   global better than layerwise). ``ticket=random`` draws the same per-layer counts at random
   positions: the paper's control that the ticket is not trivial.
3. ``ticket``: the pruned heads (Q/K/V rows, output-projection columns) and neurons are removed
   *physically* (``effml.models.bert_surgery``), kept widths rounded up to the hardware's channel
   multiple, and the smaller dense model is fine-tuned, from the pre-trained weights by default
   (``weights=pretrained``; ``searched`` continues from the search with c folded into the weights),
   optionally at a higher learning rate (``ticket_lr_scale``; the paper notes tickets train well
   with larger ones).

The saving is real: the ticket is smaller dense matrices, and the report gives params, FLOPs and
measured step time and latency next to the dense model's; ``finalize`` exports it to
``<run>/model`` (reload: ``effml.models.bert_surgery.load_pruned`` or ``model.pretrained=<dir>``).
At least one head per layer is always kept (a ``head_fraction`` near 1 leaves one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from effml import distributed
from effml.choice import check_choices, choice
from effml.compressors.base import (
    CompressorConfig,
    RunContext,
    Smoke,
    Stage,
    StructuredCompressor,
)
from effml.errors import EffmlError
from effml.models import bert_surgery as surgery
from effml.registry import COMPRESSORS

TicketKind = choice("TicketKind", "searched random")  # random: the same per-layer counts, random heads/neurons
TicketWeights = choice("TicketWeights", "pretrained searched")  # the ticket starts from θ0, or with c folded in


@dataclass
class EarlyBERTConfig(CompressorConfig):
    """EarlyBERT (Chen et al., ACL 2021): early-bird structured tickets (heads + FFN neurons), trained
    physically smaller."""

    name: str = "earlybert"
    head_fraction: float = 0.333  # heads pruned in every layer (paper: 4 of 12); ≥ 1 head is kept
    ffn_fraction: float = 0.4  # FFN neurons pruned, ranked globally (paper: 40%)
    l1_heads: float = 1e-4  # λ on the head coefficients (official code)
    l1_ffn: float = 1e-4  # λ on the FFN coefficients (official code)
    search_epochs: int = 1  # the most the search may run; the early-bird criterion usually stops it sooner
    check_every: int = 20  # steps between two recorded masks
    threshold: float = 0.1  # early bird: mask distance below this …
    window: int = 5  # … between the newest mask and each of the window − 1 before it
    ticket: TicketKind = TicketKind.searched
    weights: TicketWeights = TicketWeights.pretrained
    ticket_epochs: int | None = None  # None: trainer.max_epochs
    ticket_lr_scale: float = 1.0  # the ticket's learning rate = trainer.lr × this

    def __post_init__(self):
        check_choices(self, "compressor")
        if not 0 <= self.head_fraction < 1:
            raise EffmlError(f"compressor.head_fraction must be in [0, 1); got {self.head_fraction}")
        if not 0 <= self.ffn_fraction < 1:
            raise EffmlError(f"compressor.ffn_fraction must be in [0, 1); got {self.ffn_fraction}")
        for name in ("l1_heads", "l1_ffn"):
            if getattr(self, name) < 0:
                raise EffmlError(f"compressor.{name} must be >= 0; got {getattr(self, name)}")
        for name in ("search_epochs", "check_every", "ticket_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {value}")
        if self.window < 2:
            raise EffmlError(f"compressor.window must be >= 2; got {self.window}")
        if not 0 < self.threshold <= 1:
            raise EffmlError(f"compressor.threshold must be in (0, 1]; got {self.threshold}")
        if self.ticket_lr_scale <= 0:
            raise EffmlError(f"compressor.ticket_lr_scale must be > 0; got {self.ticket_lr_scale}")


@dataclass
class Ticket:
    """The drawn subnetwork: indices of the heads and FFN neurons each layer keeps."""

    heads: list[list[int]]
    neurons: list[list[int]]


@COMPRESSORS.register("earlybert", EarlyBERTConfig)
class EarlyBERT(StructuredCompressor):
    """Search slimming coefficients, draw a structured ticket early, train it physically smaller."""

    smoke = Smoke(("bert",))

    def __init__(self, cfg: EarlyBERTConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.gates: surgery.Gates | None = None
        self.initial_weights: dict[str, Tensor] = {}  # θ0: the pre-trained weights
        self.random_seed = 0
        self.channel_multiple = 1
        self.export_dir: Path | None = None
        self.model_cfg = None  # the model's config, to export its tokenizer with the ticket
        self.recent_masks: list[Tensor] = []  # the last `window` masks, for the early-bird check
        self.search: list[dict[str, Any]] = []  # (step, head_distance, ffn_distance) per check
        self.stop_step: int | None = None  # where the early-bird criterion stopped the search
        self.ticket: Ticket | None = None  # the drawn ticket
        self.draw: dict[str, Any] = {}  # what the draw decided, for the report

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [
            Stage("search", self.cfg.search_epochs, self.name),
            Stage("ticket", self.cfg.ticket_epochs, self.name, lr_scale=self.cfg.ticket_lr_scale),
        ]

    def attach(self, model: nn.Module) -> nn.Module:
        self.random_seed = int(torch.randint(2**31 - 1, ()))  # from the run's seeded RNG
        self.initial_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.gates = surgery.Gates(model, self.name, heads=True, neurons=True)
        self.model = model
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.channel_multiple = ctx.hardware.channel_multiple
        self.export_dir = ctx.run_dir.export
        self.model_cfg = ctx.model

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if self.gates is None or not self.gates.handles:
            return None
        # one concatenation per kind, not an abs and a sum per layer: the search step is launch-bound
        # (on an H200 the gates and their L1 made a BERT-base step at 256x56 tokens 25-50% slower)
        heads = torch.cat([g.reshape(-1) for g in self.gates.of(surgery.HEAD_GATE)]).abs().sum()
        ffn = torch.cat([g.reshape(-1) for g in self.gates.of(surgery.NEURON_GATE)]).abs().sum()
        return self.cfg.l1_heads * heads + self.cfg.l1_ffn * ffn

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ticket is not None or trainer.global_step % self.cfg.check_every:
            return
        self._record_mask(trainer.global_step)
        # the masks come from the gates, equal on every rank (DDP averages their gradients); rank 0's
        # verdict is sent all the same, so that no rank stops a step before another
        if distributed.broadcast_from_rank0(self._early_bird()):
            self.stop_step = trainer.global_step
            trainer.should_stop = True

    def begin_stage(self, stage: Stage, task) -> None:
        if stage.of(self.name, "ticket") and self.ticket is None:
            self.ticket = distributed.broadcast_from_rank0(self._draw())  # rank 0's heads and neurons
            self._make_ticket(task.model)

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        if not stage.of(self.name, "search"):
            return None
        return {"early_bird_step": self.stop_step, "checks": len(self.search)}

    def state_dict(self) -> dict:
        return {
            "recent_masks": self.recent_masks,
            "search": self.search,
            "stop_step": self.stop_step,
            "ticket": None if self.ticket is None else asdict(self.ticket),
            "draw": self.draw,
        }

    def load_state_dict(self, state: dict) -> None:
        self.recent_masks, self.search = state["recent_masks"], state["search"]
        self.stop_step, self.draw = state["stop_step"], state["draw"]
        if state["ticket"] is not None and self.ticket is None:
            # resuming after the draw: shrink before the runner loads the ticket's weights
            self.ticket = Ticket(**state["ticket"])
            self._make_ticket(self.model)

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        if self.export_dir is not None and self.ticket is not None:
            surgery.save_pruned(model, self.export_dir)
            # the tokenizer too, so the export is a complete `model.pretrained=<dir>`
            type(model).tokenizer_for(self.model_cfg).save_pretrained(self.export_dir)
        return model

    def report(self) -> dict:
        return {
            "ticket_kind": self.cfg.ticket,
            "weights": self.cfg.weights,
            "search": self.search,
            "early_bird_step": self.stop_step,
            "stopped_early": self.stop_step is not None,
            **self.draw,
            "export": str(self.export_dir) if self.export_dir and self.export_dir.exists() else None,
        }

    # -- the early-bird search ----------------------------------------------------------------
    def _coefficients(self) -> tuple[list[Tensor], list[Tensor]]:
        """|c| of every layer's heads and neurons, on the CPU: one copy (one sync) for all of them."""
        heads, ffn = self.gates.of(surgery.HEAD_GATE), self.gates.of(surgery.NEURON_GATE)
        gates = [*heads, *ffn]
        flat = torch.cat([g.detach().reshape(-1) for g in gates]).abs().float().cpu()
        parts = flat.split([g.numel() for g in gates])
        return list(parts[: len(heads)]), list(parts[len(heads) :])

    def _head_count(self) -> int:
        """Heads in the whole model: where a flat mask's head part ends."""
        return sum(surgery.num_heads(layer) for layer in self.gates.layers)

    def _mask(self) -> Tensor:
        """The ticket that would be drawn now (before rounding), as one flat keep-mask: heads, then neurons."""
        heads, ffn = self._coefficients()
        head_masks = [_keep_mask(c, heads_kept(c.numel(), self.cfg.head_fraction)) for c in heads]
        flat = torch.cat(ffn)
        ffn_mask = _keep_mask(flat, max(1, round(flat.numel() * (1 - self.cfg.ffn_fraction))))
        return torch.cat([*head_masks, ffn_mask])

    def _record_mask(self, step: int) -> None:
        mask, n_heads = self._mask(), self._head_count()
        entry = {"step": step, "head_distance": None, "ffn_distance": None}
        if self.recent_masks:
            previous = self.recent_masks[-1]
            entry["head_distance"] = _distance(mask[:n_heads], previous[:n_heads])
            entry["ffn_distance"] = _distance(mask[n_heads:], previous[n_heads:])
        self.search.append(entry)
        self.recent_masks = [*self.recent_masks, mask][-self.cfg.window :]

    def _early_bird(self) -> bool:
        """Every mask of the window within ``threshold`` of the newest one, heads and neurons alike."""
        if len(self.recent_masks) < self.cfg.window:
            return False
        n_heads, newest = self._head_count(), self.recent_masks[-1]
        return all(
            _distance(newest[part], old[part]) < self.cfg.threshold
            for old in self.recent_masks[:-1]
            for part in (slice(0, n_heads), slice(n_heads, None))
        )

    # -- the draw -----------------------------------------------------------------------------
    def _draw(self) -> Ticket:
        """Kept heads per layer and kept neurons per layer, widths rounded to the channel multiple."""
        heads, ffn = self._coefficients()
        layers = self.gates.layers
        generator = torch.Generator().manual_seed(self.random_seed)
        flat = torch.cat(ffn)
        keep_ffn = _keep_mask(flat, max(1, round(flat.numel() * (1 - self.cfg.ffn_fraction))))
        ffn_counts = [int(m.sum()) for m in keep_ffn.split([c.numel() for c in ffn])]
        kept_heads, kept_neurons, drawn_heads, drawn_ffn = [], [], [], []
        for layer, c_heads, c_ffn, ffn_count in zip(layers, heads, ffn, ffn_counts, strict=True):
            n_heads = heads_kept(c_heads.numel(), self.cfg.head_fraction)
            drawn_heads.append(n_heads)
            drawn_ffn.append(ffn_count)
            n_heads = surgery.round_up(n_heads, self.channel_multiple, surgery.head_size(layer), c_heads.numel())
            n_ffn = surgery.round_up(max(ffn_count, 1), self.channel_multiple, 1, c_ffn.numel())
            kept_heads.append(self._choose(c_heads, n_heads, generator))
            kept_neurons.append(self._choose(c_ffn, n_ffn, generator))
        self.draw = {
            "heads_per_layer": [len(k) for k in kept_heads],
            "ffn_per_layer": [len(k) for k in kept_neurons],
            "heads_drawn": drawn_heads,  # before rounding to the channel multiple
            "ffn_drawn": drawn_ffn,
            "channel_multiple": self.channel_multiple,
            "kept_heads": kept_heads,
        }
        return Ticket(kept_heads, kept_neurons)

    def _choose(self, scores: Tensor, count: int, generator: torch.Generator) -> list[int]:
        if self.cfg.ticket == "random":
            return sorted(torch.randperm(scores.numel(), generator=generator)[:count].tolist())
        return surgery.top_indices(scores, count)

    def _make_ticket(self, model: nn.Module) -> None:
        """Remove the gates, set the ticket's starting weights, and cut the model down to it."""
        if self.cfg.weights == "pretrained":
            self.gates.remove(fold=False)
            model.load_state_dict(self.initial_weights)
        else:
            self.gates.remove(fold=True)
        surgery.shrink(model, self.ticket.heads, self.ticket.neurons, self.name)


def heads_kept(n_heads: int, head_fraction: float) -> int:
    """Heads a layer keeps: its count minus the pruned fraction, rounded, and never fewer than one."""
    return max(1, n_heads - round(n_heads * head_fraction))


def _keep_mask(scores: Tensor, keep: int) -> Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.topk(scores.flatten(), keep).indices] = True
    return mask


def _distance(a: Tensor, b: Tensor) -> float:
    """Normalized Hamming distance between two keep-masks."""
    return round(float((a != b).float().mean()), 6) if a.numel() else 0.0

