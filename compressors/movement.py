"""Movement pruning: prune the weights that move towards zero while fine-tuning, not the small ones.

Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS 2020, arXiv
2005.07683. Every targeted weight W gets a learned importance score S, and the layer computes with
W ⊙ M(S). The mask's gradient passes straight through to the scores (§3, the straight-through
estimator), so dL/dS = (dL/dW') ⊙ W: a weight whose gradient keeps pushing it away from zero gains
score, one shrinking towards zero loses it — first-order information that magnitude pruning, a
zeroth-order criterion, does not see. It pays in transfer learning at high sparsity (Table 2: at 10%
of BERT-base's encoder weights, SQuAD F1 84.3 hard / 84.9 soft movement vs 80.1 magnitude).

- **hard** movement (§3, "Movement pruning"): M = Top_v(S), the top (1 − sparsity) of each layer's
  scores, a fixed budget per layer.
- **soft** movement (§3, "Soft movement"): M = σ(S) > τ, with an L1 penalty λ·mean(σ(S)) on the
  scores; the sparsity is what the threshold and λ leave, not set in advance.

The cubic schedule of the official code (github.com/huggingface/transformers,
examples/research_projects/movement-pruning/masked_run_glue.py ``schedule_threshold``): dense for
the first ``warmup_fraction`` of the steps (the scores learn meanwhile), then the kept fraction
(hard) or τ (soft) moves along Zhu & Gupta's cubic, reaching its final value ``cooldown_fraction``
of the steps before the end; λ grows in proportion to τ. The official scripts use 1 and 2 lr-warmup
lengths, i.e. 10% and 20% of training with their 10% warmup; those are the defaults here. Scores
start at 0 (``mask_init constant``, ``mask_scale 0``) and train with their own learning rate (1e-2)
and no weight decay, as in the official code.

Masks reuse ``compressors/_masks.py`` (``torch.nn.utils.prune`` reparametrization): the binary mask
is written to ``weight_mask`` at every forward, so sparsity is counted, checkpointed and made
permanent like every other masked method's; ``finalize`` folds it in and drops the scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effml.choice import check_choices, choice
from effml.compressors._masks import LAYER_TYPES, make_permanent, mask_layers, set_mask
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.compressors.magnitude import cubic_sparsity
from effml.errors import EffmlError
from effml.registry import COMPRESSORS

Method = choice("Method", "hard soft")  # hard: top-k of the scores per layer; soft: σ(S) > τ with L1 on σ(S)
TRANSFORMERS = ("bert", "vit")  # the model presets this transformer method accepts
MIN_KEPT = 0.005  # soft: the official ThresholdBinarizer keeps at least 0.5% of a layer


@dataclass
class MovementConfig(CompressorConfig):
    """Movement pruning (Sanh, Wolf & Rush, NeurIPS 2020, arXiv 2005.07683): hard movement to 90%
    sparsity per layer of the encoder, dense for the first 10% of steps, cubic, final for the last 20%."""

    name: str = "movement"
    method: Method = Method.hard
    sparsity: float = 0.9  # hard: final fraction of zeros in each targeted layer
    threshold: float = 0.1  # soft: final τ on σ(S) (the official soft-movement scripts' final_threshold)
    final_lambda: float = 400.0  # soft: the L1 weight on mean σ(S) at the end (the official scripts' value)
    score_lr: float = 1e-2  # the scores' learning rate (mask_scores_learning_rate), scaled like trainer.lr
    score_init: float = 0.0  # every score's initial value (mask_init constant, mask_scale 0)
    warmup_fraction: float = 0.1  # of the stage's steps, dense before pruning starts
    cooldown_fraction: float = 0.2  # of the stage's steps, at the final sparsity before the end
    layer_types: list[str] = field(default_factory=lambda: ["Linear"])
    skip: list[str] = field(default_factory=lambda: ["classifier", "*pooler*", "head_dist"])  # encoder only

    def __post_init__(self):
        check_choices(self, "compressor")
        if not 0 <= self.sparsity < 1:
            raise EffmlError(f"compressor.sparsity must be in [0, 1); got {self.sparsity}")
        if not 0 < self.threshold < 1:
            raise EffmlError(f"compressor.threshold must be in (0, 1); got {self.threshold}")
        if self.final_lambda < 0:
            raise EffmlError(f"compressor.final_lambda must be >= 0; got {self.final_lambda}")
        if self.score_lr <= 0:
            raise EffmlError(f"compressor.score_lr must be > 0; got {self.score_lr}")
        if not (0 <= self.warmup_fraction and 0 <= self.cooldown_fraction and
                self.warmup_fraction + self.cooldown_fraction < 1):
            raise EffmlError("compressor.warmup_fraction + compressor.cooldown_fraction must be below 1, each >= 0; "
                             f"got {self.warmup_fraction}, {self.cooldown_fraction}")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise EffmlError(f"compressor.layer_types: unknown {sorted(unknown)}; choose from {sorted(LAYER_TYPES)}")


def top_k_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Hard movement's Top_v: ones at the (1 − sparsity) largest scores of the layer."""
    n_keep = scores.numel() - round(sparsity * scores.numel())
    if n_keep == scores.numel():
        return torch.ones_like(scores)
    flat = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    flat[torch.topk(scores.flatten(), n_keep, sorted=False).indices] = 1
    return flat.view_as(scores)


def threshold_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft movement's σ(S) > τ; at least 0.5% of the layer stays, as in the official binarizer."""
    mask = (torch.sigmoid(scores) > tau).to(scores.dtype)
    n_min = int(MIN_KEPT * scores.numel()) + 1
    if mask.sum() < n_min:
        mask = top_k_mask(scores, 1 - n_min / scores.numel())
    return mask


def straight_through(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The binary mask in the forward, the identity towards the scores in the backward (§3). The
    difference is taken first: it is exactly 0, so kept weights are multiplied by exactly 1."""
    return mask.detach() + (scores - scores.detach())


@COMPRESSORS.register("movement", MovementConfig)
class MovementPruning(Compressor):
    """Hard or soft movement pruning of a transformer's encoder while fine-tuning (Sanh et al. 2020)."""

    smoke = Smoke(("bert", "vit"))
    owns = frozenset({"masks"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        if report["method"] == "hard" and abs(report["achieved_sparsity"] - report["target_sparsity"]) > 0.01:
            return f"sparsity {report['achieved_sparsity']:.3f}, not the target {report['target_sparsity']}"
        if report["method"] == "soft" and report["achieved_sparsity"] <= 0:
            return "soft movement pruned no weight"
        return None

    def __init__(self, cfg: MovementConfig):
        super().__init__(cfg)
        self.layers: dict[str, nn.Module] = {}
        self.level = 0.0  # the schedule's value now: the sparsity (hard) or τ (soft)
        self._window = (0, 1)  # (first pruning step, step of the final level) in the stage's steps
        self._hooks: list = []

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("train", owner=self.name)]

    def attach(self, model: nn.Module) -> nn.Module:
        self.layers = mask_layers(model, self.cfg.layer_types, self.cfg.skip, self.name)
        for module in self.layers.values():
            # a parameter of the layer: trained, checkpointed and moved with the model
            module.mask_scores = nn.Parameter(torch.full_like(module.weight_orig, self.cfg.score_init))
            # after prune's own hook (registered by mask_layers), so this product is the one used
            self._hooks.append(module.register_forward_pre_hook(self._masked_forward))
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        if ctx.model.name not in TRANSFORMERS:
            raise EffmlError(f"compressor {self.name} prunes a transformer's encoder; model {ctx.model.name} is not "
                             f"one (use model={' or model='.join(TRANSFORMERS)})")

    def begin_stage(self, stage: Stage, task) -> None:
        if not getattr(task, "_movement_scores_grouped", False):  # one task serves every stage: wrap once
            task.configure_optimizers = scores_in_own_group(task, self.cfg.score_lr)
            task._movement_scores_grouped = True

    def on_train_start(self, trainer, pl_module) -> None:
        total = max(1, int(trainer.estimated_stepping_batches))
        start = round(self.cfg.warmup_fraction * total)
        self._window = (start, max(start + 1, total - round(self.cfg.cooldown_fraction * total)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a function of the global step alone, so a resumed run continues the schedule exactly
        self.level = cubic_sparsity(trainer.global_step, *self._window, 0.0, self.final_level)
        pl_module.log("prune/level", self.level, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.level = self.final_level  # a run cut short still ends at the final level

    def loss(self, task, batch: dict, logits: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.method != "soft" or not self.layers:
            return None
        # the official regularization(): mean over layers of ||σ(S)||_1 / n, weighted by λ ∝ τ
        l1 = torch.stack([torch.sigmoid(m.mask_scores).mean() for m in self.layers.values()]).mean()
        return self.cfg.final_lambda * (self.level / self.cfg.threshold) * l1

    def state_dict(self) -> dict:
        # Scores are parameters and masks buffers of the model; the level follows from the global step.
        return {"level": self.level}

    def load_state_dict(self, state_dict: dict) -> None:
        self.level = state_dict["level"]

    @torch.no_grad()
    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        for module in self.layers.values():
            set_mask(module, self.mask_of(module.mask_scores, self.final_level))
            del module.mask_scores
        make_permanent(self.layers)
        return model

    def target_sparsity(self) -> float | None:
        return self.cfg.sparsity if self.cfg.method == "hard" else None

    def report(self) -> dict:
        per_layer = {name: round(float((m.weight == 0).float().mean()), 6) for name, m in self.layers.items()}
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        total = sum(m.weight.numel() for m in self.layers.values())
        return {
            "method": self.cfg.method,
            "target_sparsity": self.cfg.sparsity if self.cfg.method == "hard" else None,
            "achieved_sparsity": zeros / total,  # counted from the finalized weights of the targeted layers
            "remaining": 1 - zeros / total,
            "threshold": self.cfg.threshold if self.cfg.method == "soft" else None,
            "final_lambda": self.cfg.final_lambda if self.cfg.method == "soft" else None,
            "pruned_weights": total,
            "layers": per_layer,
        }

    # -- mechanics --------------------------------------------------------------------------
    @property
    def final_level(self) -> float:
        return self.cfg.sparsity if self.cfg.method == "hard" else self.cfg.threshold

    def mask_of(self, scores: torch.Tensor, level: float) -> torch.Tensor:
        return top_k_mask(scores, level) if self.cfg.method == "hard" else threshold_mask(scores, level)

    def _masked_forward(self, module: nn.Module, inputs) -> None:
        scores = module.mask_scores
        mask = self.mask_of(scores.detach(), self.level)
        with torch.no_grad():
            module.weight_mask.copy_(mask)  # what checkpoints, sparsity counts and finalize see
        module.weight = module.weight_orig * straight_through(mask, scores)


def scores_in_own_group(task, base_score_lr: float):
    """The task's ``configure_optimizers`` with the scores moved to a group of their own: their own
    learning rate (times the stage's ``lr_scale``, like trainer.lr), no weight decay (the official
    code's second group), on the same lr schedule. Done before the fit (not in a fit hook), so a
    resumed optimizer's state loads into groups of the same shape."""
    original = task.configure_optimizers

    def configure_optimizers():
        configured = original()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        group, score_lr = optimizer.param_groups[0], base_score_lr * task.lr_scale
        scores = [p for n, p in task.model.named_parameters() if n.endswith("mask_scores") and p.requires_grad]
        if not scores:  # a teacher's own stage, or the scores already folded in
            return configured
        ids = {id(p) for p in scores}
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": scores, "lr": score_lr, "weight_decay": 0.0})
        if isinstance(configured, dict):  # a LambdaLR: the same factor for the new group
            schedule = configured["lr_scheduler"]["scheduler"]
            optimizer.param_groups[-1]["initial_lr"] = score_lr
            schedule.base_lrs.append(score_lr)
            schedule.lr_lambdas.append(schedule.lr_lambdas[0])
            optimizer.param_groups[-1]["lr"] = score_lr * schedule.lr_lambdas[0](schedule.last_epoch)
        return configured

    return configure_optimizers
