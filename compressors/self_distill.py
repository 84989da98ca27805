"""Self-distillation: shallow classifiers that learn from the network's own deepest classifier.

Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019 (arXiv 1905.08094), §3 (the training framework);
and Zhang, Bao, Ma, "Self-Distillation: Towards Efficient and Compact Neural Networks", TPAMI 44(8),
2022, §3 (shallow classifiers with attention modules; dynamic inference with a genetic threshold search).

The network is cut into sections; after each section but the last (``exits``, module paths, shallow
to deep) a shallow classifier g_i is attached: an attention module (TPAMI: a separable conv of
stride 2, bilinear upsampling back and a sigmoid, multiplied into the features), an alignment net
(one SepConv of stride 2 per channel doubling, so its output has the channels of the last section,
then global average pooling: the feature F_i) and a linear layer (logits q_i). The deepest classifier
g_C is the model's own head (``classifier``) on its pooled last-section feature F_C. Training loss:

    L = CE(q_C, y) + Σ_{i<C} [ (1 − α)·CE(q_i, y) + α·KL(softmax(q_C/τ) ‖ softmax(q_i/τ)) ]
                   + λ · Σ_{i<C} mean_batch ‖F_i − F_C‖²

The deepest classifier trains on the cross-entropy alone (TPAMI: its α and λ are 0; the
task's own cross-entropy, ``hard_loss_weight`` 1); the teacher side (q_C, F_C) is detached, as in
the official code (ArchipLab-LinfengZhang/pytorch-self-distillation-final: ``outputs[0].detach()``),
so the shallow terms never pull the deepest classifier towards the shallow ones (the backbone below
an exit still learns from that exit's terms: that is what improves it). Defaults are the official
code's: α = 0.3 (``loss_coefficient``) and τ = 3; its soft cross-entropy has the KL's gradient and no
τ² factor (``t_squared`` adds Hinton's τ²). λ = 0.03 is the ``feature_loss_coefficient`` of code built
on the authors' release (the final release has no feature term; that code multiplies λ with the
unsquared norm over the whole batch, ``torch.dist``); we keep the paper's squared norm per sample,
averaged over the batch, whose gradient at batch 128 is within a few times the code's.
``detach_backbone=true`` is our control, not the paper's: the shallow classifiers see detached
features, so the backbone gets the plain network's gradients and trains as it does (the table's
baseline series; bit-identical only where the kernels are deterministic), with the classifiers
learned on top of it.

Dynamic inference (TPAMI): a sample leaves at the first shallow classifier whose top softmax
probability is >= that classifier's threshold; if none is confident, the ensemble (mean logits) of
all classifiers answers (``fallback=ensemble``, the paper) or the deepest (``fallback=deepest``).
Exiting at i costs the backbone up to exit i plus the heads of exits 1..i (each was evaluated and
rejected before); FLOPs are counted with ``torch.utils.flop_counter`` on one example (a multiply-add
is 2; BN, pooling and activations are not counted, as everywhere in effml.measure).

``finalize`` measures, on the validation and test splits: every classifier's accuracy and FLOPs,
the ensemble's, a sweep of one shared threshold over all shallow classifiers (``thresholds``), and,
per FLOPs budget (``flops_budgets``, fractions of the plain network's FLOPs), per-classifier
thresholds found by a genetic algorithm on the validation split (the paper's method: thresholds
encoded as binary genes, fitness from accuracy and cost; the paper gives no GA settings, ours:
``search_bits`` bits per threshold on [0, 1], tournaments of 3, one-point crossover with probability
0.9, bit-flip mutation with probability 1/(genome length), 2 elites, the initial population seeded
with the shared-threshold sweep, and the result never worse than the sweep's best; fitness =
validation accuracy when the average FLOPs are within the budget, else minus the relative excess, so
every feasible point beats every infeasible one) and then applied to the test split (``search=grid``
takes the best shared threshold of the sweep instead). It writes the accuracy-vs-average-FLOPs plot
(``self_distill_dynamic.png``) and the shallow classifiers with the chosen thresholds
(``self_distill_exits.pt``) into the run directory.

The finalized model is the plain network (its deepest classifier): the shallow classifiers and
hooks are removed, so ``model.pt`` loads as a plain ResNet (e.g. as a teacher) and the run's
measured latency is that of the plain network, with no speed-up claimed. What dynamic inference
would save is reported as FLOPs (``compressors.self_distill.dynamic``), not as measured time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.choice import check_choices, choice
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, autocast_dtype
from effml.errors import EffmlError
from effml.paths import RunDir, atomic_save
from effml.registry import COMPRESSORS
from effml.teachers import FeatureTap

Fallback = choice("Fallback", "ensemble deepest")  # no shallow classifier confident: the ensemble of all (TPAMI), or the deepest
Search = choice("Search", "genetic grid")  # genetic: the paper's; grid: the best shared threshold of the sweep
HEADS = "self_distill_exits"  # the attribute the shallow classifiers live under in the model


@dataclass
class SelfDistillConfig(CompressorConfig):
    """Self-distillation (Zhang et al., ICCV 2019 / TPAMI 2022): shallow classifiers (attention + SepConv
    alignment + FC) after each stage but the last learn from the deepest (α=0.3, τ=3, λ=0.03, the official
    code); dynamic inference with per-classifier thresholds found by a genetic search. Needs a CNN with
    stages, e.g. model=resnet20."""

    name: str = "self_distill"
    exits: list[str] = field(default_factory=lambda: ["layer1", "layer2"])  # shallow to deep; the last section's head is the model's
    alpha: float = 0.3  # α: weight of the KL to the deepest classifier; the shallow CE gets 1 − α (official code)
    temperature: float = 3.0  # τ of the softened distributions (official code)
    feature_weight: float = 0.03  # λ on ‖F_i − F_C‖² (official code's feature_loss_coefficient)
    t_squared: bool = False  # multiply the KL by τ² (Hinton et al.); the official code does not
    attention: bool = True  # TPAMI's attention module before the alignment net (ICCV 2019 had none)
    detach_backbone: bool = False  # control: the shallow classifiers learn on detached features
    fallback: Fallback = Fallback.ensemble
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999])
    flops_budgets: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8])  # × the plain network's FLOPs
    search: Search = Search.genetic
    search_population: int = 40
    search_generations: int = 40
    search_bits: int = 10  # bits per threshold: thresholds on a grid of 2^bits − 1 steps in [0, 1]

    def __post_init__(self):
        check_choices(self, "compressor")
        if not self.exits or len(set(self.exits)) != len(self.exits):
            raise EffmlError(f"compressor.exits must name at least one module, each once; got {list(self.exits)}")
        if not 0 <= self.alpha <= 1:
            raise EffmlError(f"compressor.alpha must be in [0, 1]; got {self.alpha}")
        if self.temperature <= 0:
            raise EffmlError(f"compressor.temperature must be > 0; got {self.temperature}")
        if self.feature_weight < 0:
            raise EffmlError(f"compressor.feature_weight must be >= 0; got {self.feature_weight}")
        if not self.thresholds or any(not 0 <= t <= 1 for t in self.thresholds):
            raise EffmlError(f"compressor.thresholds must be probabilities in [0, 1]; got {list(self.thresholds)}")
        if any(b <= 0 for b in self.flops_budgets):
            raise EffmlError(f"compressor.flops_budgets must be > 0 (fractions of the plain network's FLOPs); "
                             f"got {list(self.flops_budgets)}")
        if self.search_population < 4:
            raise EffmlError(f"compressor.search_population must be >= 4; got {self.search_population}")
        if self.search_generations < 1:
            raise EffmlError(f"compressor.search_generations must be >= 1; got {self.search_generations}")
        if not 2 <= self.search_bits <= 24:
            raise EffmlError(f"compressor.search_bits must be in [2, 24]; got {self.search_bits}")


# -- the shallow classifiers ---------------------------------------------------------------------
class SepConv(nn.Sequential):
    """Two depthwise-separable 3×3 convs, the first with ``stride`` (the official code's SepConv)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        )


class Attention(nn.Module):
    """TPAMI's attention: a mask from a strided SepConv, upsampled back (bilinear), sigmoid, times the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.mask = SepConv(channels, channels, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = F.interpolate(self.mask(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(mask) * x


class ShallowClassifier(nn.Module):
    """Attention → alignment net (a strided SepConv per channel doubling up to the deepest section's
    channels) → global average pool (the feature F_i) → linear (the logits q_i)."""

    def __init__(self, channels: int, final_channels: int, num_classes: int, attention: bool):
        super().__init__()
        self.attention = Attention(channels) if attention else nn.Identity()
        steps = []
        while channels < final_channels:
            steps.append(SepConv(channels, 2 * channels, 2))
            channels *= 2
        self.align = nn.Sequential(*steps)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(final_channels, num_classes)
        for m in self.modules():  # as the backbone (and the official code): He init of every conv
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.pool(self.align(self.attention(x))).flatten(1)
        return feature, self.fc(feature)


def out_channels(module: nn.Module) -> int | None:
    """The channels a module's output has: those of its last conv or batch norm."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            last = m.num_features
        elif isinstance(m, nn.Conv2d):
            last = m.out_channels
    return last


# -- the loss --------------------------------------------------------------------------------
def self_distill_loss(
    exit_logits: list[Tensor], exit_features: list[Tensor], final_logits: Tensor, final_feature: Tensor,
    labels: Tensor, alpha: float, temperature: float, feature_weight: float, t_squared: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Σ_i [(1 − α)·CE(q_i, y) + α·KL(q_C^τ ‖ q_i^τ)] + λ·Σ_i mean_b ‖F_i − F_C‖², teacher side detached.

    The deepest classifier's own CE is the task's, not counted here."""
    teacher = F.log_softmax(final_logits.detach().float() / temperature, dim=-1)
    target = final_feature.detach().float()
    total = final_logits.new_zeros((), dtype=torch.float32)
    for logits, feature in zip(exit_logits, exit_features, strict=True):
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        student = F.log_softmax(logits.float() / temperature, dim=-1)
        kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
        if t_squared:
            kl = kl * temperature**2
        hint = (feature.float() - target).pow(2).sum(-1).mean()
        total = total + (1 - alpha) * ce + alpha * kl + feature_weight * hint
    return total


# -- dynamic inference (pure numpy over cached outputs) --------------------------------------
@dataclass
class ExitOutputs:
    """Every classifier's outputs on one split: confidence and correctness, K × N."""

    confidence: np.ndarray  # top softmax probability of classifier k on sample n
    correct: np.ndarray  # bool: classifier k is right on sample n
    ensemble_correct: np.ndarray  # bool, N: the mean-logit ensemble of all K classifiers is right

    @classmethod
    def from_logits(cls, logits: Tensor, labels: Tensor) -> ExitOutputs:
        """``logits``: K × N × classes."""
        probs = logits.float().softmax(-1)
        ensemble = logits.float().mean(0).argmax(-1)
        return cls(probs.max(-1).values.numpy(), (logits.argmax(-1) == labels).numpy(),
                   (ensemble == labels).numpy())


def exit_index(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per sample, the first shallow classifier (0-based) whose confidence is >= its threshold, or
    K − 1 (the deepest) when none is."""
    confident = confidence[:-1] >= np.asarray(thresholds, dtype=np.float64)[:, None]
    first = confident.argmax(0)  # argmax returns the first True
    return np.where(confident.any(0), first, confidence.shape[0] - 1)


def dynamic_inference(out: ExitOutputs, thresholds, costs: np.ndarray, fallback: str = "ensemble") -> dict:
    """Accuracy, average exit depth (1 = shallowest), average FLOPs and the share of samples per exit."""
    k = out.confidence.shape[0]
    chosen = exit_index(out.confidence, thresholds)
    correct = out.correct[chosen, np.arange(chosen.size)]
    if fallback == "ensemble":  # nobody confident: the ensemble answers, at the deepest exit's cost
        unsure = ~(out.confidence[:-1] >= np.asarray(thresholds)[:, None]).any(0)
        correct = np.where(unsure, out.ensemble_correct, correct)
    return {
        "acc": float(correct.mean()),
        "avg_depth": float((chosen + 1).mean()),
        "avg_flops": float(costs[chosen].mean()),
        "exit_fractions": [float((chosen == i).mean()) for i in range(k)],
    }


def fitness(result: dict, budget: float) -> float:
    """Accuracy when within the FLOPs budget; otherwise below every feasible point, by the excess."""
    excess = result["avg_flops"] / budget - 1
    return result["acc"] if excess <= 1e-12 else -excess


def genetic_search(
    out: ExitOutputs, costs: np.ndarray, budget: float, fallback: str, rng: np.random.Generator,
    population: int = 40, generations: int = 40, bits: int = 10, seeds=(),
) -> list[float]:
    """Per-classifier thresholds maximizing ``fitness`` (TPAMI: binary genes, fitness from
    accuracy and cost). ``seeds`` (shared thresholds, e.g. the sweep, or per-classifier lists) join the
    first population, and the result is never worse than the best of them."""
    genes, scale = out.confidence.shape[0] - 1, 2**bits - 1
    seeds = [[float(s)] * genes if np.isscalar(s) else [float(t) for t in s] for s in seeds]
    weights = 2 ** np.arange(bits - 1, -1, -1)

    def decode(pop: np.ndarray) -> np.ndarray:
        return pop.reshape(len(pop), genes, bits) @ weights / scale

    def encode(thresholds: list[float]) -> np.ndarray:
        codes = np.rint(np.clip(thresholds, 0, 1) * scale).astype(int)
        return ((codes[:, None] >> np.arange(bits - 1, -1, -1)) & 1).reshape(-1)

    def value(thresholds) -> float:
        return fitness(dynamic_inference(out, thresholds, costs, fallback), budget)

    def score(pop: np.ndarray) -> np.ndarray:
        return np.array([value(t) for t in decode(pop)])

    pop = rng.integers(0, 2, (population, genes * bits))
    for i, seed in enumerate(seeds[: population // 2]):
        pop[i] = encode(seed)
    scores = score(pop)
    for _ in range(generations):
        elite = pop[np.argsort(-scores, kind="stable")[:2]]
        pairs = rng.integers(0, population, (population - 2, 2, 3))  # tournaments of 3, two parents each
        winners = np.take_along_axis(pairs, scores[pairs].argmax(-1)[..., None], -1)[..., 0]
        a, b = pop[winners[:, 0]], pop[winners[:, 1]]
        cut = rng.integers(1, genes * bits, (population - 2, 1))
        cross = rng.random((population - 2, 1)) < 0.9
        children = np.where(cross & (np.arange(genes * bits) >= cut), b, a)
        flips = rng.random(children.shape) < 1 / (genes * bits)
        pop = np.concatenate([elite, children ^ flips])
        scores = score(pop)
    best = [float(t) for t in decode(pop[[int(np.argmax(scores))]])[0]]
    # a seed on the bit grid only approximately: compare it exactly
    return max([best, *seeds], key=value)


def grid_search(out: ExitOutputs, costs: np.ndarray, budget: float, fallback: str, grid: list[float]) -> list[float]:
    """The best shared threshold of ``grid`` (and 0, i.e. everything at the first exit)."""
    genes = out.confidence.shape[0] - 1
    candidates = [[t] * genes for t in [0.0, *grid]]
    return max(candidates, key=lambda t: fitness(dynamic_inference(out, t, costs, fallback), budget))


# -- the compressor ----------------------------------------------------------------------------
@COMPRESSORS.register("self_distill", SelfDistillConfig)
class SelfDistillation(Compressor):
    """Shallow classifiers at several depths learn from the deepest (Zhang et al., ICCV 2019 / TPAMI 2022)."""

    smoke = Smoke(("resnet",))  # exits after layer1/2
    owns = frozenset({"modules"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        return None if "dynamic" in metrics["compressors"][name] else "the exits were never measured"

    def __init__(self, cfg: SelfDistillConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.tap: FeatureTap | None = None
        self.final_hook = None
        self.final_feature: Tensor | None = None
        self.datamodule = None
        self.run_dir: RunDir | None = None
        self.trainer_cfg = None
        self.seed = 0
        self.results: dict[str, Any] = {}

    # -- attach: the heads become part of the model ----------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        head = getattr(model, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise EffmlError(f"compressor self_distill needs a CNN whose deepest classifier is a linear "
                             f"`classifier` on pooled features (model=resnet20); {type(model).__name__} has none")
        heads = []
        for path in self.cfg.exits:
            channels = out_channels(self.find(model, path))
            ratio = head.in_features / channels if channels else 0
            if not channels or ratio < 1 or not float(ratio).is_integer() or not math.log2(ratio).is_integer():
                raise EffmlError(f"compressor.exits: '{path}' gives {channels} channels, the deepest feature "
                                 f"{head.in_features}: the alignment net needs a power-of-two ratio")
            heads.append(ShallowClassifier(channels, head.in_features, head.out_features, self.cfg.attention))
        model.add_module(HEADS, nn.ModuleList(heads))
        self.model = model
        self.tap = FeatureTap(model, list(self.cfg.exits), who="model")
        self.final_hook = head.register_forward_pre_hook(self._capture_final)
        return model

    @staticmethod
    def find(model: nn.Module, path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise EffmlError(f"compressor.exits: the model ({type(model).__name__}) has no module '{path}'; "
                             "self_distill attaches classifiers to a CNN's stages, e.g. model=resnet20") from None

    def _capture_final(self, module, args) -> None:
        self.final_feature = args[0]

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.datamodule, self.run_dir = datamodule, ctx.run_dir
        self.trainer_cfg, self.seed = ctx.trainer, ctx.seed
        self.check_order(datamodule.example_inputs(2))

    def check_order(self, inputs: dict[str, Tensor]) -> None:
        """The exits must fire shallow to deep, all before the deepest classifier."""
        fired: list[str] = []
        handles = [self.find(self.model, p).register_forward_hook(lambda *_, p=p: fired.append(p))
                   for p in self.cfg.exits]
        handles.append(self.model.classifier.register_forward_hook(lambda *_: fired.append("classifier")))
        was_training = self.model.training
        try:
            with torch.no_grad():
                self.model.eval()(**inputs)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        expected = [*self.cfg.exits, "classifier"]
        if fired != expected:
            raise EffmlError(f"compressor.exits must be modules run once each, shallow to deep, before the "
                             f"classifier; the forward runs {fired}")

    # -- training -------------------------------------------------------------------------------
    def heads(self) -> nn.ModuleList:
        return getattr(self.model, HEADS)

    def exit_outputs(self, detach: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """(features F_i, logits q_i) of every shallow classifier on the last forward's stage outputs."""
        features, logits = [], []
        for path, head in zip(self.cfg.exits, self.heads(), strict=True):
            x = self.tap.features[path]
            f, q = head(x.detach() if detach else x)
            features.append(f)
            logits.append(q)
        return features, logits

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if task.model is not self.model or self.final_feature is None:
            return None  # another compressor's stage trains another model (a teacher)
        features, exit_logits = self.exit_outputs(detach=self.cfg.detach_backbone)
        return self_distill_loss(
            exit_logits, features, logits, self.final_feature, batch["labels"], self.cfg.alpha,
            self.cfg.temperature, self.cfg.feature_weight, self.cfg.t_squared, task.cfg.label_smoothing,
        )

    # -- finalize: measure dynamic inference, then remove the heads --------------------------------
    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        if self.datamodule is not None:
            device = torch.device("cuda" if getattr(hardware, "accelerator", "cpu") == "gpu"
                                  and torch.cuda.is_available() else "cpu")
            self.results = self.measure(model, device, autocast_dtype(hardware, device))
            self.save_exits()
            self.plot()
        self.detach_from(model)
        return model

    def detach_from(self, model: nn.Module) -> None:
        """Remove every hook and the shallow classifiers: the model is the plain network again."""
        if self.tap is not None:
            self.tap.close()
        if self.final_hook is not None:
            self.final_hook.remove()
        self.final_hook, self.final_feature = None, None
        if hasattr(model, HEADS):
            delattr(model, HEADS)

    def measure(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
        was_training = model.training
        model.to(device).eval()
        try:
            flops = self.count_flops(model, device)
            # the precision the run evaluates in, so the deepest classifier's accuracy is the run's test_acc
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                splits = {s: self.split_outputs(model, s, device) for s in ("val", "test")}
        finally:
            model.cpu().train(was_training)
        return self.summarize(flops, splits)

    @torch.no_grad()
    def split_outputs(self, model: nn.Module, split: str, device: torch.device) -> ExitOutputs:
        """Every classifier's logits on a split (as many batches as the trainer evaluates)."""
        loader = self.datamodule.val_dataloader() if split == "val" else self.datamodule.test_dataloader()
        limit = getattr(self.trainer_cfg, f"limit_{split}_batches", None)
        n = len(loader) if limit is None else (int(limit) if limit >= 1 else int(len(loader) * limit))
        all_logits, all_labels = [], []
        for i, batch in enumerate(loader):
            if i >= n:
                break
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            final = model(**inputs)
            _, exits = self.exit_outputs()
            all_logits.append(torch.stack([*exits, final]).float().cpu())
            all_labels.append(batch["labels"])
        return ExitOutputs.from_logits(torch.cat(all_logits, 1), torch.cat(all_labels))

    @torch.no_grad()
    def count_flops(self, model: nn.Module, device: torch.device) -> dict[str, list[float]]:
        """Per sample: the backbone up to each exit (flop counter read as the exit's module returns),
        the whole backbone, and each head on its own."""
        from torch.utils.flop_counter import FlopCounterMode

        inputs = {k: v[:1].to(device) for k, v in self.datamodule.example_inputs(1).items()}
        prefix: list[float] = []
        with FlopCounterMode(display=False) as counter:
            handles = [self.find(model, p).register_forward_hook(lambda *_: prefix.append(counter.get_total_flops()))
                       for p in self.cfg.exits]
            try:
                model(**inputs)
            finally:
                for h in handles:
                    h.remove()
            full = counter.get_total_flops()
        heads = []
        for path, head in zip(self.cfg.exits, self.heads(), strict=True):
            with FlopCounterMode(display=False) as counter:
                head(self.tap.features[path])
            heads.append(counter.get_total_flops())
        return {"prefix": [float(p) for p in prefix], "full": float(full), "heads": [float(h) for h in heads]}

    def summarize(self, flops: dict, splits: dict[str, ExitOutputs]) -> dict[str, Any]:
        k, full = len(self.cfg.exits) + 1, flops["full"]
        standalone = np.array([p + h for p, h in zip(flops["prefix"], flops["heads"], strict=True)] + [full])
        reached = np.array([p + sum(flops["heads"][: i + 1]) for i, p in enumerate(flops["prefix"])]
                           + [full + sum(flops["heads"])])
        params = [sum(p.numel() for p in h.parameters()) for h in self.heads()]
        exits = [{
            "exit": i + 1,
            "module": ([*self.cfg.exits, "classifier"])[i],
            "val_acc": float(splits["val"].correct[i].mean()),
            "test_acc": float(splits["test"].correct[i].mean()),
            "flops": float(standalone[i]),  # this classifier alone: backbone up to it + its head
            "flops_reached": float(reached[i]),  # exiting here in dynamic inference
            "flops_fraction": float(standalone[i] / full),
            "head_flops": flops["heads"][i] if i < k - 1 else None,
            "head_params": params[i] if i < k - 1 else None,
        } for i in range(k)]
        sweep = [self.point(splits["test"], [t] * (k - 1), reached, full, threshold=t) for t in self.cfg.thresholds]
        searched = [self.searched(splits, reached, full, budget) for budget in self.cfg.flops_budgets]
        return {
            "exits": exits,
            "ensemble": {s: float(splits[s].ensemble_correct.mean()) for s in ("val", "test")},
            "plain_flops": full,
            "exit_params": sum(params),
            "finalized": "plain network: shallow classifiers removed; dynamic inference reported in FLOPs",
            "dynamic": {"fallback": self.cfg.fallback, "sweep": sweep, "search": {
                "method": self.cfg.search, "population": self.cfg.search_population,
                "generations": self.cfg.search_generations, "bits": self.cfg.search_bits,
                "selected_on": "val", "budgets": searched,
            }},
        }

    def point(self, out: ExitOutputs, thresholds: list[float], costs: np.ndarray, full: float, **extra) -> dict:
        r = dynamic_inference(out, thresholds, costs, self.cfg.fallback)
        return {**extra, "acc": r["acc"], "avg_depth": r["avg_depth"], "avg_flops": r["avg_flops"],
                "flops_fraction": r["avg_flops"] / full, "speedup": full / r["avg_flops"],
                "exit_fractions": r["exit_fractions"]}

    def searched(self, splits: dict[str, ExitOutputs], costs: np.ndarray, full: float, budget: float) -> dict:
        """Thresholds chosen on val under ``budget`` × the plain FLOPs, then measured on test."""
        val, limit = splits["val"], budget * full
        if self.cfg.search == "grid":
            thresholds = grid_search(val, costs, limit, self.cfg.fallback, list(self.cfg.thresholds))
        else:
            rng = np.random.default_rng(self.seed)
            thresholds = genetic_search(
                val, costs, limit, self.cfg.fallback, rng, self.cfg.search_population,
                self.cfg.search_generations, self.cfg.search_bits, seeds=[0.0, *self.cfg.thresholds, 1.0],
            )
        on_val = dynamic_inference(val, thresholds, costs, self.cfg.fallback)
        return {"budget": budget, "thresholds": thresholds, "feasible": on_val["avg_flops"] <= limit * (1 + 1e-9),
                "val_acc": on_val["acc"], "val_flops_fraction": on_val["avg_flops"] / full,
                **{f"test_{k}": v for k, v in self.point(splits["test"], thresholds, costs, full).items()}}

    # -- outputs --------------------------------------------------------------------------------
    def save_exits(self) -> None:
        """The shallow classifiers and the chosen thresholds: what dynamic inference deploys."""
        if self.run_dir is None:
            return
        budgets = self.results["dynamic"]["search"]["budgets"]
        atomic_save({"exits": list(self.cfg.exits), "attention": self.cfg.attention,
                     "state_dict": {k: v.cpu() for k, v in self.heads().state_dict().items()},
                     "thresholds": {b["budget"]: b["thresholds"] for b in budgets}},
                    self.run_dir.artifact("self_distill_exits.pt"))

    def plot(self) -> None:
        """Test accuracy vs average FLOPs: each classifier alone, the threshold sweep, the searched points."""
        if self.run_dir is None:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        r, mega = self.results, 1e6
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        exits = r["exits"]
        axes.plot([e["flops"] / mega for e in exits], [100 * e["test_acc"] for e in exits], "s-", color="C0",
                  label="each classifier alone (1 = shallowest)")
        for e in exits:
            axes.annotate(str(e["exit"]), (e["flops"] / mega, 100 * e["test_acc"]), textcoords="offset points",
                          xytext=(4, -10), fontsize=7, color="C0")
        sweep = r["dynamic"]["sweep"]
        axes.plot([p["avg_flops"] / mega for p in sweep], [100 * p["acc"] for p in sweep], "o-", color="C1",
                  label=f"dynamic, one threshold (fallback: {self.cfg.fallback})")
        for p in sweep:
            axes.annotate(f"{p['threshold']:g}", (p["avg_flops"] / mega, 100 * p["acc"]), textcoords="offset points",
                          xytext=(4, 4), fontsize=6, color="C1")
        chosen = r["dynamic"]["search"]["budgets"]
        budgets = ", ".join(f"{b['budget']:g}" for b in chosen)
        axes.plot([b["test_avg_flops"] / mega for b in chosen], [100 * b["test_acc"] for b in chosen], "*",
                  color="C2", markersize=11, label=f"dynamic, {self.cfg.search} search on val "
                  f"(budgets {budgets}× plain FLOPs)")
        axes.axvline(r["plain_flops"] / mega, color="black", linestyle="--", linewidth=1, label="plain network FLOPs")
        axes.set_xlabel("average FLOPs per sample (M)")
        axes.set_ylabel("test accuracy (%)")
        axes.set_title("Self-distillation: dynamic inference (Zhang et al., TPAMI 2022)", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        path = self.run_dir.artifact("self_distill_dynamic.png")
        figure.savefig(path, dpi=150)
        self.results["plot"] = str(path)

    def report(self) -> dict[str, Any]:
        return {"alpha": self.cfg.alpha, "temperature": self.cfg.temperature,
                "feature_weight": self.cfg.feature_weight, "detach_backbone": self.cfg.detach_backbone,
                **self.results}
