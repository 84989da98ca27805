"""Switch Transformer mixture of experts: every ``expert_interval``-th FFN of a language model becomes
a Switch layer (``effml.models.switch.SwitchFFN``).

Fedus, Zoph & Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple and
Efficient Sparsity", JMLR 2022 (arXiv 2101.03961): §2.1 top-1 routing, §2.2 expert capacity (1.25 in
training, 2.0 at eval; tokens over capacity skip the layer through the residual) and the
load-balancing loss (eq. 4, α = 0.01), §2.4 selective precision (an fp32 router in a bf16 model),
router jitter, the 0.1× initialization and expert dropout; the router z-loss of ST-MoE (Zoph et al.
2022, arXiv 2202.08906, eq. 5) as an option. The paper puts experts in every other FFN
(``expert_interval`` 2: blocks 1, 3, 5, … counting from 0).

Sparse upcycling (Komatsuzaki et al., ICLR 2023, arXiv 2212.05055): ``init_from`` names a finished
dense run of the same model; its weights are loaded and each of its FFNs is copied into every expert
of the Switch layer that replaces it (the routers start fresh).

What the run reports, per Switch layer and over the last stage: the expert load (training
assignments per expert, also plotted in ``moe_load.png``), the fraction of tokens dropped (in
training and at evaluation), the auxiliary and z losses and the router entropy. The running sums
are part of the compressor's state, so a resumed run reports what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effml import distributed
from effml.choice import check_choices, choice
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.kernels import select
from effml.models.switch import SwitchFFN, pop_router_loss, switch_layers
from effml.paths import atomic_file
from effml.registry import COMPRESSORS
from effml.teachers import TrainedWeightsConfig, load_weights, trained_state

RouterDtype = choice("RouterDtype", "float32 bfloat16")  # bfloat16: the paper's Table 2 ablation
Dispatch = choice("Dispatch", "auto grouped bmm loop")  # auto: grouped matmul where it runs, else padded bmm
WHO = "dense model"


@dataclass
class SwitchMoEConfig(CompressorConfig):
    """Switch Transformer MoE (Fedus et al., JMLR 2022): 8 experts in every other FFN, top-1 routing,
    capacity factor 1.25 (eval 2.0), load-balancing loss 0.01, fp32 router, 0.1x expert init."""

    name: str = "switch_moe"
    num_experts: int = 8
    top_k: int = 1  # 1: Switch; 2: Shazeer et al. 2017's top-2, for comparison
    expert_interval: int = 2  # every expert_interval-th FFN becomes a Switch layer
    capacity_factor: float = 1.25  # training
    eval_capacity_factor: float = 2.0
    aux_loss_coef: float = 0.01  # α of eq. 4
    z_loss_coef: float = 0.0  # ST-MoE router z-loss (1e-3 there); 0: off
    router_dtype: RouterDtype = RouterDtype.float32
    jitter_eps: float = 0.01  # multiplicative router-input noise in training; 0: off
    init_scale: float = 0.1  # truncated-normal scale of expert and router weights (Table 3: 0.1 vs 1.0)
    expert_dropout: float = 0.0  # on the experts' hidden units (fine-tuning: 0.4 in the paper)
    dispatch: Dispatch = Dispatch.auto
    init_from: TrainedWeightsConfig = field(default_factory=TrainedWeightsConfig)  # upcycle a finished dense run

    def __post_init__(self):
        check_choices(self, "compressor")
        if self.num_experts < 2:
            raise EffmlError(f"compressor.num_experts must be >= 2 (one expert is a dense FFN), got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise EffmlError(f"compressor.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise EffmlError(f"compressor.{name} must be > 0, got {getattr(self, name)}")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter_eps"):
            if getattr(self, name) < 0:
                raise EffmlError(f"compressor.{name} must be >= 0, got {getattr(self, name)}")
        if self.init_scale <= 0:
            raise EffmlError(f"compressor.init_scale must be > 0, got {self.init_scale}")
        if not 0 <= self.expert_dropout < 1:
            raise EffmlError(f"compressor.expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.expert_interval < 1:
            raise EffmlError(f"compressor.expert_interval must be >= 1, got {self.expert_interval}")

    def layer_options(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor, "aux_loss_coef": self.aux_loss_coef,
                "z_loss_coef": self.z_loss_coef, "router_dtype": str(self.router_dtype),
                "jitter_eps": self.jitter_eps, "init_scale": self.init_scale,
                "expert_dropout": self.expert_dropout, "dispatch": str(self.dispatch)}


def expert_blocks(depth: int, interval: int) -> list[int]:
    """The blocks whose FFN becomes a Switch layer: every ``interval``-th, the last of each run of
    ``interval`` (interval 2: 1, 3, 5, …; 1: all)."""
    return [i for i in range(depth) if i % interval == interval - 1]


def swap_in_experts(model: nn.Module, cfg: SwitchMoEConfig, upcycle: bool) -> list[int]:
    """Replace the FFNs of ``expert_blocks`` in place; returns their indices. One line for a model
    without transformer FFN blocks or an interval longer than the model."""
    blocks = model.blocks() if hasattr(model, "blocks") else None
    if not blocks:
        raise EffmlError(f"compressor switch_moe needs a transformer with FFN blocks (model=lm_tiny, lm_small, "
                         f"lm_base); {type(model).__name__} has none")
    if cfg.expert_interval > len(blocks):
        raise EffmlError(f"compressor.expert_interval must be in [1, {len(blocks)}] (the model's blocks), "
                         f"got {cfg.expert_interval}")
    chosen = expert_blocks(len(blocks), cfg.expert_interval)
    for i in chosen:
        blocks[i].mlp = SwitchFFN.from_dense(blocks[i].mlp, cfg.num_experts, upcycle=upcycle, **cfg.layer_options())
    return chosen


@COMPRESSORS.register("switch_moe", SwitchMoEConfig)
class SwitchMoE(Compressor):
    """Switch Transformer: top-1 routed experts in place of transformer FFNs."""

    smoke = Smoke(setups=("lm",), settings=("num_experts=4",))
    owns = frozenset({"modules"})
    tasks = ("lm",)

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        report = metrics["compressors"][name]
        if report.get("moe_layers", 0) < 1 or report.get("expert_params", 0) <= 0:
            return f"no Switch layer in the model: {report}"
        dropped = report.get("dropped_fraction_train")
        if dropped is None or not 0.0 <= dropped <= 1.0:
            return f"no routing statistics from training: {report}"
        return None

    def __init__(self, cfg: SwitchMoEConfig):
        super().__init__(cfg)
        self.blocks: list[int] = []
        self.model: nn.Module | None = None
        self.stage_stats: dict[str, Any] = {}  # per layer, train and eval: what the report shows
        self.upcycled_from: str | None = None
        self.ctx: RunContext | None = None
        self.dispatch_decision: dict[str, Any] | None = None  # dispatch=auto: which one, measured

    def attach(self, model: nn.Module) -> nn.Module:
        self.blocks = swap_in_experts(model, self.cfg, upcycle=False)
        self.model = model
        return model

    def prepare(self, ctx: RunContext, datamodule: Any) -> None:
        self.ctx = ctx
        if self.cfg.init_from.source != "none":
            self.upcycle(ctx, datamodule)
        if self.cfg.dispatch == "auto" and ctx.hardware.selection == "measure":
            self.choose_dispatch(ctx.data.batch_size * datamodule.info.seq_len, ctx.hardware)

    def choose_dispatch(self, tokens: int, hardware: Any) -> None:
        """Every Switch layer gets the dispatch measured fastest on the first (they share one shape);
        under several processes, rank 0's measurement."""
        first = next(iter(self.layers().values()))
        decision = distributed.broadcast_from_rank0(select.measured_switch_dispatch(first, tokens, hardware))
        self.dispatch_decision = decision.as_dict()
        for layer in self.layers().values():
            layer.dispatch = decision.kernel

    def upcycle(self, ctx: RunContext, datamodule: Any) -> None:
        """Load a finished dense run into the model, each of its FFNs into every expert of its block."""
        from effml.registry import MODELS

        state, where, _ = trained_state(self.cfg.init_from, ctx.output_root, ctx.seed, datamodule.info, WHO, ctx.data)
        dense = MODELS.get(ctx.model.name).target.from_config(ctx.model, datamodule.info)
        load_weights(dense, state, where, WHO)
        shared = {k: v for k, v in state.items() if not any(f".layers.{i}.mlp." in k for i in self.blocks)}
        load_weights(self.model, {**self.model.state_dict(), **shared}, where, WHO)
        for i in self.blocks:
            copy = SwitchFFN.from_dense(dense.blocks()[i].mlp, self.cfg.num_experts, upcycle=True, **self.cfg.layer_options())
            target = self.model.blocks()[i].mlp
            with torch.no_grad():
                for name, param in copy.named_parameters():
                    if not name.startswith("router."):  # the router starts fresh
                        target.get_parameter(name).copy_(param)
        self.upcycled_from = where

    def layers(self) -> dict[str, SwitchFFN]:
        return switch_layers(self.model)

    def loss(self, task, batch: dict, logits: torch.Tensor) -> torch.Tensor | None:
        return pop_router_loss(task.model)

    def begin_stage(self, stage: Stage, task) -> None:
        for layer in self.layers().values():
            layer.reset_stats()

    def end_stage(self, stage: Stage, record: dict[str, Any]) -> dict[str, Any]:
        self._sum_train_stats_over_ranks()
        self.stage_stats = {name: {mode: layer.stats(mode) for mode in ("train", "eval")}
                            for name, layer in self.layers().items()}
        summary = self.summary()
        if distributed.is_main():
            self.plot_load()
        return {"moe_dropped_train": summary["dropped_fraction_train"], "moe_aux_loss": summary["aux_loss"]}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        summary = {k: v for k, v in self.summary(live=True).items() if v is not None}
        pl_module.log_dict({f"moe/{k}": float(v) for k, v in summary.items() if isinstance(v, float)})

    # -- several processes: each routed its own slice of every global batch -------------------------
    def _sum_train_stats_over_ranks(self) -> None:
        """The training sums of every rank added up (evaluation runs on the full data on each rank and
        is not added): the global batch's statistics, the same on every rank. A no-op in one process."""
        if not distributed.active():
            return
        for layer in self.layers().values():
            run = layer._running["train"]
            for key, value in run.items():
                if isinstance(value, torch.Tensor):
                    run[key] = distributed.all_reduce_sum(value.detach().clone())
                elif value is not None:
                    run[key] = type(value)(distributed.all_reduce_sum(torch.tensor(float(value), dtype=torch.float64)).item())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """(Every rank, in ``Trainer.save_checkpoint``.) Rank 0 writes the sums of all ranks; on resume,
        the other ranks start from zero (``load_state_dict``), so nothing is counted twice."""
        if not distributed.active():
            return
        keep = {name: dict(layer._running["train"]) for name, layer in self.layers().items()}
        self._sum_train_stats_over_ranks()
        checkpoint["callbacks"][self.state_key]["running"] = {
            name: {**layer._running, "train": dict(layer._running["train"])} for name, layer in self.layers().items()}
        for name, layer in self.layers().items():
            layer._running["train"] = keep[name]

    # -- resume: the running sums travel with every checkpoint -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"running": {name: layer._running for name, layer in self.layers().items()},
                "stage_stats": self.stage_stats, "upcycled_from": self.upcycled_from,
                "dispatch_decision": self.dispatch_decision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, layer in self.layers().items():
            if name in state.get("running", {}):
                layer._running = state["running"][name]
                if not distributed.is_main():  # rank 0's checkpoint holds every rank's sums (on_save_checkpoint)
                    evaluated = layer._running["eval"]
                    layer.reset_stats()
                    layer._running["eval"] = evaluated
        self.stage_stats = state.get("stage_stats", {})
        self.upcycled_from = state.get("upcycled_from", self.upcycled_from)
        if state.get("dispatch_decision"):  # a resumed run keeps the dispatch it trained with
            self.dispatch_decision = state["dispatch_decision"]
            for layer in self.layers().values():
                layer.dispatch = self.dispatch_decision["kernel"]

    # -- report ------------------------------------------------------------------------------------
    def summary(self, live: bool = False) -> dict[str, Any]:
        """Means over the Switch layers of the last stage (``live``: the running sums now)."""
        stats = ({n: {m: layer.stats(m) for m in ("train", "eval")} for n, layer in self.layers().items()}
                 if live else self.stage_stats)

        def mean(mode: str, key: str) -> float | None:
            values = [s[mode][key] for s in stats.values() if s.get(mode)]
            return sum(values) / len(values) if values else None

        return {"dropped_fraction_train": mean("train", "dropped_fraction"),
                "dropped_fraction_eval": mean("eval", "dropped_fraction"),
                "aux_loss": mean("train", "aux_loss"), "z_loss": mean("train", "z_loss"),
                "router_entropy": mean("train", "entropy"),
                "router_entropy_max": mean("train", "max_entropy")}

    def report(self) -> dict[str, Any]:
        total = sum(p.numel() for layer in self.layers().values() for n, p in layer.named_parameters()
                    if not n.startswith("router."))
        return {
            "moe_layers": len(self.blocks),
            "blocks": self.blocks,
            "num_experts": self.cfg.num_experts,
            "top_k": self.cfg.top_k,
            "expert_params": total,
            "dispatch": next((layer.last_dispatch for layer in self.layers().values()), None),
            "dispatch_decision": self.dispatch_decision,
            "upcycled_from": self.upcycled_from,
            **self.summary(),
            "layers": self.stage_stats,
        }

    def plot_load(self) -> None:
        """``moe_load.png``: each Switch layer's share of training assignments per expert (uniform: 1/E)."""
        loads = {name: s["train"]["load_fraction"] for name, s in self.stage_stats.items() if s.get("train")}
        if not loads or self.ctx is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 2.8), squeeze=False)
        for axis, (name, fractions) in zip(axes[0], loads.items(), strict=True):
            axis.bar(range(len(fractions)), fractions, color="tab:blue")
            axis.axhline(1 / len(fractions), color="gray", linestyle="--", linewidth=1, label="uniform")
            axis.set(title=name.replace("lm.model.layers.", "block ").replace(".mlp", ""), xlabel="expert",
                     ylabel="share of tokens")
        axes[0][0].legend(fontsize=7)
        figure.tight_layout()
        with atomic_file(self.ctx.run_dir.artifact("moe_load.png")) as f:
            figure.savefig(f, format="png", dpi=120)
        plt.close(figure)
