"""MetaPruning: a PruningNet that generates the weights of any channel structure, evolutionary search
under a FLOPs constraint, and the found structure retrained from scratch.

Liu, Mu, Zhang, Guo, Yang, Cheng & Sun, "MetaPruning: Meta Learning for Automatic Neural Network
Channel Pruning" (ICCV 2019, arXiv 1903.10258), and the official code (liuzechun/MetaPruning):

- **PruningNet** (§3.2): for every conv and linear layer a meta block FC(2 → 32) → ReLU →
  FC(32 → out·in·k·k) maps the layer's encoding, (input width, output width) as fractions of the
  full widths, to the full weight, of which the structure's channels are kept. Each training batch
  samples a random structure (§3.2: "randomly sampled network encodings"); the loss trains the meta
  blocks (and the shared BN).
- **Evolutionary search** (§3.3, ``search.py``): population 50, the top 10 are parents, 25 children
  by mutation (each gene with probability 0.1) and 25 by crossover, 20 iterations; a candidate out of
  the FLOPs budget is never kept. Each candidate is scored with its generated weights, BN statistics
  recalibrated on training batches, on the held-out validation split (held out of the training data).
  Before the search, the initial population's mean accuracy must beat chance (1/classes) by
  ``chance_margin``: users of the official code report searches whose accuracy stays at chance
  (issues #28, #35); such a run stops with one line.
- **Retrain** (§4): the found structure trains from a fresh initialization; ``finalize`` removes the
  other channels (``effml/models/channel_surgery.py``, Torch-Pruning), widths rounded up to the
  hardware's ``channel_multiple``.

**Measured latency as the constraint** (``constraint=latency``; beyond the paper, which constrains
FLOPs; issue 22): a candidate is kept when its measured inference latency is at most
``latency_target`` of the dense model's, both timed on the run's device (the hardware target: a CPU
run times the CPU, a GPU run the GPU), the candidate cut out physically (widths rounded to the
hardware's ``channel_multiple``, as it would deploy) and timed interleaved with the dense model at
the run's ``measure.batch_size`` (``latency_batch``), so the ratio sees the same load; each model's
fastest of ``latency_iters`` rounds counts (the round least disturbed by other load). Each structure is measured once: the measurements are cached per
structure and appended to ``latency_cache.jsonl`` in the run directory, so a search killed midway
re-makes the same decisions from the same seed. The report says which constraint ruled and gives
the measured latency of the found structure, of the uniform baseline under the same constraint and
of the dense model, timed together at the end of the search.

``search=uniform`` is the paper's baseline (Table 1, "uniform baseline"): every channel group scaled
by one ratio, the largest whose FLOPs fit the same budget, trained from scratch the same way.

Channels are effml's DepGraph groups: a ResNet's residual stream is one gene (its convs keep the same
channels), each block's inner conv another. A structure keeps the first w channels of each group.
FLOPs of a structure are the dense model's per-layer FLOPs (one measured forward) times each layer's
kept fraction of weights; BN and element-wise ops are left out of the count. The search runs at the
start of the retrain stage and its result is written to ``search.json`` in the run directory, so a
resumed run does not search again; killed mid-search, it searches again from the same seed and finds
the same structure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from effml import distributed
from effml.choice import check_choices, choice
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke, Stage
from effml.compressors.imp import fresh_init, restore
from effml.errors import EffmlError
from effml.measure import compare_models
from effml.models import channel_surgery as cs
from effml.models._common import recalibrate
from effml.paths import atomic_file
from effml.registry import COMPRESSORS

Search = choice("Search", "evolutionary uniform")  # MetaPruning's search, or the uniform-width baseline
Constraint = choice("Constraint", "flops latency")  # the search's budget: counted FLOPs or measured latency
LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class MetaPruningConfig(CompressorConfig):
    """MetaPruning (Liu et al., ICCV 2019): PruningNet trained on random structures, evolutionary search
    (population 50, 25 mutations, 25 crossovers, top 10 parents, 20 iterations) under a FLOPs budget,
    the found structure retrained from scratch; search=uniform is the uniform-width baseline."""

    name: str = "metapruning"
    search: Search = Search.evolutionary
    constraint: Constraint = Constraint.flops
    flops_target: float = 0.5  # of the dense model's FLOPs (constraint=flops)
    latency_target: float = 0.6  # of the dense model's measured latency (constraint=latency)
    latency_batch: int | None = None  # batch size of the latency measurements; None: the run's measure.batch_size
    latency_iters: int = 20  # timed rounds per measurement (dense and candidate interleaved)
    min_ratio: float = 0.1  # width choices per group: min_ratio, min_ratio + ratio_step, ..., 1
    ratio_step: float = 0.1
    hidden: int = 32  # the meta blocks' hidden width (official: 32)
    pruningnet_epochs: int | None = None  # None: trainer.max_epochs
    retrain_epochs: int | None = None
    population: int = 50
    parents: int = 10  # the official select_num
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    iterations: int = 20
    recalibration_batches: int = 4  # training batches that re-estimate BN statistics per candidate
    chance_margin: float = 0.05  # the initial population's mean accuracy must beat 1/classes by this
    output_layer: str = "classifier"

    def __post_init__(self):
        check_choices(self, "compressor")
        if not 0 < self.flops_target <= 1:
            raise EffmlError(f"compressor.flops_target must be in (0, 1]; got {self.flops_target}")
        if not 0 < self.latency_target <= 1:
            raise EffmlError(f"compressor.latency_target must be in (0, 1]; got {self.latency_target}")
        if not 0 < self.min_ratio <= 1:
            raise EffmlError(f"compressor.min_ratio must be in (0, 1]; got {self.min_ratio}")
        if not 0 < self.ratio_step <= 1:
            raise EffmlError(f"compressor.ratio_step must be in (0, 1]; got {self.ratio_step}")
        for name in ("hidden", "population", "parents", "iterations", "recalibration_batches", "latency_iters"):
            if getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {getattr(self, name)}")
        if self.parents > self.population:
            raise EffmlError(f"compressor.parents ({self.parents}) must be <= compressor.population ({self.population})")
        if not 0 <= self.mutation_prob <= 1:
            raise EffmlError(f"compressor.mutation_prob must be in [0, 1]; got {self.mutation_prob}")
        for name in ("pruningnet_epochs", "retrain_epochs", "latency_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {getattr(self, name)}")

    def ratios(self) -> list[float]:
        steps = math.floor((1 - self.min_ratio) / self.ratio_step + 1e-9)
        return sorted({round(min(1.0, self.min_ratio + i * self.ratio_step), 6) for i in range(steps + 1)} | {1.0})


class MetaBlock(nn.Module):
    """One layer's weight generator: (input width, output width) fractions → the full weight."""

    def __init__(self, shape: torch.Size, hidden: int):
        super().__init__()
        self.shape = tuple(shape)
        self.fc1, self.fc2 = nn.Linear(2, hidden), nn.Linear(hidden, math.prod(shape))
        fan_in = math.prod(shape[1:])  # He-like scale for the generated weights at the start
        nn.init.normal_(self.fc2.weight, std=math.sqrt(2 / fan_in) / math.sqrt(hidden))
        nn.init.zeros_(self.fc2.bias)

    def forward(self, code: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(code))).view(self.shape)


class PruningNet(nn.Module):
    def __init__(self, layers: dict[str, nn.Module], hidden: int):
        super().__init__()
        self.blocks = nn.ModuleDict({key(n): MetaBlock(m.weight_orig.shape, hidden) for n, m in layers.items()})


def key(name: str) -> str:
    return name.replace(".", "__")


@COMPRESSORS.register("metapruning", MetaPruningConfig)
class MetaPruning(Compressor):
    """MetaPruning (Liu et al., ICCV 2019): PruningNet, evolutionary search under FLOPs, retrain."""

    smoke = Smoke(("resnet",), ("pruningnet_epochs=1", "retrain_epochs=4", "flops_target=0.7", "population=6", "parents=2",
                                "mutations=2", "crossovers=2", "iterations=2", "recalibration_batches=1",
                                "chance_margin=-1"))
    owns = frozenset({"structure", "masks", "modules"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        if report["constraint"] == "latency":
            measured = report["latency"]["found_fraction_at_search"]
            if not measured <= report["latency_target"] + 1e-9:
                return f"structure over the latency budget: {measured} > {report['latency_target']}"
        elif not report["flops_fraction"] <= report["flops_target"] + 1e-9:
            return f"structure over the FLOPs budget: {report['flops_fraction']} > {report['flops_target']}"
        return None if report["channels_after_rounding"] < 1 else "no channel removed"

    def __init__(self, cfg: MetaPruningConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}  # every conv and linear layer (masked, generated)
        self.masked: dict[str, nn.Module] = {}  # name → module of every masked parameter's owner
        self.plan: cs.ChannelPlan | None = None
        self.inputs: dict[str, Tensor] = {}
        self.datamodule = None
        self.run_dir = None
        self.seed = 0
        self.layer_flops: dict[str, float] = {}
        self.choices: dict[str, list[int]] = {}  # group → its width choices
        self.generating = False  # the PruningNet makes the weights (pruningnet stage, search)
        self.generated: dict[str, Tensor] = {}
        self.codes: dict[str, Tensor] = {}
        self.found: dict[str, int] | None = None
        self.search_log: dict[str, Any] = {}
        self.widths: dict[str, dict[str, int]] = {}
        self.hooks = []
        self.device = torch.device("cpu")  # constraint=latency: where candidates are timed (the run's)
        self.multiple = 1  # the hardware's channel multiple: candidates are timed as they would deploy
        self.skeleton: nn.Module | None = None  # the dense model without PruningNet or masks, for timing
        self.latency_inputs: dict[str, Tensor] = {}
        self.latencies: dict[tuple, dict[str, float]] = {}  # structure → its measured latency
        self.latency_file = None  # the search's latency cache, appended as it measures

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        retrain = Stage("retrain", self.cfg.retrain_epochs, self.name)
        if self.cfg.search == "uniform":
            return [retrain]
        return [Stage("pruningnet", self.cfg.pruningnet_epochs, self.name), retrain]

    def attach(self, model: nn.Module) -> nn.Module:
        self.model = model
        self.init_weights = fresh_init(model, int(torch.randint(2**31 - 1, ())))  # "from scratch": a new draw
        for name, module in model.named_modules():
            params = ("weight", "bias") if isinstance(module, LAYERS + NORMS) else ()
            for param in params:
                if getattr(module, param, None) is not None:
                    prune.identity(module, param)
                    self.masked[name] = module
            if isinstance(module, LAYERS):
                self.layers[name] = module
        if not self.layers:
            raise EffmlError(f"compressor metapruning found no conv or linear layer in {type(model).__name__}")
        if self.cfg.search == "evolutionary":
            model.add_module("pruningnet", PruningNet(self.layers, self.cfg.hidden))
            for name, module in self.layers.items():  # after prune's own hook: replaces its product
                self.hooks.append(module.register_forward_pre_hook(self._generated_weight(name)))
            self.hooks.append(model.register_forward_pre_hook(self._generate, with_kwargs=True))
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.datamodule, self.run_dir, self.seed = datamodule, ctx.run_dir, ctx.seed
        self.inputs = datamodule.example_inputs(2)
        self.plan = cs.channel_plan(self.model, self.inputs, self.cfg.output_layer)
        ratios = self.cfg.ratios()
        self.choices = {g.name: sorted({max(1, round(g.size * r)) for r in ratios}) for g in self.plan.groups}
        self.layer_flops = measured_layer_flops(self.model, self.inputs, self.layers)
        smallest = {g: c[0] for g, c in self.choices.items()}
        if self.cfg.constraint == "flops" and self.flops_fraction(smallest) > self.cfg.flops_target:
            raise EffmlError(f"compressor.flops_target={self.cfg.flops_target} cannot be met: the smallest "
                             f"structure (min_ratio={self.cfg.min_ratio}) keeps "
                             f"{self.flops_fraction(smallest):.3f} of the FLOPs")
        if self.cfg.constraint == "latency":
            self.device, self.multiple = ctx.device, ctx.hardware.channel_multiple
            self.latency_inputs = datamodule.example_inputs(self.latency_batch(ctx))
            self.skeleton = self._skeleton()
            reachable = self.latency_fraction(smallest)
            self.latencies = {}  # the search measures afresh (and caches to its file): a resume re-reads those
            if reachable > self.cfg.latency_target:
                raise EffmlError(f"compressor.latency_target={self.cfg.latency_target} cannot be met: the smallest "
                                 f"structure (min_ratio={self.cfg.min_ratio}) measures {reachable:.3f} of the "
                                 f"dense latency on {self.device.type}")

    def begin_stage(self, stage: Stage, task) -> None:
        if stage.of(self.name, "pruningnet"):
            self.generating = True
        elif stage.of(self.name, "retrain"):
            self.generating = False
            self.found = self._load_or_search(task)
            restore(task.model, self.init_weights, {})  # from scratch: a fresh draw of every weight
            self._set_masks(self.found)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.generating:  # a random structure per batch, drawn from (seed, step): the same on resume
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
            self._set_masks({g: c[int(torch.randint(len(c), (), generator=generator))] for g, c in self.choices.items()})

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.generating:  # validated at full width
            self._set_masks({g: c[-1] for g, c in self.choices.items()})

    def state_dict(self) -> dict:
        return {"found": self.found, "search": self.search_log}

    def load_state_dict(self, state_dict: dict) -> None:
        self.found, self.search_log = state_dict["found"], state_dict["search"]

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        for hook in self.hooks:
            hook.remove()
        self.generating = False
        keep = self._keep(self.found)
        for module in self.masked.values():
            for param in ("weight", "bias"):
                if hasattr(module, f"{param}_mask"):
                    prune.remove(module, param)
        if hasattr(model, "pruningnet"):
            del model.pruningnet
        shrunk, self.widths = cs.remove_channels(model, self.inputs, keep, hardware.channel_multiple,
                                                 output_layer=self.cfg.output_layer, plan=self.plan)
        return shrunk

    def report(self) -> dict[str, Any]:
        before = sum(w["before"] for w in self.widths.values()) or None
        return {
            "search": self.cfg.search,
            "constraint": self.cfg.constraint,  # the budget that ruled the search
            "latency_target": self.cfg.latency_target if self.cfg.constraint == "latency" else None,
            "flops_target": self.cfg.flops_target if self.cfg.constraint == "flops" else None,
            "flops_fraction": round(self.flops_fraction(self.found), 6) if self.found else None,
            "structure": self.found,
            "channels_kept": round(sum(w["kept"] for w in self.widths.values()) / before, 6) if before else None,
            "channels_after_rounding": round(sum(w["after"] for w in self.widths.values()) / before, 6) if before else None,
            **self.search_log,
        }

    # -- structures --------------------------------------------------------------------------
    def _keep(self, widths: dict[str, int]) -> dict[str, Tensor]:
        keep = {}
        for group in self.plan.groups:
            kept = torch.zeros(group.size, dtype=torch.bool)
            kept[: widths[group.name]] = True
            keep[group.name] = kept
        return keep

    def _slices(self, widths: dict[str, int]) -> dict[tuple[str, str], Tensor]:
        return cs.slice_masks(self.plan, self._keep(widths), self.model)

    def latency_batch(self, ctx: RunContext) -> int:
        return self.cfg.latency_batch or getattr(ctx.measure, "batch_size", 64)

    def fits(self, widths: dict[str, int]) -> bool:
        """Within the budget of the constraint that rules: counted FLOPs or measured latency."""
        if self.cfg.constraint == "latency":
            return self.latency_fraction(widths) <= self.cfg.latency_target
        return self.flops_fraction(widths) <= self.cfg.flops_target

    def flops_fraction(self, widths: dict[str, int]) -> float:
        masks = self._slices(widths)
        kept = sum(f * float(masks[(n, "weight")].mean()) if (n, "weight") in masks else f
                   for n, f in self.layer_flops.items())
        return kept / sum(self.layer_flops.values())

    @torch.no_grad()
    def _set_masks(self, widths: dict[str, int]) -> None:
        masks = self._slices(widths)
        cs.load_masks(self.masked, masks)
        self.codes = {n: self._code(n, masks) for n in self.layers}

    def _code(self, name: str, masks: dict) -> Tensor:
        """(input width, output width) as fractions: the layer's encoding (the paper's network vector)."""
        mask = masks.get((name, "weight"))
        if mask is None:
            return torch.ones(2)
        rows = mask.flatten(1).amax(1)
        cols = mask.transpose(0, 1).flatten(1).amax(1)
        return torch.stack([cols.mean(), rows.mean()]).float()

    # -- the PruningNet's forward ------------------------------------------------------------
    def _generate(self, model, args, kwargs) -> None:
        if self.generating:
            blocks = model.pruningnet.blocks
            self.generated = {n: blocks[key(n)](self.codes[n]) for n in self.layers}

    def _generated_weight(self, name: str):
        def hook(module, args):
            if self.generating:
                module.weight = self.generated[name] * module.weight_mask
        return hook

    # -- search ------------------------------------------------------------------------------
    def _load_or_search(self, task) -> dict[str, int]:
        """Rank 0 searches (or reads its earlier search) and writes search.json; every other rank of a
        multi-process run takes rank 0's structure (its fitness came from its own batches)."""
        found = self._search_on_rank0(task) if distributed.is_main() else None
        found, self.search_log = distributed.broadcast_from_rank0((found, self.search_log))
        return found

    def _search_on_rank0(self, task) -> dict[str, int]:
        path = self.run_dir.artifact("search.json")
        if path.exists():
            saved = json.loads(path.read_text())
            self.search_log = saved["log"]
            return saved["structure"]
        if self.cfg.constraint == "latency":
            self._open_latency_cache()
        if self.cfg.search == "uniform":
            found = self._uniform()
        else:
            found = self._evolve(task.model)
        if self.cfg.constraint == "latency":
            self.search_log["latency"] = self._latency_report(found)
        with atomic_file(path) as f:
            f.write(json.dumps({"structure": found, "log": self.search_log}, indent=1).encode())
        return found

    def _uniform(self) -> dict[str, int]:
        found, ratio = self._uniform_structure()
        self.search_log = {"uniform_ratio": ratio}
        return found

    def _uniform_structure(self) -> tuple[dict[str, int], float]:
        """The largest single ratio (to 1/1000) whose structure fits the budget: the paper's baseline."""
        if self.fits(self._scaled(1.0)):
            return self._scaled(1.0), 1.0
        low, high = 0.0, 1.0
        for _ in range(10):
            mid = (low + high) / 2
            if self.fits(self._scaled(mid)):
                low = mid
            else:
                high = mid
        return self._scaled(low), round(low, 4)

    def _scaled(self, ratio: float) -> dict[str, int]:
        return {g.name: max(1, math.floor(g.size * ratio)) for g in self.plan.groups}

    def _evolve(self, model: nn.Module) -> dict[str, int]:
        """The official search.py's loop: keep the top ``parents``, add mutations and crossovers."""
        cfg, generator = self.cfg, torch.Generator().manual_seed(self.seed)
        batches = self._recalibration_batches()
        scores: dict[tuple, float] = {}
        groups = list(self.choices)

        def score(genes: tuple) -> float:
            if genes not in scores:
                scores[genes] = self._accuracy(model, dict(zip(groups, genes, strict=True)), batches)
            return scores[genes]

        def valid(genes: tuple) -> bool:
            return self.fits(dict(zip(groups, genes, strict=True)))

        def draw(make, count: int, taken: set) -> list[tuple]:
            out = []
            for _ in range(count * 20):  # the official code tries 10x; budgets here are tighter
                if len(out) == count:
                    break
                genes = make()
                if genes not in taken and valid(genes):
                    taken.add(genes)
                    out.append(genes)
            return out

        def pick(choices: list[int]) -> int:
            return choices[int(torch.randint(len(choices), (), generator=generator))]

        population = draw(lambda: tuple(pick(self.choices[g]) for g in groups), cfg.population, set())
        if not population:
            target = f"latency_target={cfg.latency_target}" if cfg.constraint == "latency" else f"flops_target={cfg.flops_target}"
            raise EffmlError(f"compressor.{target}: no random structure met it in "
                             f"{cfg.population * 20} draws; raise min_ratio's floor or the target")
        initial = [score(p) for p in population]
        chance = 1 / self.datamodule.info.num_classes
        mean = sum(initial) / len(initial)
        self.search_log = {"pruningnet_mean_acc": round(mean, 6), "chance": round(chance, 6), "best_per_iteration": []}
        if mean < chance + cfg.chance_margin:
            raise EffmlError(f"the PruningNet's generated weights do not beat chance on the held-out split "
                             f"(mean accuracy {mean:.3f} of {len(initial)} structures, chance {chance:.3f} + "
                             f"margin {cfg.chance_margin}); train it longer (compressor.pruningnet_epochs)")
        for _ in range(cfg.iterations):
            top = sorted(population, key=lambda p: -score(p))[: cfg.parents]
            self.search_log["best_per_iteration"].append(round(score(top[0]), 6))
            taken = set(top) | set(scores)

            def mutate(top=top):
                parent = top[int(torch.randint(len(top), (), generator=generator))]
                flips = torch.rand(len(groups), generator=generator) < cfg.mutation_prob
                return tuple(pick(self.choices[g]) if f else v for g, v, f in zip(groups, parent, flips, strict=True))

            def cross(top=top):
                a, b = (top[int(i)] for i in torch.randint(len(top), (2,), generator=generator))
                sides = torch.rand(len(groups), generator=generator) < 0.5
                return tuple(x if s else y for x, y, s in zip(a, b, sides, strict=True))

            population = top + draw(mutate, cfg.mutations, taken) + draw(cross, cfg.crossovers, taken)
        best = max(population, key=score)
        self.search_log.update(best_val_acc=round(score(best), 6), evaluated=len(scores))
        return dict(zip(groups, best, strict=True))

    # -- measured latency (constraint=latency) ------------------------------------------------
    def _skeleton(self) -> nn.Module:
        """The dense model as a plain copy: no pruning reparametrization, PruningNet or hooks of ours."""
        keep = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.plan.groups}
        skeleton, _ = cs.remove_channels(self.model, self.inputs, keep, 1, output_layer=self.cfg.output_layer,
                                         plan=self.plan)
        if hasattr(skeleton, "pruningnet"):
            del skeleton.pruningnet
        for module in skeleton.modules():
            for hook in self.hooks:
                module._forward_pre_hooks.pop(hook.id, None)
                module._forward_pre_hooks_with_kwargs.pop(hook.id, None)
        return skeleton

    def latency_fraction(self, widths: dict[str, int]) -> float:
        """The structure's measured latency over the dense model's, cut out physically and timed
        interleaved with the dense model on the run's device; measured once per structure."""
        structure = tuple(widths[g.name] for g in self.plan.groups)
        if structure not in self.latencies:
            shrunk, _ = cs.remove_channels(self.skeleton, self.inputs, self._keep(widths), self.multiple,
                                           output_layer=self.cfg.output_layer, plan=self.plan)
            timed = compare_models({"dense": self.skeleton, "structure": shrunk}, self.latency_inputs, self.device,
                                   warmup=2, iters=self.cfg.latency_iters, min_time_s=0.0)
            # the fastest round: the one least disturbed by other load on a shared machine
            dense, ms = timed["dense"]["latency_min_ms"], timed["structure"]["latency_min_ms"]
            self.latencies[structure] = {"fraction": ms / dense, "ms": ms, "dense_ms": dense}
            if self.latency_file is not None:
                self.latency_file.write(json.dumps({"structure": structure, **self.latencies[structure]}) + "\n")
                self.latency_file.flush()
        return self.latencies[structure]["fraction"]

    def _open_latency_cache(self) -> None:
        """Measurements of an earlier, killed search of this run: the same seed re-draws the same
        candidates and, reading these, makes the same decisions."""
        path = self.run_dir.artifact("latency_cache.jsonl")
        self.latencies = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    break
                self.latencies[tuple(entry.pop("structure"))] = entry
        self.latency_file = path.open("a")

    def _latency_report(self, found: dict[str, int]) -> dict[str, Any]:
        """The found structure, the uniform baseline under the same latency budget and the dense model,
        timed together (the found structure's search-time ratio is what the budget was checked on)."""
        uniform, ratio = self._uniform_structure()
        at_search = self.latency_fraction(found)
        self.latency_file.close()
        self.latency_file = None
        models = {"dense": self.skeleton}
        for name, widths in (("found", found), ("uniform", uniform)):
            models[name], _ = cs.remove_channels(self.skeleton, self.inputs, self._keep(widths), self.multiple,
                                                 output_layer=self.cfg.output_layer, plan=self.plan)
        timed = compare_models(models, self.latency_inputs, self.device, warmup=3, iters=3 * self.cfg.latency_iters,
                               min_time_s=0.0)
        ms = {name: timed[name]["latency_min_ms"] for name in models}
        median = {name: timed[name]["latency_ms"] for name in models}
        return {
            "device": timed["dense"]["device_name"],
            "batch_size": timed["dense"]["batch_size"],
            "dense_ms": round(ms["dense"], 4),  # fastest round, as the search's measurements
            "found_ms": round(ms["found"], 4),
            "uniform_ms": round(ms["uniform"], 4),
            "found_fraction": round(ms["found"] / ms["dense"], 4),
            "uniform_fraction": round(ms["uniform"] / ms["dense"], 4),
            "median_ms": {name: round(v, 4) for name, v in median.items()},
            "found_fraction_at_search": round(at_search, 4),
            "uniform_ratio": ratio,
            "uniform_structure": uniform,
            "found_flops_fraction": round(self.flops_fraction(found), 4),
            "uniform_flops_fraction": round(self.flops_fraction(uniform), 4),
            "measured_structures": len(self.latencies),
        }

    def _recalibration_batches(self) -> list[dict]:
        loader = iter(self.datamodule.train_dataloader())
        batches = []
        for _ in range(self.cfg.recalibration_batches):
            batch = next(loader, None)
            if batch is None:
                break
            batches.append({k: v for k, v in batch.items() if k != "labels"})
        return batches

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, widths: dict[str, int], batches: list[dict]) -> float:
        """Held-out accuracy of the structure with generated weights, BN statistics re-estimated first.
        The model's train/eval mode is put back after: Lightning's fit does not reset it, and a model
        left in eval mode would retrain with frozen BN statistics."""
        was_training = model.training
        self.generating = True
        self._set_masks(widths)
        recalibrate(model, batches)  # a cumulative average over the batches, then eval mode
        correct = total = 0
        for batch in self.datamodule.val_dataloader():
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"})
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        self.generating = False
        model.train(was_training)
        return correct / total


def measured_layer_flops(model: nn.Module, inputs: dict[str, Tensor], layers: dict[str, nn.Module]) -> dict[str, float]:
    """Each conv and linear layer's multiply-adds ×2 in one forward of ``inputs``, per example."""
    flops: dict[str, float] = {}
    batch = next(iter(inputs.values())).shape[0]

    def hook(name):
        def record(module, args, output):
            if isinstance(module, nn.Conv2d):
                k = math.prod(module.kernel_size) * module.in_channels // module.groups
                flops[name] = 2.0 * output.numel() / batch * k
            else:
                flops[name] = 2.0 * output.numel() / batch * module.in_features
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(**inputs)
    model.train(was_training)
    for h in handles:
        h.remove()
    return flops
