"""BERT lottery tickets (Prasanna et al., EMNLP 2020; compressors/bert_lottery.py): Michel et al.'s
importance on a real MiniLM, the S- and M-pruning searches and their stopping rule, good/random/bad
subnetworks, end to end on Rotten Tomatoes, resume after a finished stage and after a kill, bad input."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_resume import kill_when, start

from conftest import metrics_of, one_line_error
from effml.compressors.bert_lottery import (
    BertLottery,
    BertLotteryConfig,
    Pass,
    first_heads,
    importance,
    lowest_heads,
    normalize_by_layer,
)
from effml.compressors.imp import keep_largest
from effml.data import DataInfo
from effml.models import bert_surgery as surgery
from effml.models.bert import BertClassifier, BertClassifierConfig

TOY = ["train", "recipe=bert_lottery", "data.train_subset=64", "data.batch_size=32", "data.eval_batch_size=32",
       "data.max_length=32", "trainer.max_epochs=1", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
       "trainer.progress_bar=off", "compressor.search_batches=2", "measure.enabled=false"]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return BertClassifier.from_config(BertClassifierConfig(), DataInfo(2, "text")).eval()


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(1000, 5000, (n, 12), generator=generator),
         "attention_mask": torch.ones(n, 12, dtype=torch.long),
         "labels": torch.randint(2, (n,), generator=generator)}
    x["attention_mask"][1, 7:] = 0
    return x


def lottery_on(model, **cfg) -> BertLottery:
    compressor = BertLottery(BertLotteryConfig(**cfg))
    compressor.attach(model)
    return compressor


def loss_of(model, x: dict) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]), x["labels"])


# -- Michel et al.'s importance, on a real MiniLM ------------------------------------------------
def test_importance_is_the_mean_absolute_per_example_gate_gradient(minilm):
    model = copy.deepcopy(minilm)
    lottery = lottery_on(model)
    x = batch(4)
    result = importance(model, lottery.layers, [x], torch.device("cpu"))
    assert result.heads.shape == (6, 12) and result.mlps.shape == (6,)
    # the same thing the slow way: one example at a time, |∂L/∂ξ| of the gate parameters themselves
    gates = lottery.gates.parameters()
    for gate in gates:
        gate.requires_grad_(True)
    heads, mlps = torch.zeros(6, 12), torch.zeros(6)
    for b in range(4):
        grads = torch.autograd.grad(loss_of(model, {k: v[b : b + 1] for k, v in x.items()}), gates)
        heads += torch.stack([g.abs() for g in grads[:6]]) / 4
        mlps += torch.cat([g.abs() for g in grads[6:]]) / 4
    assert torch.allclose(result.heads, heads, rtol=1e-4, atol=1e-8)
    assert torch.allclose(result.mlps, mlps, rtol=1e-4, atol=1e-8)
    assert (result.heads > 0).all() and (result.mlps > 0).all()
    assert 0 <= result.acc <= 1
    # Michel §4.2: per layer, head importance divided by its L2 norm
    normalized = normalize_by_layer(result.heads)
    assert torch.allclose(normalized.norm(dim=1), torch.ones(6))
    assert torch.equal(normalized.argsort(dim=1), result.heads.argsort(dim=1))  # the ranking within a layer stays


def test_gate_gradient_is_the_finite_difference_and_predicts_the_masking_effect(minilm):
    model = copy.deepcopy(minilm)
    lottery = lottery_on(model)
    x = batch(4, seed=1)
    gates = lottery.gates.parameters()
    head_gates, mlp_gates = lottery.gates.of(surgery.HEAD_GATE), lottery.gates.of(surgery.MLP_GATE)
    for gate in gates:
        gate.requires_grad_(True)

    def gradients() -> tuple[torch.Tensor, torch.Tensor]:
        grads = torch.autograd.grad(loss_of(model, x), gates)
        return torch.stack(grads[:6]), torch.cat(grads[6:])

    @torch.no_grad()
    def loss_with(gate: torch.Tensor, index: int, value: float) -> float:
        old = float(gate[index])
        gate[index] = value
        out = float(loss_of(model, x))
        gate[index] = old
        return out

    # masking a head (ξ: 1 → 0) changes the loss by about −∂L/∂ξ: the first-order picture behind the
    # importance ranks the heads by the real effect of removing them
    head_grads, _ = gradients()
    base = float(loss_of(model, x).detach())
    effect = torch.tensor([[loss_with(head_gates[i], h, 0.0) - base for h in range(12)] for i in range(6)])
    ranks = [t.flatten().argsort().argsort().double() for t in (head_grads.abs(), effect.abs())]
    assert torch.corrcoef(torch.stack(ranks))[0, 1] > 0.4  # Spearman
    top = head_grads.abs().flatten().topk(5).indices
    assert (torch.sign(effect.flatten()[top]) == torch.sign(-head_grads.flatten()[top])).all()

    # the gradient is the derivative: central differences, in float64 (float32 is off by ~1e-3)
    model.double()
    head_grads, mlp_grads = gradients()
    eps = 1e-4
    for layer, head in [(0, 0), (2, 5), (5, 11)]:
        fd = (loss_with(head_gates[layer], head, 1 + eps) - loss_with(head_gates[layer], head, 1 - eps)) / (2 * eps)
        assert fd == pytest.approx(float(head_grads[layer, head]), rel=1e-4, abs=1e-9)
    for layer in range(6):
        fd = (loss_with(mlp_gates[layer], 0, 1 + eps) - loss_with(mlp_gates[layer], 0, 1 - eps)) / (2 * eps)
        assert fd == pytest.approx(float(mlp_grads[layer]), rel=1e-4, abs=1e-9)


# -- the S-pruning search, on a controlled accuracy -----------------------------------------------
def controlled(lottery: BertLottery, scores: torch.Tensor, mlp_scores: torch.Tensor):
    """An evaluation whose accuracy depends only on the heads the gates keep: 0.5 + 0.3 × kept / 72,
    so the threshold 0.9 × 0.8 = 0.72 is met by ≥ 52.8 heads; importance is fixed."""
    calls = []

    def evaluate(need: bool) -> Pass:
        kept = sum(float(g.sum()) for g in lottery.gates.of(surgery.HEAD_GATE))
        calls.append(kept)
        return Pass(0.5 + 0.3 * kept / 72, scores.clone(), mlp_scores.clone())

    return evaluate, calls


def test_s_search_removes_ten_percent_of_heads_and_one_mlp_per_step_until_the_threshold(minilm):
    # raw scores (per-layer normalization would undo the scaling): layer 0 is the least important
    # everywhere, yet must keep one head
    lottery = lottery_on(copy.deepcopy(minilm), refine=False, normalize_heads=False)
    scores = torch.rand(6, 12, generator=torch.Generator().manual_seed(0))
    scores[0] *= 1e-3
    mlp_scores = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.6, 0.3])
    evaluate, _ = controlled(lottery, scores, mlp_scores)
    lottery._search_s(evaluate)
    trajectory = lottery.search["trajectory"]
    assert [p["heads_kept"] for p in trajectory] == [72, 65, 58, 51]  # int(72 × 0.1) = 7 per step
    assert [p["mlps_kept"] for p in trajectory] == [6, 5, 4, 3]
    assert [p["accepted"] for p in trajectory] == [True, True, True, False]  # 51 heads: 0.7125 < 0.72
    assert lottery.search["threshold_acc"] == pytest.approx(0.72)
    good = lottery.search["good"]
    assert sum(len(h) for h in good["heads"]) == 58 and good["mlps"] == [True, False, True, False, True, True]
    assert len(good["heads"][0]) == 1  # never a layer's last head
    # what was removed: the lowest scores among the rest (layer 0 first, but for one head)
    removed = [tuple(h) for h in lottery.search["head_order"][:14]]
    assert removed == lowest_heads(scores, torch.ones(6, 12, dtype=torch.bool), 14)
    assert sum(1 for layer, _ in removed if layer == 0) == 11
    assert lottery.search["mlp_order"][:2] == [1, 3]
    # the search leaves the model as it found it: every gate at 1, none trainable
    assert all(bool((g == 1).all()) and not g.requires_grad for g in lottery.gates.parameters())


def test_refine_goes_on_with_half_as_many_heads_then_mlps_only(minilm):
    lottery = lottery_on(copy.deepcopy(minilm), refine=True)
    scores = torch.rand(6, 12, generator=torch.Generator().manual_seed(1))
    evaluate, _ = controlled(lottery, scores, torch.tensor([0.5, 0.1, 0.4, 0.2, 0.6, 0.3]))
    lottery._search_s(evaluate)
    steps = [(p["phase"], p["heads_kept"], p["mlps_kept"], p["accepted"]) for p in lottery.search["trajectory"]]
    assert steps == [
        ("full", 72, 6, True), ("heads+mlps", 65, 5, True), ("heads+mlps", 58, 4, True),
        ("heads+mlps", 51, 3, False),
        ("heads", 55, 4, True), ("heads", 52, 4, False),  # 3 heads per step from the last good one
        ("mlps", 55, 3, True), ("mlps", 55, 2, True), ("mlps", 55, 1, True), ("mlps", 55, 0, True),
    ]  # the accuracy does not depend on MLPs here: all of them go
    assert sum(len(h) for h in lottery.search["good"]["heads"]) == 55 and not any(lottery.search["good"]["mlps"])


def test_max_steps_caps_the_search(minilm):
    lottery = lottery_on(copy.deepcopy(minilm), max_steps=1)
    evaluate, calls = controlled(lottery, torch.rand(6, 12), torch.rand(6))
    lottery._search_s(evaluate)
    assert len(calls) == 2 and lottery.search["trajectory"][-1]["heads_kept"] == 65


def test_good_random_and_bad_subnetworks_have_the_same_size(minilm):
    lottery = lottery_on(copy.deepcopy(minilm), refine=False)
    scores = torch.rand(6, 12, generator=torch.Generator().manual_seed(2))
    evaluate, _ = controlled(lottery, scores, torch.tensor([0.5, 0.1, 0.4, 0.2, 0.6, 0.3]))
    lottery._search_s(evaluate)
    good, random, bad = (lottery.draw_s(kind) for kind in ("good", "random", "bad"))
    assert good["heads"] == lottery.search["good"]["heads"]
    for sub in (random, bad):
        assert sum(len(h) for h in sub["heads"]) == 58 and sum(sub["mlps"]) == 4
        assert all(len(h) >= 1 for h in sub["heads"])
    # bad: the 14 heads removed first, then the 44 least important survivors; the MLPs removed first
    order = [tuple(h) for h in lottery.search["head_order"]]
    bad_heads = {(layer, h) for layer, row in enumerate(bad["heads"]) for h in row}
    assert bad_heads == set(first_heads(order, 58, 6)) and set(order[:14]) <= bad_heads
    assert [i for i, keep in enumerate(bad["mlps"]) if keep] == sorted(lottery.search["mlp_order"][:4])
    assert bad["mlps"][1] and bad["mlps"][3]  # the two pruned MLPs are in the bad subnetwork
    assert random["heads"] != good["heads"] and random["heads"] != bad["heads"]
    assert lottery.draw_s("random") == random  # seeded: the same draw on every resume
    lottery.cfg.random_scope = "layerwise"
    layerwise = lottery.draw_s("random")
    assert [len(h) for h in layerwise["heads"]] == [len(h) for h in good["heads"]]


def test_a_layer_left_without_heads_swaps_one_in_and_keeps_the_total():
    ranking = [(0, h) for h in range(12)] + [(1, h) for h in range(12)] + [(2, h) for h in range(12)]
    chosen = first_heads(ranking, 5, 3)
    assert len(chosen) == 5 and {layer for layer, _ in chosen} == {0, 1, 2}
    assert (1, 0) in chosen and (2, 0) in chosen and (0, 0) in chosen  # each layer's first in the ranking


def test_search_data_is_the_val_split_or_as_many_training_examples_in_order(minilm):
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    examples = {split: [{"x": torch.tensor(i), "labels": torch.tensor(0)} for i in range(n)]
                for split, n in (("train", 50), ("val", 12))}
    dm = SimpleNamespace(splits=examples, cfg=SimpleNamespace(eval_batch_size=5), collate=None,
                         val_dataloader=lambda: DataLoader(examples["val"], batch_size=5))
    lottery = BertLottery(BertLotteryConfig(search_data="train"))
    lottery.datamodule = dm
    batches = lottery.search_batches()
    assert [b["x"].tolist() for b in batches] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    lottery.cfg.search_batches = 1
    lottery.cfg.search_data = "val"
    assert len(lottery.search_batches()) == 1


def test_m_search_prunes_ten_percent_of_the_survivors_and_bad_is_the_smallest_weights(minilm):
    lottery = lottery_on(copy.deepcopy(minilm), mode="m", subnetwork="bad")
    modules = list(lottery.linears.values())
    total = sum(m.weight.numel() for m in modules)
    assert len(modules) == 36 and total == 6 * (4 * 384 * 384 + 2 * 384 * 1536)

    def evaluate() -> float:  # 0.5 + 0.3 × weights remaining: 0.72 needs ≥ 73.3% remaining
        return 0.5 + 0.3 * sum(float(m.weight_mask.sum()) for m in modules) / total

    lottery._search_m(evaluate)
    remaining = [p["weights_remaining"] for p in lottery.search["trajectory"]]
    assert remaining == pytest.approx([1.0, 0.9, 0.81, 0.729], abs=1e-5)
    assert [p["accepted"] for p in lottery.search["trajectory"]] == [True, True, True, False]
    assert all(bool((m.weight_mask == 1).all()) for m in modules)  # the full model again
    masks = lottery.chosen["masks"]
    kept = sum(int(m.sum()) for m in masks)
    assert kept == lottery.search["good"]["weights"] == pytest.approx(0.81 * total, abs=2)
    magnitudes = torch.cat([m.weight_orig.detach().abs().flatten() for m in modules])
    flat = torch.cat([m.flatten() for m in masks])
    assert magnitudes[flat].max() <= magnitudes[~flat].min()  # bad: the smallest |w|
    # the good subnetwork: without training between steps, the largest fine-tuned |w| (one-shot)
    weights = [m.weight_orig.detach().abs() for m in modules]
    good = keep_largest(weights, [torch.ones_like(w) for w in weights], kept)
    assert all(torch.equal(a, b.bool()) for a, b in zip(lottery.draw_m("good", weights, good), good, strict=True))
    random = lottery.draw_m("random", weights, good)
    assert sum(int(m.sum()) for m in random) == kept
    assert 0.7 < sum(int((a & b.bool()).sum()) for a, b in zip(random, good, strict=True)) / kept < 0.92  # ≈ 81%


# -- end to end on Rotten Tomatoes ---------------------------------------------------------------
def stage_end(run_dir: Path, stage: str) -> dict:
    return torch.load(next((run_dir / "stages").glob(f"*_{stage}/end.pt")), weights_only=False)


@pytest.mark.slow  # minutes on 2 CPUs: make test-slow
def test_good_subnetwork_end_to_end_resume_after_each_finished_stage_and_the_random_control(effml, tmp_path):
    code, _, err = effml(*TOY)
    assert code == 0, err
    m = metrics_of(tmp_path)
    run_dir = Path(m["run_dir"]) if Path(m["run_dir"]).is_absolute() else tmp_path / m["run_dir"]
    report = m["compressors"]["bert_lottery"]
    assert [s["name"] for s in m["stages"]] == ["finetune", "retrain"]
    assert report["full_val_acc"] == m["stages"][0]["val_acc"] and report["full_test_acc"] == m["stages"][0]["test_acc"]
    trajectory = report["trajectory"]
    assert trajectory[0]["heads_kept"] == 72 and trajectory[0]["acc"] == report["search_full_acc"]
    assert report["search_threshold_acc"] == pytest.approx(0.9 * report["search_full_acc"])
    accepted = [p for p in trajectory if p["accepted"]]
    assert all(p["acc"] >= report["search_threshold_acc"] for p in accepted)
    assert all(p["acc"] < report["search_threshold_acc"] for p in trajectory if not p["accepted"])
    assert report["heads_kept"] == report["good"]["heads_kept"] == sum(report["heads_per_layer"])
    assert report["heads_kept"] < 72 and min(report["heads_per_layer"]) >= 1
    # physically smaller: the retrained model has exactly the kept heads; a pruned MLP has width 0, bias 0
    model = stage_end(run_dir, "retrain")["model"]
    assert not [k for k in model if "gate" in k]
    for layer, (heads, mlp) in enumerate(zip(report["kept_heads"], report["mlps_per_layer"], strict=True)):
        prefix = f"bert.encoder.layer.{layer}."
        assert model[prefix + "attention.self.query.weight"].shape == (32 * len(heads), 384)
        assert model[prefix + "intermediate.dense.weight"].shape == ((1536 if mlp else 0), 384)
        if not mlp:
            assert not model[prefix + "output.dense.bias"].any()
    assert surgery.saved_structure(report["export"]).heads == report["kept_heads"]
    # the finetune stage ended with the full fine-tuned model (gates back at 1)
    finetuned = stage_end(run_dir, "finetune")
    assert all(bool((v == 1).all()) for k, v in finetuned["model"].items() if "gate" in k)
    assert json.dumps(report)  # plain JSON

    # resume after the finetune stage: the search is not redone, the same subnetwork is retrained
    (run_dir / "metrics.json").unlink()
    shutil.rmtree(next((run_dir / "stages").glob("01_retrain")))
    assert effml(*TOY)[0] == 0
    again = metrics_of(tmp_path)
    assert again["compressors"]["bert_lottery"] == report
    assert again["test_acc"] == m["test_acc"]
    assert all(torch.equal(v, stage_end(run_dir, "retrain")["model"][k]) for k, v in model.items())

    # resume after the retrain stage: the smaller shape is rebuilt before its weights load
    (run_dir / "metrics.json").unlink()
    assert effml(*TOY)[0] == 0
    last = metrics_of(tmp_path)
    assert last["compressors"]["bert_lottery"] == report
    assert last["test_acc"] == m["test_acc"] and last["val_acc"] == m["val_acc"]

    # the random control: its own run fine-tunes the same full model and finds the same good
    # subnetwork, then re-fine-tunes random heads and MLPs of that size
    code, _, err = effml(*TOY, "compressor.subnetwork=random")
    assert code == 0, err
    runs = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    control = next(r for r in runs if r["compressors"]["bert_lottery"]["subnetwork"] == "random")
    random = control["compressors"]["bert_lottery"]
    assert control["stages"][0]["test_acc"] == m["stages"][0]["test_acc"]
    assert random["trajectory"] == report["trajectory"] and random["good"] == report["good"]
    assert random["heads_kept"] == report["heads_kept"] and random["mlps_kept"] == report["mlps_kept"]
    assert random["kept_heads"] != report["kept_heads"] and min(random["heads_per_layer"]) >= 1


@pytest.mark.slow  # about 45 s; test_m_pruning_end_to_end covers the same pipeline in make test
def test_bad_subnetwork_end_to_end(effml, tmp_path):
    code, _, err = effml(*TOY, "compressor.subnetwork=bad")
    assert code == 0, err
    report = metrics_of(tmp_path)["compressors"]["bert_lottery"]
    assert report["subnetwork"] == "bad"
    assert report["heads_kept"] == report["good"]["heads_kept"] and report["mlps_kept"] == report["good"]["mlps_kept"]
    assert min(report["heads_per_layer"]) >= 1
    # a control draws its own subnetwork: not the good one (with the same size, per layer it differs)
    assert report["kept_heads"] != report["good"]["kept_heads"]


@pytest.mark.e2e
def test_m_pruning_end_to_end(effml, tmp_path):
    code, _, err = effml(*TOY, "compressor.mode=m", "compressor.subnetwork=random")
    assert code == 0, err
    m = metrics_of(tmp_path)
    report = m["compressors"]["bert_lottery"]
    assert report["weights_remaining"] == report["good"]["weights_remaining"] < 1
    encoder = [v for k, v in m["layers"].items() if ".encoder." in k]
    assert len(encoder) == 36  # the masks are permanent: pruned weights are exact zeros
    nonzero = sum(round(v["numel"] * (1 - v["sparsity"])) for v in encoder)
    assert nonzero / sum(v["numel"] for v in encoder) == pytest.approx(report["weights_remaining"], abs=1e-4)


@pytest.mark.slow  # minutes on 2 CPUs: make test-slow
def test_kill_mid_retrain_then_rerun_gives_the_same_subnetwork(tmp_path):
    args = [*TOY, "trainer.max_epochs=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert start(straight, [], args).wait(timeout=600) == 0
    kill_when(start(killed, [], args), "outputs/*/*/*/stages/01_retrain/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("01_retrain/end.pt"))
    assert start(killed, [], args).wait(timeout=600) == 0
    a, b = metrics_of(straight), metrics_of(killed)
    drop = ("export", "search_time_s")
    ra, rb = ({k: v for k, v in m["compressors"]["bert_lottery"].items() if k not in drop} for m in (a, b))
    assert ra == rb and a["test_acc"] == b["test_acc"]
    ends = [stage_end(Path(next(root.rglob("metrics.json")).parent), "retrain")["model"] for root in (straight, killed)]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("compressor.head_fraction=0", "compressor.head_fraction must be in (0, 1)"),
    ("compressor.head_fraction=1.5", "compressor.head_fraction must be in (0, 1)"),
    ("compressor.threshold=1.0", "compressor.threshold must be in (0, 1)"),
    ("compressor.weight_fraction=-0.1", "compressor.weight_fraction must be in (0, 1)"),
    ("compressor.subnetwork=lucky", "compressor.subnetwork must be one of good, random, bad"),
    ("compressor.mode=x", "compressor.mode must be one of s, m"),
    ("compressor.search_data=test", "compressor.search_data must be one of val, train"),
    ("compressor.max_steps=0", "compressor.max_steps must be >= 1"),
    ("model=lenet_300_100", "compressor bert_lottery needs a BERT encoder"),
])
def test_bad_input_is_one_line_and_writes_nothing(effml, tmp_path, override, message):
    extra = ["data=fashion_mnist"] if override.startswith("model=") else []
    code, _, err = effml("train", "recipe=bert_lottery", override, *extra)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()
