"""Self-distillation (Zhang et al., ICCV 2019 / TPAMI 2022): the loss against a hand computation,
heads and hooks attached and removed, the detached-backbone control, the threshold logic of dynamic
inference, the genetic threshold search, bad input, and one run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, metrics_of, one_line_error
from effml.compressors.self_distill import (
    HEADS,
    ExitOutputs,
    SelfDistillation,
    SelfDistillConfig,
    dynamic_inference,
    fitness,
    genetic_search,
    grid_search,
    self_distill_loss,
)
from effml.models.resnet import ResNet

SMALL = ["model=resnet20", "model.depth=8", "model.width=8", "data=digits"]


# -- the loss --------------------------------------------------------------------------------
def log_softmax(row: list[float], t: float = 1.0) -> list[float]:
    z = [v / t for v in row]
    norm = math.log(sum(math.exp(v) for v in z))
    return [v - norm for v in z]


def test_loss_matches_a_hand_computation_and_detaches_the_teacher():
    q1 = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], requires_grad=True)
    q2 = torch.tensor([[-0.5, 1.5, 0.0], [1.0, -2.0, 0.5]], requires_grad=True)
    qc = torch.tensor([[3.0, 0.0, -1.0], [0.0, 0.0, 2.0]], requires_grad=True)
    f1 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    f2 = torch.tensor([[0.5, 0.5], [1.0, 1.0]], requires_grad=True)
    fc = torch.tensor([[1.5, 1.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    alpha, tau, lam = 0.3, 3.0, 0.03

    def by_hand(t_squared: bool) -> float:
        total = 0.0
        for q, f in ((q1, f1), (q2, f2)):
            ce = -sum(log_softmax(q[b].tolist())[int(y[b])] for b in range(2)) / 2
            kl = 0.0
            for b in range(2):
                lt, ls = log_softmax(qc[b].tolist(), tau), log_softmax(q[b].tolist(), tau)
                kl += sum(math.exp(a) * (a - s) for a, s in zip(lt, ls, strict=True))
            kl = kl / 2 * (tau**2 if t_squared else 1)
            hint = sum(sum((a - c) ** 2 for a, c in zip(f[b].tolist(), fc[b].tolist(), strict=True))
                       for b in range(2)) / 2
            total += (1 - alpha) * ce + alpha * kl + lam * hint
        return total

    for t_squared in (False, True):
        loss = self_distill_loss([q1, q2], [f1, f2], qc, fc, y, alpha, tau, lam, t_squared)
        assert loss.item() == pytest.approx(by_hand(t_squared), rel=1e-6)
    loss.backward()
    assert qc.grad is None and fc.grad is None  # the deepest classifier is the teacher: detached
    assert q1.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0


# -- heads and hooks --------------------------------------------------------------------------
def small_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(1, depth=8, width=8, option="A", num_classes=10)


def forward_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def attached(**cfg) -> tuple[SelfDistillation, ResNet]:
    compressor = SelfDistillation(SelfDistillConfig(**cfg))
    return compressor, compressor.attach(small_resnet())


def train_step_grads(compressor, model) -> dict[str, torch.Tensor | None]:
    """Gradients of the self-distillation term alone (not the task's CE) after one forward."""
    from types import SimpleNamespace

    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    model.train()
    logits = model(x=x)
    task = SimpleNamespace(model=model, cfg=SimpleNamespace(label_smoothing=0.0))
    loss = compressor.loss(task, {"x": x, "labels": y}, logits)
    assert torch.isfinite(loss)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_heads_train_with_the_model_and_finalize_leaves_the_plain_network():
    plain = small_resnet()
    compressor, model = attached()
    assert forward_hooks(model) == 3  # layer1, layer2, the classifier's input
    keys = set(model.state_dict())
    assert {k for k in keys if not k.startswith(HEADS + ".")} == set(plain.state_dict())
    assert any(k.startswith(f"{HEADS}.0.attention.") for k in keys)
    # every head gets its channels right: 8 → 32 takes two strided SepConvs, 16 → 32 one
    assert [len(h.align) for h in model.self_distill_exits] == [2, 1]
    grads = train_step_grads(compressor, model)
    assert grads["layer1.0.conv1.weight"].abs().sum() > 0  # the exits teach the backbone below them
    assert grads["layer3.0.conv1.weight"] is None  # ... but nothing above the last exit
    assert grads["classifier.weight"] is None  # the deepest classifier is only the teacher here
    # resume: a fresh attached model takes the checkpoint, heads included
    _, other = attached()
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    before = model.eval()(x=x)
    compressor.finalize(model, hardware=None)
    assert not hasattr(model, HEADS) and forward_hooks(model) == 0
    assert set(model.state_dict()) == set(plain.state_dict())
    assert torch.equal(model(x=x), before)  # the network itself is untouched


def test_detached_backbone_trains_exactly_as_the_plain_network():
    """The table's baseline series: with detach_backbone the exits' terms never reach the backbone,
    so SGD (momentum, weight decay) moves its weights exactly as in plain training."""
    from types import SimpleNamespace

    plain = small_resnet()
    compressor, model = attached(detach_backbone=True)
    task = SimpleNamespace(model=model, cfg=SimpleNamespace(label_smoothing=0.0))
    heads_before = {k: v.clone() for k, v in model.self_distill_exits.state_dict().items()}
    optimizers = [torch.optim.SGD(m.parameters(), 0.1, momentum=0.9, weight_decay=5e-4) for m in (plain, model)]
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(10, (8,), generator=generator)
        logits = model(x=x)
        losses = [F.cross_entropy(plain(x=x), y),
                  F.cross_entropy(logits, y) + compressor.loss(task, {"x": x, "labels": y}, logits)]
        for optimizer, loss in zip(optimizers, losses, strict=True):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = model.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(trained[key], value), key
    assert not torch.equal(model.self_distill_exits.state_dict()["0.fc.weight"], heads_before["0.fc.weight"])


# -- dynamic inference ------------------------------------------------------------------------
OUT = ExitOutputs(
    confidence=np.array([[0.9, 0.4, 0.6, 0.3], [0.95, 0.8, 0.5, 0.2], [0.99, 0.9, 0.9, 0.9]]),
    correct=np.array([[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool),
    ensemble_correct=np.array([1, 1, 0, 0], dtype=bool),
)
COSTS = np.array([10.0, 25.0, 50.0])


def test_an_all_confident_threshold_exits_everything_at_the_first_classifier():
    r = dynamic_inference(OUT, [0.0, 0.0], COSTS)
    assert r == {"acc": 0.5, "avg_depth": 1.0, "avg_flops": 10.0, "exit_fractions": [1.0, 0.0, 0.0]}


def test_thresholds_pick_the_first_confident_classifier_and_the_fallback():
    for fallback, acc in (("deepest", 1.0), ("ensemble", 0.75)):
        r = dynamic_inference(OUT, [0.5, 0.7], COSTS, fallback)  # exits 1, 2, 1, none
        assert r["acc"] == acc
        assert r["avg_depth"] == pytest.approx(1.75)
        assert r["avg_flops"] == pytest.approx((10 + 25 + 10 + 50) / 4)
        assert r["exit_fractions"] == [0.5, 0.25, 0.25]
    nobody = dynamic_inference(OUT, [1.0, 1.0], COSTS, "ensemble")  # never confident: all at the deepest
    assert (nobody["avg_depth"], nobody["avg_flops"], nobody["acc"]) == (3.0, 50.0, 0.5)


def synthetic(n: int = 600, seed: int = 0) -> ExitOutputs:
    """Three classifiers, deeper ones more accurate, confidence higher where they are right."""
    rng = np.random.default_rng(seed)
    correct = rng.random((3, n)) < np.array([[0.7], [0.8], [0.9]])
    confidence = np.clip(0.55 + 0.3 * correct + 0.25 * rng.standard_normal((3, n)), 0.1, 1.0)
    return ExitOutputs(confidence, correct, correct[2])


def test_genetic_search_keeps_the_budget_and_is_never_worse_than_the_grid():
    out, grid = synthetic(), [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    for budget in (20.0, 30.0, 40.0):
        found = genetic_search(out, COSTS, budget, "ensemble", np.random.default_rng(0),
                               population=20, generations=15, bits=8, seeds=[0.0, *grid, 1.0])
        mine = dynamic_inference(out, found, COSTS, "ensemble")
        best_grid = dynamic_inference(out, grid_search(out, COSTS, budget, "ensemble", grid), COSTS, "ensemble")
        assert mine["avg_flops"] <= budget
        assert fitness(mine, budget) >= fitness(best_grid, budget)
        assert found == genetic_search(out, COSTS, budget, "ensemble", np.random.default_rng(0), population=20,
                                       generations=15, bits=8, seeds=[0.0, *grid, 1.0])  # deterministic
    # below the first exit's cost nothing is feasible: the search gets as close as it can
    cheapest = genetic_search(out, COSTS, 5.0, "ensemble", np.random.default_rng(0), population=20, generations=5)
    assert dynamic_inference(out, cheapest, COSTS)["avg_flops"] == 10.0


# -- the CLI --------------------------------------------------------------------------------------
def test_bad_input_is_one_line(effml):
    def fails(message: str, *overrides: str) -> None:
        code, _, err = effml("train", "compressor=self_distill", *overrides)
        one_line_error(code, err, message)

    fails("compressor.alpha must be in [0, 1]", *SMALL, "compressor.alpha=1.5")
    fails("has no module 'layer1'; self_distill attaches classifiers to a CNN", "data=digits")  # LeNet
    fails("no module 'layer9'", *SMALL, "compressor.exits=[layer9]")
    fails("shallow to deep", *SMALL, "compressor.exits=[layer2,layer1]")


def test_a_run_reports_every_classifier_and_dynamic_inference(effml, tmp_path):
    code, _, err = effml("train", "compressor=self_distill", *TINY, *SMALL)
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    r, run = m["compressors"]["self_distill"], Path(m["run_dir"])
    exits = r["exits"]
    assert [e["module"] for e in exits] == ["layer1", "layer2", "classifier"]
    assert exits[-1]["test_acc"] == pytest.approx(m["test_acc"], abs=1e-5)  # the finalized model is the deepest
    assert exits[-1]["flops"] == r["plain_flops"] == pytest.approx(m["flops"]["compressed"])
    assert exits[0]["flops"] < exits[1]["flops"] < exits[2]["flops"]
    heads = [e["head_flops"] for e in exits[:-1]]
    assert exits[0]["flops_reached"] == exits[0]["flops"]  # exiting first costs what the first classifier does
    assert exits[1]["flops_reached"] == exits[1]["flops"] + heads[0]  # ... later exits pay for the heads before
    assert exits[2]["flops_reached"] == r["plain_flops"] + sum(heads)
    sweep = r["dynamic"]["sweep"]
    assert [p["threshold"] for p in sweep] == SelfDistillConfig().thresholds
    depths = [p["avg_depth"] for p in sweep]
    assert depths == sorted(depths)  # a higher threshold never exits earlier
    for b in r["dynamic"]["search"]["budgets"]:
        assert len(b["thresholds"]) == 2 and 1.0 <= b["test_avg_depth"] <= 3.0
        if b["feasible"]:
            assert b["val_flops_fraction"] <= b["budget"] + 1e-6
    assert (run / "self_distill_dynamic.png").stat().st_size > 10_000
    saved = torch.load(run / "self_distill_exits.pt", weights_only=True)
    assert saved["exits"] == ["layer1", "layer2"] and len(saved["thresholds"]) == 3
    assert not any(k.startswith(HEADS) for k in torch.load(run / "model.pt", weights_only=True))
    assert json.loads((run / "metrics.json").read_text())["compressors"]["self_distill"]["finalized"].startswith("plain")
