"""Movement pruning (Sanh, Wolf & Rush 2020): the masks, the straight-through gradient, the schedule,
the scores' own optimizer group, bad input, and a killed run resuming exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_resume import final_state, kill_when, stage_files, start
from torch import nn

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.movement import (
    MovementConfig,
    MovementPruning,
    above_mask,
    global_cut,
    scores_in_own_group,
    straight_through,
    threshold_mask,
    top_k_mask,
)
from effml.compressors.smoke import SETUPS
from effml.errors import EffmlError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.encoder(x)))


def pruner(**fields) -> tuple[MovementPruning, Tiny]:
    method = MovementPruning(MovementConfig(**fields))
    model = Tiny()
    method.attach(model)
    return method, model


def test_top_k_keeps_exactly_the_largest_scores_per_layer():
    scores = torch.randn(30, 40)
    mask = top_k_mask(scores, 0.9)
    assert int(mask.sum()) == 120
    assert scores[mask.bool()].min() > scores[~mask.bool()].max()
    assert torch.equal(top_k_mask(scores, 0.0), torch.ones_like(scores))


def test_threshold_keeps_sigmoid_above_tau_and_never_less_than_half_a_percent():
    scores = torch.tensor([[-3.0, -1.0, 0.0, 2.0]])
    assert threshold_mask(scores, 0.3).tolist() == [[0, 0, 1, 1]]  # σ = 0.047, 0.27, 0.5, 0.88
    everything_low = torch.full((10, 100), -10.0)
    everything_low[0, :3] = -9.0
    kept = threshold_mask(everything_low, 0.1)
    assert int(kept.sum()) == 6 and kept[0, :3].all()  # int(0.005 * 1000) + 1 = 6 kept, the top scores first


def test_the_scores_get_the_straight_through_gradient_w_times_dl_dw():
    """§3: dL/dS_ij = (dL/dW'_ij) W_ij, whether the weight is masked or not."""
    method, model = pruner(sparsity=0.5, skip=["classifier"])
    method.level = 0.5
    x = torch.randn(4, 8)
    model(x).sum().backward()
    layer = model.encoder
    assert layer.weight_mask.sum() == 64  # half of 8 x 16 kept
    # dL/dW' for the used weight W' = W ⊙ M: recompute it with the mask as a constant
    w_used = (layer.weight_orig * layer.weight_mask).detach().requires_grad_()
    out = model.classifier(torch.relu(nn.functional.linear(x, w_used, layer.bias)))
    (grad_used,) = torch.autograd.grad(out.sum(), w_used)
    torch.testing.assert_close(layer.mask_scores.grad, grad_used * layer.weight_orig.detach())
    torch.testing.assert_close(layer.weight_orig.grad, grad_used * layer.weight_mask)
    assert not hasattr(model.classifier, "mask_scores")  # skipped layers stay dense, with no scores


def schedule_at(method: MovementPruning, step: int, total: int = 100) -> float:
    trainer = SimpleNamespace(estimated_stepping_batches=total, global_step=step)
    module = SimpleNamespace(log=lambda *a, **k: None)
    method.on_train_start(trainer, module)
    method.on_train_batch_start(trainer, module, None, 0)
    return method.level


def test_cubic_schedule_with_warmup_and_cooldown():
    method, _ = pruner(sparsity=0.9, warmup_fraction=0.1, cooldown_fraction=0.2)
    assert schedule_at(method, 0) == schedule_at(method, 10) == 0.0  # dense warmup: the scores learn
    assert schedule_at(method, 80) == schedule_at(method, 99) == 0.9  # cooldown at the final sparsity
    assert schedule_at(method, 45) == pytest.approx(0.9 * (1 - 0.5**3))  # halfway through the cubic
    soft, _ = pruner(method="soft", threshold=0.1, final_lambda=400.0)
    assert schedule_at(soft, 45) == pytest.approx(0.1 * (1 - 0.5**3))  # τ follows the same cubic


def test_soft_movement_l1_weight_grows_with_the_threshold():
    method, model = pruner(method="soft", threshold=0.1, final_lambda=400.0, skip=["classifier"])
    method.level = 0.05
    loss = method.loss(None, {}, torch.zeros(1))
    assert float(loss.detach()) == pytest.approx(400.0 * 0.5 * 0.5)  # λ·τ/τ_f · mean σ(0)
    assert pruner(method="hard")[0].loss(None, {}, torch.zeros(1)) is None


def test_finalize_folds_the_masks_in_and_drops_the_scores():
    method, model = pruner(sparsity=0.75, skip=["classifier"])
    with torch.no_grad():
        model.encoder.mask_scores.copy_(torch.randn(16, 8))
    method.on_train_end(None, None)
    model.eval()(torch.randn(2, 8))
    method.finalize(model, None)
    assert not hasattr(model.encoder, "mask_scores") and not hasattr(model.encoder, "weight_mask")
    assert float((model.encoder.weight == 0).float().mean()) == 0.75
    report = method.report()
    assert report["achieved_sparsity"] == 0.75 and report["target_sparsity"] == 0.75
    assert not any("mask_scores" in k for k in model.state_dict())


def test_scores_train_in_their_own_group_with_their_lr_no_decay_and_the_schedule():
    method, model = pruner(sparsity=0.5, skip=["classifier"])

    class Task:
        lr_scale = 2.0

        def __init__(self):
            self.model = model

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    task = Task()
    configured = scores_in_own_group(task, 1e-2)()
    weights, scores = configured["optimizer"].param_groups
    assert [id(p) for p in scores["params"]] == [id(model.encoder.mask_scores)]
    assert all(p is not model.encoder.mask_scores for p in weights["params"])
    assert scores["weight_decay"] == 0.0 and scores["lr"] == pytest.approx(1e-2 * 2.0 * 0.5)
    configured["optimizer"].step()
    configured["lr_scheduler"]["scheduler"].step()
    assert scores["lr"] == pytest.approx(1e-2 * 2.0 * 0.5) and weights["lr"] == pytest.approx(0.5e-4)


@pytest.mark.parametrize("field, value", [("sparsity", 1.0), ("sparsity", -0.1), ("threshold", 0.0),
                                          ("method", "sideways"), ("cooldown_fraction", 0.95),
                                          ("final_lambda", -1.0), ("score_lr", 0.0), ("granularity", "block"),
                                          ("calibrate", True)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        MovementConfig(**{field: value})  # calibrate: only with method=soft


# -- calibrated soft movement ------------------------------------------------------------------
def test_global_cut_leaves_the_scheduled_fraction_over_all_layers_not_per_layer():
    torch.manual_seed(0)
    scores = [torch.randn(40, 50), torch.randn(10, 10) + 2.0]  # the second layer's scores are higher
    cut = global_cut(scores, 0.9)
    masks = [above_mask(s, cut) for s in scores]
    assert sum(int(m.sum()) for m in masks) == 210  # 10% of 2,100
    assert masks[1].mean() > 3 * masks[0].mean()  # a global threshold: layers end at different sparsities
    assert global_cut(scores, 0.0) == float("-inf")


def test_calibrated_soft_movement_lands_on_the_target_and_keeps_its_l1():
    method, model = pruner(method="soft", calibrate=True, sparsity=0.75, skip=["classifier"])
    with torch.no_grad():
        model.encoder.mask_scores.copy_(torch.randn(16, 8))
    assert schedule_at(method, 99) == 0.75  # the level is the sparsity, τ follows from the scores
    assert float(method.loss(None, {}, torch.zeros(1)).detach()) > 0
    method.finalize(model, None)
    assert method.report()["achieved_sparsity"] == 0.75 and method.target_sparsity() == 0.75


# -- block movement (granularity=row_col) --------------------------------------------------------
class TinyBert(nn.Module):
    """A 2-layer BERT (4 heads of 8, FFN 64) with a classifier on [CLS], as effml's BertClassifier."""

    def __init__(self):
        from transformers import BertConfig, BertModel

        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(32, 2)

    def forward(self, input_ids):
        return self.classifier(self.bert(input_ids=input_ids).last_hidden_state[:, 0])


def block_pruner(**fields) -> tuple[MovementPruning, TinyBert]:
    method = MovementPruning(MovementConfig(granularity="row_col", **fields))
    model = TinyBert()
    method.attach(model)
    return method, model


def random_unit_scores(model: TinyBert) -> None:
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.head_mask_scores.normal_()
            layer.intermediate.channel_mask_scores.normal_()


def test_block_scores_cover_whole_heads_and_channels_and_sum_their_movement():
    method, model = block_pruner(sparsity=0.5)
    random_unit_scores(model)
    method.level = 0.5
    ids = torch.randint(0, 60, (3, 10))
    logits = model(ids)
    layer = model.bert.encoder.layer[0]
    query, out = layer.attention.self.query, layer.attention.output.dense
    up, down = layer.intermediate.dense, layer.output.dense
    for module in (up, down, query, layer.attention.self.key, layer.attention.self.value, out):
        module.weight.retain_grad()  # dL/dW' of the products W' = W ⊙ M this forward used
    logits.sum().backward()
    head_rows = query.weight_mask.view(4, 8, 32)  # one head = 8 rows of Q
    assert head_rows.sum() == 2 * 8 * 32 and torch.equal(head_rows.amax((1, 2)), head_rows.amin((1, 2)))
    assert torch.equal(out.weight_mask.view(32, 4, 8)[0, :, 0], head_rows[:, 0, 0])  # O's columns alike
    assert up.weight_mask.sum() == 32 * 32 and torch.equal(up.weight_mask[:, 0], down.weight_mask[0, :])
    # the straight-through gradient of a unit's score: Σ over its rows and columns of (dL/dW') ⊙ W,
    # pruned units included
    moved = {m: (m.weight.grad * m.weight_orig).detach() for m in (up, down, query, out)}
    moved_k, moved_v = ((m.weight.grad * m.weight_orig).detach() for m in (layer.attention.self.key,
                                                                          layer.attention.self.value))
    channel = moved[up].sum(1) + moved[down].sum(0)
    torch.testing.assert_close(layer.intermediate.channel_mask_scores.grad, channel)
    head = (moved[query] + moved_k + moved_v).view(4, 8, 32).sum((1, 2)) + moved[out].view(32, 4, 8).sum((0, 2))
    torch.testing.assert_close(layer.attention.self.head_mask_scores.grad, head)


@pytest.mark.parametrize("multiple", [1, 16])
def test_block_finalize_removes_the_dead_units_physically_and_the_logits_do_not_change(multiple):
    """The shrunken model computes what the masked one did: its dropped heads and channels were
    zeros, and the units kept to round the widths up to the channel multiple are zeros too."""
    method, model = block_pruner(sparsity=0.7)
    method.channel_multiple = multiple
    random_unit_scores(model)
    method.on_train_end(None, None)
    ids = torch.randint(0, 60, (5, 12))
    model.eval()
    with torch.no_grad():
        masked = model(ids)
    dense_params = sum(p.numel() for p in model.parameters() if p.ndim)  # incl. scores: counted below without
    method.finalize(model, None)
    with torch.no_grad():
        shrunk = model(ids)
    torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-6)
    report = method.report()
    layer = model.bert.encoder.layer[0]
    # hard: 1 − 0.7 of 4 heads → 1 head, of 64 channels → 19; widths rounded to 16: 2 heads (16), 32 channels
    heads, channels = (1, 19) if multiple == 1 else (2, 32)
    assert report["heads_per_layer"] == [heads, heads] and report["ffn_per_layer"] == [channels, channels]
    assert layer.attention.self.query.out_features == 8 * heads and layer.intermediate.dense.out_features == channels
    assert report["params_shrunk"] == sum(p.numel() for p in model.parameters()) < dense_params
    assert 0 < report["params_removed"] < 1
    assert report["achieved_sparsity"] == pytest.approx(1 - (4 * 32 * 8 + 2 * 32 * 19) / (4 * 32 * 32 + 2 * 32 * 64))
    assert not any("mask_scores" in k or "weight_mask" in k for k in model.state_dict())


def test_block_movement_needs_a_bert_encoder():
    with pytest.raises(EffmlError, match="compressor movement needs a BERT encoder"):
        MovementPruning(MovementConfig(granularity="row_col")).attach(Tiny())


def test_bad_sparsity_and_a_non_transformer_are_one_line_and_write_nothing(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["movement"]), "compressor.sparsity=1.0")
    one_line_error(code, err, "compressor.sparsity must be in [0, 1)")
    code, _, err = effml("train", *TINY, "data=digits", "compressor=movement")
    one_line_error(code, err, "compressor movement prunes a transformer's encoder; model lenet_300_100 is not one")
    code, _, err = effml("train", *TINY, *smoke_args("vit", ["movement"]), "compressor.granularity=row_col")
    one_line_error(code, err, "compressor movement needs a BERT encoder (model=minilm_l6 or model=bert_base)")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_soft_movement_prunes_by_threshold_on_the_bert_smoke(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["movement"]), "compressor.method=soft",
                         "compressor.score_init=-2.1", "compressor.score_lr=0.1")  # σ(-2.1) = 0.109: near τ
    assert code == 0, err
    report = metrics_of(tmp_path / "outputs")["compressors"]["movement"]
    assert report["method"] == "soft" and 0 < report["achieved_sparsity"] < 1
    assert report["target_sparsity"] is None and report["threshold"] == 0.1


RESUME_MOVEMENT = ["train", "data=digits", "model=vit_tiny", "model.dim=32", "model.depth=2", "model.heads=2",
                   "compressor=movement", "data.train_subset=1000", "data.batch_size=50", "trainer.max_epochs=4",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "trainer.progress_bar=off",
                   "measure.enabled=false"]


# block movement on the tiny BERT: 4 epochs of 2 steps, the kill after the first epoch's checkpoint
RESUME_BLOCK = ["train", *SETUPS["bert"], "compressor=movement", "compressor.granularity=row_col",
                "compressor.sparsity=0.5", "trainer.max_epochs=4", "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=2", "trainer.progress_bar=off", "measure.enabled=false"]


# the per-weight case in make test; block and calibrated soft (their own schedule state) in make test-slow
@pytest.mark.e2e
@pytest.mark.parametrize("run, sparsity", [
    pytest.param(RESUME_MOVEMENT, 0.9, id="weight"),
    pytest.param(RESUME_BLOCK, None, id="row_col", marks=pytest.mark.slow),
    pytest.param(RESUME_MOVEMENT + ["compressor.method=soft", "compressor.calibrate=true"], 0.9, id="soft_calibrated",
                 marks=pytest.mark.slow)])
def test_kill_mid_stage_then_rerun_matches_uninterrupted(tmp_path, run, sparsity):
    """The masks change every step and the scores have their own optimizer group: a SIGKILL mid-stage
    and the same command again end with the same scores' effect, masks and weights, bit for bit
    (block movement: the same shrunken model.pt too)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    finish_run = lambda cwd: finish_with(cwd, run)  # noqa: E731
    finish_run(straight)
    process = start(killed, [], run=run)
    kill_when(process, "outputs/*/*/*/stages/00_train/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("metrics.json"))
    finish_run(killed)
    (model_a, metrics_a), (model_b, metrics_b) = final_state(straight), final_state(killed)
    assert any(k.endswith("mask_scores") for k in model_a)  # end.pt holds the scores
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert stage_files(straight) == stage_files(killed)
    assert metrics_a["test_acc"] == metrics_b["test_acc"]
    report = metrics_a["compressors"]["movement"]
    if sparsity is not None:
        assert report["achieved_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    else:  # 2 of 4 heads and 32 of 64 channels per layer, cut out
        assert report["heads_per_layer"] == [2, 2] and report["ffn_per_layer"] == [32, 32]
        assert report == metrics_b["compressors"]["movement"]


def finish_with(cwd, run):
    process = start(cwd, [], run=run)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out


def test_the_forward_mask_is_exactly_binary():
    scores = torch.randn(50, 50) * 1e-3
    mask = top_k_mask(scores, 0.5)
    assert torch.equal(straight_through(mask, scores.requires_grad_()), mask)
