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
    scores_in_own_group,
    straight_through,
    threshold_mask,
    top_k_mask,
)
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
                                          ("final_lambda", -1.0), ("score_lr", 0.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        MovementConfig(**{field: value})


def test_bad_sparsity_and_a_non_transformer_are_one_line_and_write_nothing(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["movement"]), "compressor.sparsity=1.0")
    one_line_error(code, err, "compressor.sparsity must be in [0, 1)")
    code, _, err = effml("train", *TINY, "data=digits", "compressor=movement")
    one_line_error(code, err, "compressor movement prunes a transformer's encoder; model lenet_300_100 is not one")
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


@pytest.mark.e2e
def test_kill_mid_stage_then_rerun_matches_uninterrupted(tmp_path):
    """The masks change every step and the scores have their own optimizer group: a SIGKILL mid-stage
    and the same command again end with the same scores' effect, masks and weights, bit for bit."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    finish_run = lambda cwd: finish_with(cwd, RESUME_MOVEMENT)  # noqa: E731
    finish_run(straight)
    process = start(killed, [], run=RESUME_MOVEMENT)
    kill_when(process, "outputs/*/*/*/stages/00_train/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("metrics.json"))
    finish_run(killed)
    (model_a, metrics_a), (model_b, metrics_b) = final_state(straight), final_state(killed)
    assert any(k.endswith("mask_scores") for k in model_a)  # end.pt holds the scores
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert stage_files(straight) == stage_files(killed)
    assert metrics_a["test_acc"] == metrics_b["test_acc"]
    assert metrics_a["compressors"]["movement"]["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)


def finish_with(cwd, run):
    process = start(cwd, [], run=run)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out


def test_the_forward_mask_is_exactly_binary():
    scores = torch.randn(50, 50) * 1e-3
    mask = top_k_mask(scores, 0.5)
    assert torch.equal(straight_through(mask, scores.requires_grad_()), mask)
