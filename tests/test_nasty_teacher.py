"""Nasty teacher (Ma et al., ICLR 2021) and skeptical student (Kundu et al., NeurIPS 2021)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, Linear, metrics_of, one_line_error
from effml.compressors._distill import soft_kl
from effml.compressors.nasty_teacher import NastyTeacher, NastyTeacherConfig, adversarial_kl, soft_stats
from effml.compressors.skeptical import AUX_ATTR, SkepticalConfig, SkepticalStudent, skeptical_loss
from effml.config import TrainerConfig
from effml.errors import EffmlError
from effml.models.resnet import ResNet
from effml.task import ClassificationTask
from effml.teachers import Teacher

ADVERSARY = "compressor.teacher.model={name:lenet_300_100,hidden:[256,128]}"
SMALL_RESNET = ["model=resnet20", "model.depth=8", "model.width=4"]


# -- nasty teacher: the loss, by hand ------------------------------------------------------------
def test_adversarial_kl_is_kl_of_nasty_to_adversary_times_t_squared():
    nasty, adversary = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]), torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 4.0
    p, q = torch.softmax(nasty / t, -1), torch.softmax(adversary / t, -1)
    by_hand = (p * (p / q).log()).sum(-1).mean() * t * t
    assert adversarial_kl(nasty, adversary, t).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # the direction of Eq. 2: KL(nasty ‖ adversary), i.e. soft_kl with the roles swapped
    assert adversarial_kl(nasty, adversary, t).item() == pytest.approx(soft_kl(adversary, nasty, t).item(), rel=1e-6)
    assert soft_stats(nasty, adversary, t)["kl_to_adversary"].mean().item() == pytest.approx(by_hand.item() / t**2)


def test_the_task_minimizes_ce_minus_omega_t2_kl_and_pushes_away_from_the_adversary():
    nasty, adversary = Linear(0), Linear(1)
    compressor = NastyTeacher(NastyTeacherConfig(omega=0.5, temperature=2.0))
    compressor.teacher_module, compressor.teacher = adversary, Teacher(adversary)
    task = ClassificationTask(nasty, TrainerConfig(), [compressor])
    batch = {"x": torch.randn(8, 4), "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    with pytest.warns(Warning):  # self.log outside a Trainer
        loss = task.training_step(batch, 0)
    logits = nasty(batch["x"])
    adversary_logits = adversary(batch["x"]).detach()
    kl = adversarial_kl(logits, adversary_logits, 2.0)
    assert loss.item() == pytest.approx((F.cross_entropy(logits, batch["labels"]) - 0.5 * kl).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in adversary.parameters())  # the adversary stays frozen
    # a gradient step on the adversarial term alone moves the nasty teacher away from the adversary
    nasty.zero_grad()
    (-kl).backward()
    with torch.no_grad():
        for p in nasty.parameters():
            p -= 0.5 * p.grad
    assert adversarial_kl(nasty(batch["x"]), adversary_logits, 2.0) > kl


def test_nasty_teacher_config_errors_name_the_field():
    with pytest.raises(EffmlError, match="compressor.omega"):
        NastyTeacherConfig(omega=-0.1)


@pytest.mark.e2e
def test_a_nasty_teacher_keeps_its_accuracy_and_moves_its_soft_outputs_away(effml, tmp_path):
    """Digits, a LeNet adversary trained in the run: ω = 0 gives a second normal network (small KL
    to the adversary), the paper's ω = 0.04 a nasty one (KL at τ = 4 many times larger)."""
    runs = {}
    for omega in (0.0, 0.04):
        code, _, err = effml("train", "compressor=nasty_teacher", "data=digits", ADVERSARY, *TINY,
                             "trainer.max_epochs=6", "data.train_subset=null", f"compressor.omega={omega}",
                             f"output_root=omega_{omega}")
        assert code == 0, err
        runs[omega] = metrics_of(tmp_path / f"omega_{omega}")
    normal, nasty = (runs[w]["compressors"]["nasty_teacher"] for w in (0.0, 0.04))
    assert nasty["kl_to_adversary"] > 5 * normal["kl_to_adversary"]
    assert runs[0.04]["test_acc"] > runs[0.0]["test_acc"] - 0.05  # still a good classifier
    assert runs[0.04]["stages"][-1]["nasty_kl_to_adversary"] == nasty["kl_to_adversary"]


# -- skeptical student: the loss, the ACs and their removal ---------------------------------------
def test_skeptical_loss_matches_the_paper_by_hand():
    torch.manual_seed(0)
    aux = {"a": torch.randn(5, 3), "b": torch.randn(5, 3)}
    final, teacher, labels = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    cfg = SkepticalConfig(aux_paths=["a", "b"], alpha=0.9, beta=0.3, gamma1=0.5, gamma2=2.0, temperature=4.0)
    t = 4.0

    def kl(student, target, temp):  # KL(σ(target/T) ‖ σ(student/T)), no T²
        p = torch.softmax(target / temp, -1)
        return (p * (p.log() - torch.log_softmax(student / temp, -1))).sum(-1).mean()

    l_kd = 0.1 * F.cross_entropy(aux["a"], labels) + 0.9 * t * t * kl(aux["a"], teacher, t)
    l_sd = sum(0.7 * F.cross_entropy(a, labels) + 0.3 * kl(a, final, t) for a in aux.values())
    expected = 0.5 * l_kd + 2.0 * l_sd
    assert skeptical_loss(aux, "a", final, teacher, labels, cfg).item() == pytest.approx(expected.item(), rel=1e-5)


def test_acs_attach_train_only_the_shallow_path_and_are_removed():
    model = ResNet(1, 8, 4, "A", 10)
    plain_keys = set(model.state_dict())
    compressor = SkepticalStudent(SkepticalConfig(aux_paths=["layer1", "layer2"], gamma1=0.0, gamma3=0.0))
    teacher = ResNet(1, 8, 4, "A", 10)
    compressor.teacher_module, compressor.teacher = teacher, Teacher(teacher)
    compressor.attach(model)
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith(AUX_ATTR)} == {"layer1", "layer2"}
    task = ClassificationTask(model, TrainerConfig(), [compressor])
    batch = {"x": torch.randn(6, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 3, 4, 5])}
    with pytest.warns(Warning):
        loss = task.training_step(batch, 0)
    assert {k: v.shape for k, v in compressor.aux_logits().items()} == {"layer1": (6, 10), "layer2": (6, 10)}
    loss.backward()
    # γ3 = 0 and γ1 = 0: only self-distillation is left, and the final classifier is its teacher,
    # so it gets no gradient (detached target); the layers the ACs read from do
    assert model.classifier.weight.grad is None or not model.classifier.weight.grad.any()
    assert model.layer3[0].conv1.weight.grad is None or not model.layer3[0].conv1.weight.grad.any()
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    compressor.finalize(model, None)
    assert set(model.state_dict()) == plain_keys
    assert not any(m._forward_hooks for m in model.modules())


def test_skeptical_config_errors_name_the_field():
    with pytest.raises(EffmlError, match="compressor.kd_at"):
        SkepticalConfig(aux_paths=["layer1"], kd_at="layer2")
    with pytest.raises(EffmlError, match="compressor.beta"):
        SkepticalConfig(beta=1.5)
    with pytest.raises(EffmlError, match="compressor.aux_paths"):
        SkepticalConfig(aux_paths=[])


def test_an_unknown_aux_module_is_one_line(effml):
    code, _, err = effml("train", "compressor=skeptical", "data=digits", *SMALL_RESNET, ADVERSARY, *TINY,
                         "compressor.aux_paths=[layer1,layer9]")
    one_line_error(code, err, "compressor.aux_paths: the student has no module 'layer9'")


def test_a_student_without_convolutions_is_one_line(effml):
    code, _, err = effml("train", "compressor=skeptical", "data=digits", ADVERSARY, *TINY,
                         "compressor.aux_paths=[features.1]")
    one_line_error(code, err, "compressor.aux_paths: the student's module 'features.1' has no convolution")


def test_a_skeptical_student_trains_and_ships_without_its_acs(effml, tmp_path):
    code, _, err = effml("train", "compressor=skeptical", "data=digits", *SMALL_RESNET, ADVERSARY, *TINY)
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    report = m["compressors"]["skeptical"]
    assert report["kd_at"] == "layer1" and set(report["aux_val_acc"]) == {"layer1", "layer2"}
    assert report["aux_params_removed"] > 0
    weights = torch.load(next((tmp_path / "outputs").rglob("model.pt")), weights_only=True)
    assert not any(k.startswith(AUX_ATTR) for k in weights)
    assert m["sparsity"]["params_total"] == sum(p.numel() for p in ResNet(1, 8, 4, "A", 10).parameters())
