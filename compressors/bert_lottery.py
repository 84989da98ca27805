"""BERT lottery tickets by structured and magnitude pruning: good, random and bad subnetworks.

Prasanna, Rogers, Rumshisky, "When BERT Plays the Lottery, All Tickets Are Winning", EMNLP 2020
(arXiv 2005.00561); the official code is github.com/sai-prasanna/bert-experiments
(``find_head_mlp_masks.py``, ``find_global_weight_mask.py``, ``run_glue.py``). Two stages:

1. ``finetune``: the pre-trained model is fine-tuned in full. After it (in ``end_stage``, so the
   result is saved with the stage) the *search* finds the "good" subnetwork on the fine-tuned model,
   without any training in between:

   - ``mode=s`` (S-pruning): the importance of every attention head h and every whole MLP (the FFN
     block of a layer) is Michel, Levy, Neubig, "Are Sixteen Heads Really Better than One?"
     (NeurIPS 2019), Eq. 2: I_h = E_x |∂L(x)/∂ξ_h|, ξ_h a gate on the element fixed at 1
     (``bert_surgery.Gates``; pruned elements have ξ = 0, gates never train). The gradient is taken
     per example (one backward pass per batch through per-example probes on the gates' outputs),
     as the official code does with its batch size of 1. Head importance is divided by its L2 norm
     within each layer (Michel §4.2, after Molchanov et al. 2017). Every step removes the
     ``head_fraction`` (10%) of *all* heads with the lowest importance and the ``mlps_per_step``
     (one) least important MLP, then recomputes importance and the accuracy on the search data.
     The search stops as soon as that accuracy falls below ``threshold`` (90%) of the full
     fine-tuned model's on the same data; the last subnetwork at or above it is the good one. With
     ``refine`` (the official code) it then goes on from there removing heads only (half as many per
     step), then MLPs only, under the same rule.
   - ``mode=m`` (M-pruning): iterative global magnitude pruning of the encoder's weights (Q, K, V,
     attention output, both FFN matrices of every layer), ``weight_fraction`` (10%) of the
     survivors per step, same stopping rule. Without training between steps the ranking is by the
     fine-tuned |w| throughout.

   The search data are the ``val`` split, the paper's dev set (the official code's default), or
   (``search_data=train``) as many training examples as the val split has (its
   ``--use_train_data``); the reported test accuracy comes from the separate test split either way.

2. ``retrain``: a subnetwork of the good one's size is re-fine-tuned from the *pre-trained*
   weights (snapshot at attach; the classifier from its seeded initialization, as in ``finetune``):

   - ``good``: the search's survivors;
   - ``random``: as many heads and MLPs drawn uniformly at random (``random_scope=global``, as the
     paper; ``layerwise`` keeps the good subnetwork's heads per layer, the stricter control); M: as
     many encoder weights at random positions over all layers;
   - ``bad``: the elements pruned *first*, i.e. the lowest-importance ones: elements in the order
     the search removed them (within a step, by the importance that ranked them), then the survivors
     by their last importance; the first as many as the good subnetwork keeps. (The official code
     takes all pruned elements plus random survivors, or a random sample of the pruned ones.) M: the
     smallest fine-tuned |w| (the official code ranks the pre-trained weights instead).

   S subnetworks are made physically smaller: pruned heads lose their Q/K/V rows and output
   columns (``bert_surgery.prune_heads``); a pruned MLP loses all its neurons (width 0) and its
   output bias is set to zero and frozen, so the block adds exactly nothing. Every layer keeps at
   least one head (the search never removes a layer's last head; random and bad subnetworks swap one
   in where a layer would be left without, keeping the total): a layer without heads cannot be
   expressed by transformers' attention. ``finalize`` exports the subnetwork to ``<run>/model``
   (``bert_surgery.load_pruned`` or ``model.pretrained=<dir>`` reload it). M subnetworks are masks
   (``torch.nn.utils.prune``), made permanent by ``finalize``.

Resuming: the search's result (trajectory, good and chosen subnetwork) is state of the compressor,
saved with the finetune stage; a kill during the search redoes it (deterministic: eval mode, fixed
data). After the retrain stage finished, ``load_state_dict`` rebuilds the smaller shape before the
runner loads its weights. Every run fine-tunes its own full model, so the good, random and bad runs
of one seed search on identical models and agree on the good subnetwork.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

from effml import distributed
from effml.choice import check_choices, choice
from effml.compressors._masks import make_permanent, set_mask
from effml.compressors.base import (
    CompressorConfig,
    RunContext,
    Smoke,
    Stage,
    StructuredCompressor,
)
from effml.compressors.imp import keep_largest, restore, snapshot
from effml.errors import EffmlError
from effml.models import bert_surgery as surgery
from effml.registry import COMPRESSORS

log = logging.getLogger("effml")
Mode = choice("Mode", "s m")  # s: heads + whole MLPs by Michel importance; m: global magnitude of encoder weights
Subnetwork = choice("Subnetwork", "good random bad")  # what retrain fine-tunes (random and bad: good's size)
SearchData = choice("SearchData", "val train")  # val: the paper's dev set; train: as many training examples
RandomScope = choice("RandomScope", "global layerwise")  # random subnetwork: global (paper) or good's heads per layer
ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense", "intermediate.dense", "output.dense")


@dataclass
class BertLotteryConfig(CompressorConfig):
    """BERT lottery (Prasanna et al., EMNLP 2020): good/random/bad subnetworks by S- (heads + MLPs) or
    M-pruning."""

    name: str = "bert_lottery"
    mode: Mode = Mode.s
    subnetwork: Subnetwork = Subnetwork.good
    threshold: float = 0.9  # stop once accuracy < threshold × the full fine-tuned model's (paper: 90%)
    head_fraction: float = 0.1  # S: heads removed per step, a fraction of all heads (paper: 10%)
    mlps_per_step: int = 1  # S: whole MLPs removed per step (paper: one)
    refine: bool = True  # S: then heads only (half steps), then MLPs only, as the official code
    weight_fraction: float = 0.1  # M: of the surviving encoder weights per step (paper: 10%)
    max_steps: int | None = None  # pruning steps at most (None: until the threshold; official M code: 10)
    normalize_heads: bool = True  # head importance / its L2 norm within the layer (Michel §4.2)
    search_data: SearchData = SearchData.val
    search_batches: int | None = None  # batches of search data per step (None: all)
    random_scope: RandomScope = RandomScope["global"]
    finetune_epochs: int | None = None  # None: trainer.max_epochs
    retrain_epochs: int | None = None  # None: trainer.max_epochs

    def __post_init__(self):
        check_choices(self, "compressor")
        for name in ("threshold", "head_fraction", "weight_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise EffmlError(f"compressor.{name} must be in (0, 1); got {getattr(self, name)}")
        if self.mlps_per_step < 0:
            raise EffmlError(f"compressor.mlps_per_step must be >= 0; got {self.mlps_per_step}")
        for name in ("max_steps", "search_batches", "finetune_epochs", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EffmlError(f"compressor.{name} must be >= 1; got {value}")


# -- Michel et al.'s importance ------------------------------------------------------------------
@dataclass
class Pass:
    """One pass over the search data: accuracy and (S) the importance of every head and MLP."""

    acc: float
    heads: Tensor | None = None  # (layers, heads): mean |∂L(x)/∂ξ| over the examples
    mlps: Tensor | None = None  # (layers,)


class Probes:
    """Per-example multiplicative probes (value 1) on each head's context and each MLP's output.

    They sit after the gates, so ∂L(x)/∂probe = ∂L(x)/∂ξ wherever ξ = 1; with the summed loss of a
    batch, the probe of example b gets example b's gradient alone: Michel's E_x|∂L(x)/∂ξ| needs the
    absolute value per example, which the gradient of the gates themselves (a sum over the batch)
    cannot give. ``made`` holds the probes of the last forward pass: per layer, heads then MLP."""

    def __init__(self, layers: list[nn.Module]):
        self.made: list[Tensor] = []
        self.handles = []
        for layer in layers:
            self.handles.append(layer.attention.output.dense.register_forward_pre_hook(
                self._heads_hook(surgery.head_size(layer))))
            self.handles.append(layer.output.dense.register_forward_hook(self._mlp))

    def _probe(self, *shape: int, like: Tensor) -> Tensor:
        probe = torch.ones(*shape, device=like.device, requires_grad=True)
        self.made.append(probe)
        return probe

    def _heads_hook(self, size: int):
        def hook(module, args):  # context: (batch, tokens, heads * head_size)
            (context,) = args
            per_head = context.unflatten(-1, (-1, size))
            probe = self._probe(context.shape[0], per_head.shape[-2], like=context)
            return ((per_head * probe.to(context.dtype)[:, None, :, None]).flatten(-2),)

        return hook

    def _mlp(self, module, args, output):
        return output * self._probe(output.shape[0], like=output).to(output.dtype)[:, None, None]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.enable_grad()
def importance(model: nn.Module, layers: list[nn.Module], batches: list[dict], device: torch.device,
               with_importance: bool = True, autocast: torch.dtype | None = None) -> Pass:
    """Accuracy over ``batches`` and, with ``with_importance``, Michel et al.'s head and MLP
    importance (unnormalized). The model is used as it is (eval mode is the caller's business)."""
    probes = Probes(layers) if with_importance else None
    n_heads = max(surgery.num_heads(layer) for layer in layers)
    heads = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    mlps = torch.zeros(len(layers), dtype=torch.float64)
    correct = total = 0
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            labels = batch["labels"].to(device)
            if probes:
                probes.made = []
            context = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            with context, torch.set_grad_enabled(with_importance):
                logits = model(**inputs)
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
            if probes:
                loss = F.cross_entropy(logits.float(), labels, reduction="sum")
                grads = torch.autograd.grad(loss, probes.made)
                for i, (g_heads, g_mlp) in enumerate(zip(grads[0::2], grads[1::2], strict=True)):
                    heads[i, : g_heads.shape[1]] += g_heads.abs().sum(0).double().cpu()
                    mlps[i] += g_mlp.abs().sum().double().cpu()
    finally:
        if probes:
            probes.remove()
    acc = correct / max(total, 1)
    if not with_importance:
        return Pass(acc)
    return Pass(acc, (heads / max(total, 1)).float(), (mlps / max(total, 1)).float())


def normalize_by_layer(heads: Tensor) -> Tensor:
    """Each layer's head importance divided by its L2 norm (Michel §4.2): every row has norm 1."""
    return heads / (heads.norm(dim=-1, keepdim=True) + 1e-20)


# -- choosing elements ---------------------------------------------------------------------------
def lowest_heads(scores: Tensor, keep: Tensor, count: int) -> list[tuple[int, int]]:
    """The ``count`` kept heads with the lowest scores, never a layer's last head; lowest first."""
    left = keep.sum(1).tolist()
    chosen = []
    for index in torch.argsort(scores.flatten(), stable=True).tolist():
        layer, head = divmod(index, scores.shape[1])
        if len(chosen) == count:
            break
        if keep[layer, head] and left[layer] > 1:
            chosen.append((layer, head))
            left[layer] -= 1
    return chosen


def lowest_mlps(scores: Tensor, keep: Tensor, count: int) -> list[int]:
    return [i for i in torch.argsort(scores, stable=True).tolist() if keep[i]][:count]


def first_heads(ranking: list[tuple[int, int]], count: int, n_layers: int) -> list[tuple[int, int]]:
    """The first ``count`` heads of ``ranking``, then, for every layer left without a head, its first
    head in ``ranking`` swapped in for the last chosen head of a layer that has more than one."""
    chosen = list(ranking[:count])
    for layer in range(n_layers):
        if any(c[0] == layer for c in chosen):
            continue
        per_layer = [sum(1 for c in chosen if c[0] == i) for i in range(n_layers)]
        drop = next(i for i in range(len(chosen) - 1, -1, -1) if per_layer[chosen[i][0]] > 1)
        chosen.pop(drop)
        chosen.append(next(c for c in ranking if c[0] == layer))
    return chosen


def heads_mask(heads: list[tuple[int, int]], shape: tuple[int, int]) -> Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


@COMPRESSORS.register("bert_lottery", BertLotteryConfig)
class BertLottery(StructuredCompressor):
    """Good, random and bad BERT subnetworks by S- or M-pruning, re-fine-tuned (Prasanna et al. 2020)."""

    smoke = Smoke(("bert",), ("search_batches=1", "max_steps=2"))

    def __init__(self, cfg: BertLotteryConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.layers: list[nn.Module] = []
        self.gates: surgery.Gates | None = None  # S
        self.linears: dict[str, nn.Module] = {}  # M: masked encoder weights
        self.initial_weights: dict[str, Tensor] = {}  # θ0: pre-trained encoder, seeded classifier
        self.random_seed = 0
        self.datamodule = None
        self.hardware = None
        self.export_dir: Path | None = None
        # the state (state_dict)
        self.full: dict[str, float] = {}  # the fine-tuned full model's val/test accuracy (finetune record)
        self.search: dict[str, Any] | None = None  # trajectory, full accuracy on the search data, good size
        self.chosen: dict[str, Any] | None = None  # the subnetwork retrain fine-tunes
        self.applied = False  # is the model cut down to ``chosen``?

    # -- contract ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("finetune", self.cfg.finetune_epochs, self.name),
                Stage("retrain", self.cfg.retrain_epochs, self.name)]

    def attach(self, model: nn.Module) -> nn.Module:
        self.layers = surgery.encoder_layers(model, self.name)  # one clear line for a non-BERT model
        self.random_seed = int(torch.randint(2**31 - 1, ()))  # from the run's seeded RNG
        if self.cfg.mode == "s":
            self.initial_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.gates = surgery.Gates(model, self.name, heads=True, mlp=True)
            for gate in self.gates.parameters():
                gate.requires_grad_(False)  # fixed at 1 (0 once pruned): gates never train
        else:
            for i, layer in enumerate(self.layers):
                for name in ENCODER_LINEARS:
                    module = layer.get_submodule(name)
                    prune.identity(module, "weight")
                    self.linears[f"layer.{i}.{name}"] = module
            self.initial_weights = snapshot(model)
        self.model = model
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.datamodule, self.hardware = datamodule, ctx.hardware
        self.export_dir = ctx.run_dir.export
        if getattr(datamodule.info, "modality", None) != "text":
            raise EffmlError(f"compressor {self.name} needs text data (e.g. data=rotten_tomatoes)")

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        if stage.owner != self.name:
            return None
        if stage.key == "finetune":
            self.full = {"val_acc": record["val_acc"], "test_acc": record["test_acc"]}
            if self.search is None:
                self.run_search()
            return {"search_steps": len(self.search["trajectory"]) - 1, "search_time_s": self.search.get("time_s"),
                    **self._sizes(self.search["good"])}
        return {"subnetwork": self.cfg.subnetwork, **self._sizes(self.chosen)}

    def begin_stage(self, stage: Stage, task) -> None:
        if stage.of(self.name, "retrain") and not self.applied:
            self._apply(task.model)

    def state_dict(self) -> dict:
        return {"full": self.full, "search": self.search, "chosen": self.chosen, "applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        self.full, self.search, self.chosen = state["full"], state["search"], state["chosen"]
        if state["applied"] and not self.applied:
            self._apply(self.model)  # after retrain finished: its smaller shape, before its weights load

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        if self.cfg.mode == "m":
            make_permanent(self.linears)
        elif self.applied and self.export_dir is not None:
            surgery.save_pruned(model, self.export_dir)
        return model

    def report(self) -> dict:
        search = self.search or {}
        out = {
            "mode": self.cfg.mode,
            "subnetwork": self.cfg.subnetwork,
            "full_val_acc": self.full.get("val_acc"),
            "full_test_acc": self.full.get("test_acc"),
            "threshold": self.cfg.threshold,
            "search_data": self.cfg.search_data,
            "search_full_acc": search.get("full_acc"),
            "search_threshold_acc": search.get("threshold_acc"),
            "search_time_s": search.get("time_s"),
            "trajectory": search.get("trajectory", []),
            "good": self._sizes(search["good"]) if search else None,
            **(self._sizes(self.chosen) if self.chosen else {}),
        }
        if self.cfg.mode == "s":
            if search:
                out["good"]["kept_heads"] = search["good"]["heads"]
            out["full_importance"] = search.get("full_importance")
            out["kept_heads"] = self.chosen["heads"] if self.chosen else None
            out["export"] = str(self.export_dir) if self.export_dir and self.export_dir.exists() else None
        return out

    # -- the search -------------------------------------------------------------------------
    def _device(self) -> tuple[torch.device, torch.dtype | None]:
        gpu = self.hardware is not None and self.hardware.accelerator == "gpu"
        precision = getattr(self.hardware, "precision", "32-true")
        dtype = torch.bfloat16 if gpu and precision.startswith("bf16") else None
        return torch.device("cuda" if gpu else "cpu"), dtype

    def search_batches(self) -> list[dict]:
        dm = self.datamodule
        if self.cfg.search_data == "val":
            loader = dm.val_dataloader()
        else:
            train = dm.splits["train"]
            subset = torch.utils.data.Subset(train, range(min(len(train), len(dm.splits["val"]))))
            loader = torch.utils.data.DataLoader(subset, batch_size=dm.cfg.eval_batch_size, collate_fn=dm.collate)
        return list(itertools.islice(loader, self.cfg.search_batches))

    def run_search(self, batches: list[dict] | None = None) -> None:
        """Find the good subnetwork on the model as it is now, then draw the chosen one."""
        from effml.kernels import hardware as hw

        batches = self.search_batches() if batches is None else batches
        model, (device, dtype) = self.model, self._device()
        training, started = model.training, time.perf_counter()
        model.to(device).eval()
        try:
            with hw.kernel_context(self.hardware) if self.hardware is not None else contextlib.nullcontext():
                if self.cfg.mode == "s":
                    self._search_s(lambda need: importance(model, self.layers, batches, device, need, dtype))
                else:
                    self._search_m(lambda: importance(model, self.layers, batches, device, False, dtype).acc)
        finally:
            model.to("cpu").train(training)
        if self.search is not None:
            self.search["time_s"] = round(time.perf_counter() - started, 3)
        # rank 0's search and draw on every rank (its timing, at least, is its own)
        self.search, self.chosen = distributed.broadcast_from_rank0((self.search, self.chosen))

    def _search_s(self, evaluate) -> None:
        n_layers, n_heads = len(self.layers), surgery.num_heads(self.layers[0])
        keep_heads = torch.ones(n_layers, n_heads, dtype=torch.bool)
        keep_mlps = torch.ones(n_layers, dtype=torch.bool)
        self._set_gates(keep_heads, keep_mlps)
        first = evaluate(True)
        threshold = self.cfg.threshold * first.acc
        trajectory = [self._point(0, "full", keep_heads, keep_mlps, first.acc, True)]
        head_order: list[tuple[int, int]] = []  # the order the search removed them in
        mlp_order: list[int] = []
        current = first
        per_step = max(1, int(n_layers * n_heads * self.cfg.head_fraction))  # of all heads (official)
        phases = [("heads+mlps", per_step, self.cfg.mlps_per_step)]
        if self.cfg.refine:
            phases += [("heads", per_step // 2, 0), ("mlps", 0, self.cfg.mlps_per_step)]
        step = 0
        for phase, n_h, n_m in phases:
            if n_h == 0 and n_m == 0:
                continue
            while self.cfg.max_steps is None or step < self.cfg.max_steps:
                scores = normalize_by_layer(current.heads) if self.cfg.normalize_heads else current.heads
                heads = lowest_heads(scores, keep_heads, n_h) if n_h else []
                mlps = lowest_mlps(current.mlps, keep_mlps, n_m) if n_m else []
                if (n_h and not heads) or (n_m and not mlps):
                    break  # nothing left to remove in this phase
                new_heads, new_mlps = keep_heads.clone(), keep_mlps.clone()
                for layer, head in heads:
                    new_heads[layer, head] = False
                new_mlps[mlps] = False
                step += 1
                self._set_gates(new_heads, new_mlps)
                result = evaluate(True)
                accepted = result.acc >= threshold
                trajectory.append(self._point(step, phase, new_heads, new_mlps, result.acc, accepted))
                if not accepted:
                    break
                keep_heads, keep_mlps, current = new_heads, new_mlps, result
                head_order += heads
                mlp_order += mlps
        self._set_gates(torch.ones_like(keep_heads), torch.ones_like(keep_mlps))  # the full model again
        # the survivors by their last importance: then every element has a place in the order
        scores = normalize_by_layer(current.heads) if self.cfg.normalize_heads else current.heads
        rest = [divmod(i, n_heads) for i in torch.argsort(scores.flatten(), stable=True).tolist()]
        head_order += [h for h in rest if keep_heads[h]]
        mlp_order += [i for i in torch.argsort(current.mlps, stable=True).tolist() if keep_mlps[i]]
        good = {"heads": _lists(keep_heads), "mlps": keep_mlps.tolist()}
        self.search = {
            "full_acc": first.acc,
            "threshold_acc": threshold,
            "trajectory": trajectory,
            "good": good,
            "head_order": [list(h) for h in head_order],
            "mlp_order": mlp_order,
            "full_importance": [[round(float(v), 6) for v in row] for row in normalize_by_layer(first.heads)],
            "full_mlp_importance": [round(float(v), 6) for v in first.mlps],
        }
        self.chosen = self.draw_s(self.cfg.subnetwork)

    def draw_s(self, kind: str) -> dict:
        """The subnetwork ``kind`` of the good one's size: heads kept per layer and MLPs kept."""
        good, n_layers = self.search["good"], len(self.layers)
        shape = (n_layers, surgery.num_heads(self.layers[0]))
        good_heads = heads_mask([(i, h) for i, row in enumerate(good["heads"]) for h in row], shape)
        n_keep, m_keep = int(good_heads.sum()), sum(good["mlps"])
        generator = torch.Generator().manual_seed(self.random_seed)
        if kind == "good":
            heads, mlps = good_heads, torch.tensor(good["mlps"])
        else:
            if kind == "bad":
                head_ranking = [tuple(h) for h in self.search["head_order"]]
                mlp_ranking = self.search["mlp_order"]
            else:
                head_ranking = [divmod(i, shape[1]) for i in torch.randperm(good_heads.numel(), generator=generator).tolist()]
                mlp_ranking = torch.randperm(n_layers, generator=generator).tolist()
            if kind == "random" and self.cfg.random_scope == "layerwise":
                counts = good_heads.sum(1).tolist()
                chosen = [h for layer in range(n_layers) for h in [c for c in head_ranking if c[0] == layer][: counts[layer]]]
            else:
                chosen = first_heads(head_ranking, n_keep, n_layers)
            heads = heads_mask(chosen, shape)
            mlps = torch.zeros(n_layers, dtype=torch.bool)
            mlps[mlp_ranking[:m_keep]] = True
        return {"heads": _lists(heads), "mlps": mlps.tolist()}

    def _search_m(self, evaluate) -> None:
        modules = list(self.linears.values())
        weights = [m.weight_orig.detach().abs() for m in modules]
        total = sum(w.numel() for w in weights)
        ones = [torch.ones_like(m.weight_mask) for m in modules]
        first = evaluate()
        threshold = self.cfg.threshold * first
        trajectory = [{"step": 0, "phase": "full", "weights_remaining": 1.0, "acc": first, "accepted": True}]
        masks, step = ones, 0
        while self.cfg.max_steps is None or step < self.cfg.max_steps:
            kept = sum(int(m.sum()) for m in masks)
            new = keep_largest(weights, masks, round(kept * (1 - self.cfg.weight_fraction)))
            if sum(int(m.sum()) for m in new) in (0, kept):
                break
            step += 1
            for module, mask in zip(modules, new, strict=True):
                set_mask(module, mask)
            acc = evaluate()
            remaining = sum(int(m.sum()) for m in new) / total
            trajectory.append({"step": step, "phase": "weights", "weights_remaining": round(remaining, 6),
                               "acc": acc, "accepted": acc >= threshold})
            if acc < threshold:
                break
            masks = new
        for module, mask in zip(modules, ones, strict=True):
            set_mask(module, mask)  # the full model again
        n_keep = sum(int(m.sum()) for m in masks)
        self.search = {"full_acc": first, "threshold_acc": threshold, "trajectory": trajectory,
                       "good": {"weights": n_keep, "total": total}}
        self.chosen = {"masks": self.draw_m(self.cfg.subnetwork, weights, masks), "weights": n_keep, "total": total}

    def draw_m(self, kind: str, weights: list[Tensor], good: list[Tensor]) -> list[Tensor]:
        """Boolean masks of the good subnetwork's size: good, random positions, or the smallest |w|."""
        if kind == "good":
            return [m.bool() for m in good]
        n_keep = sum(int(m.sum()) for m in good)
        if kind == "random":
            generator = torch.Generator().manual_seed(self.random_seed)
            scores = [torch.rand(w.shape, generator=generator) for w in weights]
        else:
            scores = [-w for w in weights]  # bad: the smallest magnitudes
        return [m.bool() for m in keep_largest(scores, [torch.ones_like(w) for w in weights], n_keep)]

    @torch.no_grad()
    def _set_gates(self, heads: Tensor, mlps: Tensor) -> None:
        for layer, head_gate, mlp_gate in zip(range(len(self.layers)), self.gates.of(surgery.HEAD_GATE),
                                              self.gates.of(surgery.MLP_GATE), strict=True):
            head_gate.copy_(heads[layer].float())
            mlp_gate.fill_(float(mlps[layer]))

    def _point(self, step: int, phase: str, heads: Tensor, mlps: Tensor, acc: float, accepted: bool) -> dict:
        log.info("%s: step %d (%s): %d heads, %d MLPs, accuracy %.4f%s", self.name, step, phase,
                 int(heads.sum()), int(mlps.sum()), acc, "" if accepted else " (below the threshold)")
        return {"step": step, "phase": phase, "heads_kept": int(heads.sum()), "mlps_kept": int(mlps.sum()),
                "acc": acc, "accepted": accepted}

    def _sizes(self, subnetwork: dict | None) -> dict:
        if subnetwork is None:
            return {}
        if "weights" in subnetwork:
            return {"weights_remaining": round(subnetwork["weights"] / subnetwork["total"], 6)}
        heads = [len(row) for row in subnetwork["heads"]]
        return {"heads_kept": sum(heads), "heads_per_layer": heads, "mlps_kept": sum(subnetwork["mlps"]),
                "mlps_per_layer": [int(m) for m in subnetwork["mlps"]]}

    # -- the subnetwork ---------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, model: nn.Module) -> None:
        """Reset to θ0 and cut the model down to ``chosen`` (S: physically; M: masks)."""
        if self.cfg.mode == "m":
            restore(model, self.initial_weights, self.linears)
            for module, mask in zip(self.linears.values(), self.chosen["masks"], strict=True):
                set_mask(module, mask.to(module.weight_mask.dtype))
        else:
            self.gates.remove(fold=False)
            model.load_state_dict(self.initial_weights)
            surgery.shrink(model, self.chosen["heads"],
                           [list(range(surgery.ffn_width(layer))) if keep else []
                            for layer, keep in zip(self.layers, self.chosen["mlps"], strict=True)], self.name)
            for layer, keep in zip(self.layers, self.chosen["mlps"], strict=True):
                if not keep:  # width 0: the block's output is its bias, which must stay 0
                    layer.output.dense.bias.zero_()
                    layer.output.dense.bias.requires_grad_(False)
        self.applied = True


def _lists(mask: Tensor) -> list[list[int]]:
    """Kept indices per layer of a (layers, heads) boolean mask."""
    return [torch.nonzero(row).flatten().tolist() for row in mask]
