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

- **block** movement (``granularity=row_col``, beyond the paper, as huggingface/nn_pruning does):
  one score per structural unit instead of per weight — per attention head (its Q/K/V rows and its
  columns of the attention output projection) and per FFN intermediate channel (its row of
  ``intermediate.dense`` and its column of ``output.dense``) — so units die as wholes; the unit's
  mask is the per-weight mask broadcast over its rows and columns, and the straight-through gradient
  sums the movement of all its weights. ``finalize`` then removes the dead heads and channels
  physically (``effml.models.bert_surgery``, kept widths rounded up to ``hardware.channel_multiple``
  with the next-best zeroed units, so the logits are unchanged), exports the smaller model to
  ``<run>/model``, and the run's speed measurement times it against dense (``metrics.speed``).
  Hard keeps ``1 − sparsity`` of the heads and of the channels of every layer (at least one head).
- **calibrated** soft movement (``method=soft calibrate=true``, ours): the paper reaches a sparsity
  by tuning λ over runs; here τ is instead set at every step to the global quantile of the scores
  that leaves the cubic schedule's kept fraction (towards ``sparsity``) over all targeted weights.
  Soft movement's global threshold (layers end at different sparsities) and its L1 on σ(S) stay.

Masks reuse ``compressors/_masks.py`` (``torch.nn.utils.prune`` reparametrization): the binary mask
is written to ``weight_mask`` at every forward, so sparsity is counted, checkpointed and made
permanent like every other masked method's; ``finalize`` folds it in and drops the scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from effml.choice import check_choices, choice
from effml.compressors._masks import LAYER_TYPES, make_permanent, mask_layers, set_mask
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.compressors.magnitude import cubic_sparsity
from effml.errors import EffmlError
from effml.models import bert_surgery as surgery
from effml.registry import COMPRESSORS
from effml.task import move_to_own_group

Method = choice("Method", "hard soft")  # hard: top-k of the scores per layer; soft: σ(S) > τ with L1 on σ(S)
Granularity = choice("Granularity", "weight row_col")  # a score per weight, or per head / FFN channel
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
    # weight: a score per weight of every targeted layer; row_col: a score per attention head and per
    # FFN channel of a BERT encoder (layer_types and skip unused), removed physically at finalize
    granularity: Granularity = Granularity.weight
    calibrate: bool = False  # soft: τ follows the scores' global quantile towards `sparsity` (not the paper's)

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
        if self.calibrate and (self.method != "soft" or self.granularity != "weight"):
            raise EffmlError("compressor.calibrate applies to method=soft with granularity=weight; got "
                             f"method={self.method}, granularity={self.granularity}")
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
    return at_least_min_kept(torch.sigmoid(scores) > tau, scores)


def above_mask(scores: torch.Tensor, cut: float) -> torch.Tensor:
    """Calibrated soft movement: S > the global cut (σ is monotone), with the same 0.5% floor."""
    return at_least_min_kept(scores > cut, scores)


def at_least_min_kept(keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    mask = keep.to(scores.dtype)
    n_min = int(MIN_KEPT * scores.numel()) + 1  # one unit of a head group of 12
    if mask.sum() < n_min:
        mask = top_k_mask(scores, 1 - n_min / scores.numel())
    return mask


def global_cut(scores: list[torch.Tensor], sparsity: float) -> float:
    """The score that ``sparsity`` of all the scores do not exceed (−inf: keep everything)."""
    total = sum(s.numel() for s in scores)
    k = round(sparsity * total)
    if k == 0:
        return float("-inf")
    return float(torch.cat([s.detach().flatten() for s in scores]).kthvalue(k).values)


def straight_through(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The binary mask in the forward, the identity towards the scores in the backward (§3). The
    difference is taken first: it is exactly 0, so kept weights are multiplied by exactly 1."""
    return mask.detach() + (scores - scores.detach())


@dataclass
class Unit:
    """Where a block-pruned Linear's score lives and how its unit mask covers the weight: one score
    per ``repeat`` rows (``axis`` 0: Q/K/V of a head, FFN up-projection) or columns (1: the attention
    output projection, FFN down-projection)."""

    owner: nn.Module
    attr: str
    axis: int
    repeat: int


HEAD_SCORES, CHANNEL_SCORES = "head_mask_scores", "channel_mask_scores"  # end in mask_scores: own optimizer group
UNIT_LINEARS = {"attention.self.query": (HEAD_SCORES, 0), "attention.self.key": (HEAD_SCORES, 0),
                "attention.self.value": (HEAD_SCORES, 0), "attention.output.dense": (HEAD_SCORES, 1),
                "intermediate.dense": (CHANNEL_SCORES, 0), "output.dense": (CHANNEL_SCORES, 1)}


@COMPRESSORS.register("movement", MovementConfig)
class MovementPruning(Compressor):
    """Hard or soft movement pruning of a transformer's encoder while fine-tuning (Sanh et al. 2020),
    per weight or per head and FFN channel (block movement, removed physically at the end)."""

    smoke = Smoke(("bert", "vit"))
    owns = frozenset({"masks"})

    @classmethod
    def owned(cls, cfg: MovementConfig) -> frozenset[str]:
        # block movement cuts the dead heads and channels out at finalize, as EarlyBERT does
        return cls.owns | {"structure"} if cfg.granularity == "row_col" else cls.owns

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        target = report["target_sparsity"]
        if target is not None and report["granularity"] == "weight" and abs(report["achieved_sparsity"] - target) > 0.01:
            return f"sparsity {report['achieved_sparsity']:.3f}, not the target {target}"
        if report["method"] == "soft" and report["achieved_sparsity"] <= 0:
            return "soft movement pruned no weight"
        if report["granularity"] == "row_col" and report["achieved_sparsity"] > 0 and not report["params_removed"]:
            return "block movement removed no parameter physically"
        return None

    def __init__(self, cfg: MovementConfig):
        super().__init__(cfg)
        self.layers: dict[str, nn.Module] = {}
        self.units: dict[nn.Module, Unit] = {}  # row_col: each targeted Linear's unit scores
        self.level = 0.0  # the schedule's value now: the sparsity (hard, calibrated soft) or τ (soft)
        self.cut = float("-inf")  # calibrated soft: the global score threshold of this step
        self._window = (0, 1)  # (first pruning step, step of the final level) in the stage's steps
        self._hooks: list = []
        self.channel_multiple = 1
        self.export_dir = None
        self.model_cfg = None
        self.final: dict = {}  # row_col: counted before the surgery, for the report

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("train", owner=self.name)]

    def attach(self, model: nn.Module) -> nn.Module:
        if self.cfg.granularity == "row_col":
            self.layers = self._attach_units(model)
        else:
            self.layers = mask_layers(model, self.cfg.layer_types, self.cfg.skip, self.name)
            for module in self.layers.values():
                # a parameter of the layer: trained, checkpointed and moved with the model
                module.mask_scores = nn.Parameter(torch.full_like(module.weight_orig, self.cfg.score_init))
        for module in self.layers.values():
            # after prune's own hook (registered by mask_layers), so this product is the one used
            self._hooks.append(module.register_forward_pre_hook(self._masked_forward))
        return model

    def _attach_units(self, model: nn.Module) -> dict[str, nn.Module]:
        """Scores per head (on ``attention.self``) and per FFN channel (on ``intermediate``), and
        prune's all-ones mask on the six Linears of every encoder layer."""
        names = {module: name for name, module in model.named_modules()}
        layers = {}
        for layer in surgery.encoder_layers(model, self.name):
            owners = {HEAD_SCORES: layer.attention.self, CHANNEL_SCORES: layer.intermediate}
            sizes = {HEAD_SCORES: (surgery.num_heads(layer), surgery.head_size(layer)),
                     CHANNEL_SCORES: (surgery.ffn_width(layer), 1)}
            for attr, owner in owners.items():
                owner.register_parameter(attr, nn.Parameter(torch.full((sizes[attr][0],), self.cfg.score_init)))
            for path, (attr, axis) in UNIT_LINEARS.items():
                module = layer.get_submodule(path)
                prune.identity(module, "weight")
                self.units[module] = Unit(owners[attr], attr, axis, sizes[attr][1])
                layers[names[module]] = module
        return layers

    def prepare(self, ctx: RunContext, datamodule) -> None:
        if ctx.model.name not in TRANSFORMERS:
            raise EffmlError(f"compressor {self.name} prunes a transformer's encoder; model {ctx.model.name} is not "
                             f"one (use model={' or model='.join(TRANSFORMERS)})")
        self.channel_multiple = ctx.hardware.channel_multiple
        self.export_dir = ctx.run_dir.export
        self.model_cfg = ctx.model

    def begin_stage(self, stage: Stage, task) -> None:
        if not getattr(task, "_movement_scores_grouped", False):  # one task serves every stage: wrap once
            task.configure_optimizers = scores_in_own_group(task, self.cfg.score_lr)
            task._movement_scores_grouped = True

    def on_train_start(self, trainer, pl_module) -> None:
        total = max(1, int(trainer.estimated_stepping_batches))
        start = round(self.cfg.warmup_fraction * total)
        self._window = (start, max(start + 1, total - round(self.cfg.cooldown_fraction * total)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a function of the global step (and the scores) alone, so a resumed run continues exactly
        self.level = cubic_sparsity(trainer.global_step, *self._window, 0.0, self.final_level)
        if self.cfg.calibrate:
            self.cut = global_cut(self.scores(), self.level)
        pl_module.log("prune/level", self.level, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.level = self.final_level  # a run cut short still ends at the final level
        if self.cfg.calibrate:
            self.cut = global_cut(self.scores(), self.level)

    def loss(self, task, batch: dict, logits: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.method != "soft" or not self._hooks:
            return None
        # the official regularization(): mean over layers of ||σ(S)||_1 / n, weighted by λ ∝ τ
        l1 = torch.stack([torch.sigmoid(scores).mean() for scores in self.scores()]).mean()
        return self.cfg.final_lambda * (self.level / self.final_level if self.final_level else 0.0) * l1

    def state_dict(self) -> dict:
        # Scores are parameters and masks buffers of the model; the level follows from the global step.
        return {"level": self.level, "cut": self.cut}

    def load_state_dict(self, state_dict: dict) -> None:
        self.level = state_dict["level"]
        self.cut = state_dict.get("cut", float("-inf"))

    @torch.no_grad()
    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module in self.layers.values():
            set_mask(module, self._factor(module, self.final_level).expand_as(module.weight_mask))
        if self.cfg.granularity == "row_col":
            kept = self._kept_units(model)
        for module in self.layers.values():
            unit = self.units.get(module)
            owner, attr = (unit.owner, unit.attr) if unit else (module, "mask_scores")
            if hasattr(owner, attr):
                delattr(owner, attr)
        make_permanent(self.layers)
        self.final = self._count()
        if self.cfg.granularity == "row_col":
            before = sum(p.numel() for p in model.parameters())
            surgery.shrink(model, *kept, who=self.name)
            after = sum(p.numel() for p in model.parameters())
            self.final |= {"params_dense": before, "params_shrunk": after, "params_removed": (before - after) / before,
                           "heads_per_layer": [len(h) for h in kept[0]], "ffn_per_layer": [len(c) for c in kept[1]],
                           "channel_multiple": self.channel_multiple}
            if self.export_dir is not None:  # reload: bert_surgery.load_pruned or model.pretrained=<dir>
                surgery.save_pruned(model, self.export_dir)
                type(model).tokenizer_for(self.model_cfg).save_pretrained(self.export_dir)
        return model

    def target_sparsity(self) -> float | None:
        # row_col: the zeros are cut out, so the model's measured sparsity is not this method's target
        return self._target() if self.cfg.granularity == "weight" else None

    def _target(self) -> float | None:
        return self.cfg.sparsity if self.cfg.method == "hard" or self.cfg.calibrate else None

    def report(self) -> dict:
        counted = self.final or self._count()
        return {
            "method": self.cfg.method,
            "granularity": self.cfg.granularity,
            "calibrated": self.cfg.calibrate,
            "target_sparsity": self._target(),  # row_col: of the heads and channels of every layer
            "threshold": self.cfg.threshold if self.cfg.method == "soft" and not self.cfg.calibrate else None,
            "final_lambda": self.cfg.final_lambda if self.cfg.method == "soft" else None,
            "params_removed": None,  # row_col: the fraction of the model's parameters removed physically
            **counted,
        }

    # -- mechanics --------------------------------------------------------------------------
    @property
    def final_level(self) -> float:
        return self.cfg.sparsity if self.cfg.method == "hard" or self.cfg.calibrate else self.cfg.threshold

    def scores(self) -> list[nn.Parameter]:
        """Every score tensor: one per targeted layer, or one per head group and channel group."""
        if self.units:
            return self._unit_scores()
        return [m.mask_scores for m in self.layers.values()]

    def _unit_scores(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for unit in self.units.values():
            scores = getattr(unit.owner, unit.attr)
            seen.setdefault(id(scores), scores)
        return list(seen.values())

    def mask_of(self, scores: torch.Tensor, level: float, unit: bool = False) -> torch.Tensor:
        if self.cfg.method == "hard":  # a head group keeps at least one head
            return top_k_mask(scores, min(level, 1 - 1 / scores.numel()) if unit else level)
        if self.cfg.calibrate:
            return above_mask(scores, self.cut)
        return threshold_mask(scores, level)

    def _factor(self, module: nn.Module, level: float) -> torch.Tensor:
        """The mask of ``module``'s weight, straight-through to its scores (a row or column
        broadcast for block movement: multiply, don't expand)."""
        unit = self.units.get(module)
        scores = getattr(unit.owner, unit.attr) if unit else module.mask_scores
        factor = straight_through(self.mask_of(scores.detach(), level, unit is not None), scores)
        if unit is None:
            return factor
        factor = factor.repeat_interleave(unit.repeat)
        return factor[:, None] if unit.axis == 0 else factor[None, :]

    def _masked_forward(self, module: nn.Module, inputs) -> None:
        factor = self._factor(module, self.level)
        with torch.no_grad():
            module.weight_mask.copy_(factor.detach().expand_as(module.weight_mask))  # what checkpoints see
        module.weight = module.weight_orig * factor

    def _kept_units(self, model: nn.Module) -> tuple[list[list[int]], list[list[int]]]:
        """Per layer, the heads and FFN channels to keep: the unmasked ones, plus the next-best
        masked ones up to a width that is a multiple of ``channel_multiple`` (they are zeros: the
        function is unchanged)."""
        heads, channels = [], []
        for layer in surgery.encoder_layers(model, self.name):
            for attr, owner, out, unit in ((HEAD_SCORES, layer.attention.self, heads, surgery.head_size(layer)),
                                           (CHANNEL_SCORES, layer.intermediate, channels, 1)):
                scores = getattr(owner, attr).detach()
                alive = self.mask_of(scores, self.final_level, unit=True).bool()
                count = surgery.round_up(int(alive.sum()), self.channel_multiple, unit, scores.numel())
                order = sorted(range(scores.numel()), key=lambda i: (not alive[i], -float(scores[i])))
                out.append(sorted(order[:count]))
        return heads, channels

    def _count(self) -> dict:
        per_layer = {name: round(float((m.weight == 0).float().mean()), 6) for name, m in self.layers.items()}
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        total = sum(m.weight.numel() for m in self.layers.values())
        return {"achieved_sparsity": zeros / total,  # counted from the finalized weights of the targeted layers
                "remaining": 1 - zeros / total, "pruned_weights": total, "layers": per_layer}


def scores_in_own_group(task, base_score_lr: float):
    """The task's ``configure_optimizers`` with the scores moved to a group of their own: their own
    learning rate (times the stage's ``lr_scale``, like trainer.lr), no weight decay (the official
    code's second group), on the same lr schedule. Done before the fit (not in a fit hook), so a
    resumed optimizer's state loads into groups of the same shape."""
    original = task.configure_optimizers

    def configure_optimizers():
        configured = original()
        scores = [p for n, p in task.model.named_parameters() if n.endswith("mask_scores") and p.requires_grad]
        if scores:  # none in a teacher's own stage, or once the scores are folded in
            move_to_own_group(configured, scores, base_score_lr * task.lr_scale)
        return configured

    return configure_optimizers
