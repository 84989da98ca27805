"""DeiT (Touvron et al., ICML 2021) and its ViT student: the distillation token and head, the hard and
soft losses by hand, the fused inference, the tap removed at finalize, a run end to end, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, metrics_of, one_line_error
from effml.compressors._distill import soft_kl
from effml.compressors.deit import DeiT, DeiTConfig, distillation_loss
from effml.config import TrainerConfig
from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models.vit import ViT, ViTConfig, fuse
from effml.task import ClassificationTask
from effml.teachers import Teacher

DIGITS = DataInfo(num_classes=10, modality="image", input_shape=(1, 8, 8))
SMALL_VIT = ["model=vit_tiny", "model.dim=32", "model.depth=2", "model.heads=2"]
TEACHER = "compressor.teacher.model={name:lenet_300_100,hidden:[256,128]}"


def small_vit(seed: int = 0, **cfg) -> ViT:
    torch.manual_seed(seed)
    return ViT.from_config(ViTConfig(**{"dim": 32, "depth": 2, "heads": 2, **cfg}), DIGITS)


class LinearTeacher(torch.nn.Module):
    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.classifier = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(x.flatten(1))


# -- the losses, by hand --------------------------------------------------------------------------
def test_hard_distillation_is_cross_entropy_to_the_teachers_argmax():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.3, 2.0]])
    teacher = torch.tensor([[3.0, 0.0, 1.0], [0.1, 0.2, 0.0]])  # argmax 0 and 1
    by_hand = -(torch.log_softmax(student, -1)[0, 0] + torch.log_softmax(student, -1)[1, 1]) / 2
    assert distillation_loss(student, teacher, DeiTConfig()).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # label smoothing ε: target 1 − ε + ε/K on the teacher's class, ε/K elsewhere
    eps, log_p = 0.1, torch.log_softmax(student, -1)
    target = torch.full((2, 3), eps / 3)
    target[0, 0] += 1 - eps
    target[1, 1] += 1 - eps
    smoothed = -(target * log_p).sum(-1).mean()
    assert distillation_loss(student, teacher, DeiTConfig(label_smoothing=eps)).item() == pytest.approx(
        smoothed.item(), rel=1e-6)


def test_soft_distillation_is_tau_squared_kl_at_the_papers_tau():
    student, teacher = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[3.0, 0.0, 1.0]])
    cfg = DeiTConfig(distillation="soft")
    p = torch.softmax(teacher / 3, -1)
    by_hand = (p * (p.log() - torch.log_softmax(student / 3, -1))).sum() * 9
    assert cfg.temperature == 3.0 and cfg.weight == 0.1  # paper: τ = 3, λ = 0.1
    assert distillation_loss(student, teacher, cfg).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert DeiTConfig().weight == 0.5 and DeiTConfig(alpha=0.3).weight == 0.3  # hard: ½ CE + ½ CE


@pytest.mark.parametrize("distillation", ["hard", "soft"])
def test_the_task_loss_is_class_head_ce_plus_distillation_head_term(distillation):
    model, teacher = small_vit(), LinearTeacher()
    deit = DeiT(DeiTConfig(distillation=distillation))
    deit.attach(model)
    deit.teacher_module, deit.teacher = teacher, Teacher(teacher)
    task = ClassificationTask(model, TrainerConfig(), [deit])
    torch.manual_seed(2)
    batch = {"x": torch.randn(6, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 3, 4, 5])}
    model.eval()  # no stochastic depth: the hand computation below sees the same forward
    model.training = True  # ...but the train-mode output (the class head)
    with pytest.warns(Warning):  # self.log outside a Trainer
        loss = task.training_step(batch, 0)
    logits, dist = model.heads(batch["x"])
    t = teacher(batch["x"])
    term = F.cross_entropy(dist, t.argmax(-1)) if distillation == "hard" else soft_kl(dist, t, 3.0)
    alpha = 0.5 if distillation == "hard" else 0.1
    expected = (1 - alpha) * F.cross_entropy(logits, batch["labels"]) + alpha * term
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert model.dist_token.grad.abs().sum() > 0 and model.head_dist.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_without_a_token_the_term_acts_on_the_class_head_of_any_student():
    student, teacher = LinearTeacher(seed=3), LinearTeacher()
    deit = DeiT(DeiTConfig(token=False))
    assert deit.attach(student) is student and deit.tap is None  # no ViT needed
    deit.teacher_module, deit.teacher = teacher, Teacher(teacher)
    task = ClassificationTask(student, TrainerConfig(), [deit])
    batch = {"x": torch.randn(4, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 3])}
    with pytest.warns(Warning):
        loss = task.training_step(batch, 0)
    logits = student(batch["x"])
    hard = F.cross_entropy(logits, teacher(batch["x"]).argmax(-1))
    expected = 0.5 * F.cross_entropy(logits, batch["labels"]) + 0.5 * hard  # Table 3's "hard distillation"
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# -- the token, the heads, inference ---------------------------------------------------------------
def test_distillation_token_adds_one_token_and_one_head():
    model = small_vit()
    before = sum(p.numel() for p in model.parameters())
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    model(torch.randn(2, 1, 8, 8))
    model.add_distillation_token()
    model(torch.randn(2, 1, 8, 8))
    assert seen == [(2, 1 + 4, 32), (2, 2 + 4, 32)]  # 2x2 patches of 4x4, + class (+ distillation) token
    assert sum(p.numel() for p in model.parameters()) - before == 32 + 32 * 10 + 10
    model.add_distillation_token()  # idempotent
    assert sum(p.numel() for p in model.parameters()) - before == 32 + 32 * 10 + 10
    model.remove_distillation_token()
    assert sum(p.numel() for p in model.parameters()) == before and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_train_mode_gives_the_class_head_eval_mode_the_fused_heads():
    model = small_vit()
    model.add_distillation_token()
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    logits, dist = model.heads(x)
    model.training = True  # train-mode output without stochastic depth's randomness
    assert torch.equal(model(x), logits)
    model.eval()
    mean_softmax = (logits.softmax(-1) + dist.softmax(-1)) / 2  # the paper: add the softmax outputs
    assert torch.allclose(model(x).exp(), mean_softmax, atol=1e-6)
    assert torch.equal(model(x).argmax(-1), (logits.softmax(-1) + dist.softmax(-1)).argmax(-1))
    assert torch.allclose(fuse(logits, dist, "logits"), (logits + dist) / 2)
    assert torch.equal(fuse(logits, dist, "class"), logits) and torch.equal(fuse(logits, dist, "distillation"), dist)
    assert math.isclose(model(x).exp().sum(-1)[0].item(), 1.0, rel_tol=1e-6)


def test_a_plain_vit_loads_a_deit_state_dict_token_and_all():
    deit = small_vit(seed=0)
    deit.add_distillation_token()
    plain = small_vit(seed=5)
    assert plain.load_state_dict(deit.state_dict()) is not None and plain.distilled
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(plain.eval()(x), deit.eval()(x))


def test_finalize_removes_the_hook_and_keeps_the_token():
    model = small_vit()
    deit = DeiT(DeiTConfig())
    deit.attach(model)
    assert len(model.head_dist._forward_hooks) == 1
    deit.finalize(model, None)
    assert not model.head_dist._forward_hooks and model.distilled


# -- end to end --------------------------------------------------------------------------------------
def test_deit_run_reports_each_head_and_loads_as_a_teacher(effml, tmp_path):
    code, _, err = effml("train", "compressor=deit", "data=digits", *SMALL_VIT, TEACHER, *TINY,
                         "compressor.teacher.epochs=1", "trainer.limit_test_batches=1", "measure.enabled=false")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    assert [s["name"] for s in m["stages"]] == ["teacher", "train"]
    heads = m["compressors"]["deit"]["heads"]
    assert set(heads) == {"class", "distillation", "softmax", "logits"} and m["stages"][1]["heads"] == heads
    assert heads["softmax"]["test_acc"] == pytest.approx(m["test_acc"], abs=1e-6)  # the deployed output
    assert all(0 <= h["test_acc"] <= 1 and 0 <= h["teacher_agreement"] <= 1 for h in heads.values())
    assert m["compressors"]["deit"]["alpha"] == 0.5 and m["test_acc"] > 0.2
    run_dir = next((tmp_path / "outputs").rglob("metrics.json")).parent
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert {"dist_token", "head_dist.weight"} <= set(state)  # the token is part of the deployed model
    from effml.paths import RunDir
    from effml.teachers import load_run

    teacher = load_run(RunDir(run_dir), DIGITS)
    assert teacher.distilled and json.loads((run_dir / "metrics.json").read_text())["recipe"] == "custom"


# -- bad input -----------------------------------------------------------------------------------------
def test_a_non_vit_student_is_one_line(effml):
    code, _, err = effml("train", "compressor=deit", "data=digits", TEACHER, *TINY)
    one_line_error(code, err, "compressor deit needs a ViT student")


def test_a_patch_size_that_does_not_divide_the_image_is_one_line(effml):
    code, _, err = effml("train", "model=vit_tiny", "data=digits", "model.patch_size=3", *TINY)
    one_line_error(code, err, "model.patch_size must divide the image size 8x8, got 3")


@pytest.mark.parametrize(
    "field, value",
    [("distillation", "medium"), ("alpha", 1.5), ("label_smoothing", 1.0), ("inference", "vote"),
     ("temperature", 0.0)],
)
def test_deit_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        DeiTConfig(**{field: value})


@pytest.mark.parametrize("values, message", [({"dim": 30, "heads": 4}, "model.dim must be a multiple"),
                                             ({"drop_path": 1.0}, "model.drop_path"),
                                             ({"patch_size": 0}, "model.patch_size")])
def test_vit_config_rejects_bad_values(values, message):
    with pytest.raises(EffmlError, match=message):
        ViTConfig(**values)
