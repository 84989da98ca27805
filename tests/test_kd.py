"""Knowledge distillation (Hinton et al. 2015), teachers from every source, and KD composed with pruning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_resume import kill_when, start

from conftest import TINY, Linear, metrics_of, one_line_error, train_in
from effml.compressors._distill import soft_kl
from effml.compressors.kd import KDConfig, KnowledgeDistillation
from effml.config import TrainerConfig
from effml.task import ClassificationTask
from effml.teachers import FeatureTap, fold_masks

DIGITS = ["data=digits", *TINY]
TEACHER = "compressor.teacher.model={name:lenet_300_100,hidden:[256,128]}"


# -- the loss, by hand ---------------------------------------------------------------------------
def test_soft_kl_is_hintons_t_squared_scaled_kl():
    student, teacher = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[3.0, 0.0, 1.0]])
    t = 4.0
    p = torch.softmax(teacher / t, -1)
    by_hand = (p * (p.log() - torch.log_softmax(student / t, -1))).sum() * t * t
    assert soft_kl(student, teacher, t) == pytest.approx(by_hand.item(), rel=1e-6)
    assert soft_kl(teacher, teacher, t) == pytest.approx(0.0, abs=1e-7)


def test_the_task_adds_alpha_soft_to_one_minus_alpha_hard():
    student, teacher = Linear(0), Linear(1)
    kd = KnowledgeDistillation(KDConfig(alpha=0.7, temperature=2.0))
    kd.teacher_module = teacher
    from effml.teachers import Teacher

    kd.teacher = Teacher(teacher)
    task = ClassificationTask(student, TrainerConfig(), [kd])
    batch = {"x": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 0, 1])}
    with pytest.warns(Warning):  # self.log outside a Trainer
        loss = task.training_step(batch, 0)
    logits = student(batch["x"])
    expected = 0.3 * F.cross_entropy(logits, batch["labels"]) + 0.7 * soft_kl(logits, teacher(batch["x"]), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(p.grad is None for p in teacher.parameters())  # frozen: no_grad, never trained


def test_feature_taps_capture_and_are_removed():
    model = Linear(0)
    with FeatureTap(model, ["classifier"]) as tap:
        out = model(torch.randn(2, 4))
        assert torch.equal(tap.features["classifier"], out)
    assert not model.classifier._forward_hooks


def test_masks_fold_into_plain_weights():
    state = {"a.weight_orig": torch.ones(2, 2), "a.weight_mask": torch.eye(2), "a.bias": torch.zeros(2)}
    assert set(fold_masks(state)) == {"a.weight", "a.bias"}
    assert torch.equal(fold_masks(state)["a.weight"], torch.eye(2))


# -- teachers from every source ------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A finished wide LeNet on digits: outputs/dense_lenet/<hash>/seed_0 in its own directory."""
    outputs = train_in(tmp_path_factory.mktemp("teacher"), "recipe=dense_lenet", "model.hidden=[256,128]", *DIGITS)
    return next(outputs.rglob("metrics.json")).parent


def with_teacher(tmp_path: Path, teacher_run: Path) -> Path:
    shutil.copytree(teacher_run.parents[2], tmp_path / "outputs", dirs_exist_ok=True)
    return next((tmp_path / "outputs").rglob("model.pt")).parent


def test_teacher_from_a_run_directory_teaches_and_is_the_speed_reference(effml, tmp_path, teacher_run):
    run_dir = with_teacher(tmp_path, teacher_run)
    code, out, err = effml("train", "compressor=kd", "compressor.teacher.source=run",
                           f"compressor.teacher.path={run_dir}", *DIGITS)
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs" / "custom")
    assert m["speed_reference"] == "teacher" and "teacher" in out
    teacher_params = m["compressors"]["kd"]["teacher_params"]
    assert teacher_params == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert m["speed"]["dense"]["params"] == teacher_params  # timed against the teacher, not itself
    assert [s["name"] for s in m["stages"]] == ["train"] and m["test_acc"] > 0.5


def test_teacher_by_recipe_and_by_checkpoint_give_the_same_logits(tmp_path, teacher_run):
    from effml.data.images import Digits, DigitsConfig
    from effml.teachers import TeacherConfig, build_teacher

    run_dir = with_teacher(tmp_path, teacher_run)
    data = Digits(DigitsConfig())
    by_recipe = build_teacher(TeacherConfig(source="recipe", recipe="dense_lenet"), data, tmp_path / "outputs")
    ckpt = next(run_dir.glob("stages/*/end.pt"))
    by_checkpoint = build_teacher(
        TeacherConfig(source="checkpoint", path=str(ckpt), model={"name": "lenet_300_100", "hidden": [256, 128]}),
        data,
    )
    x = data.example_inputs(8)["x"]
    assert torch.equal(by_recipe(x=x), by_checkpoint(x=x))
    assert not any(p.requires_grad for p in by_recipe.parameters()) and not by_recipe.training


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compressor.teacher.source=run", "compressor.teacher.path=nowhere"], "teacher run nowhere not found"),
        (["compressor.teacher.source=recipe", "compressor.teacher.recipe=dense_lenet"],
         "no finished run of recipe dense_lenet (seed 0)"),
        (["compressor.temperature=0", TEACHER], "compressor.temperature must be > 0"),
        (["compressor.alpha=1.5", TEACHER], "compressor.alpha must be in [0, 1]"),
        (["compressor.teacher.source=stage"], "compressor.teacher.model needs the teacher's architecture"),
        (["compressor.teacher.source=martian"], "compressor.teacher.source must be one of"),
    ],
)
def test_bad_teachers_are_one_line_errors(effml, tmp_path, overrides, message):
    code, _, err = effml("train", "compressor=kd", *overrides, *DIGITS)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


def test_a_teacher_with_another_number_of_classes_is_refused(effml, tmp_path):
    from effml.models.lenet import LeNet

    torch.save(LeNet(64, [32], 3).state_dict(), tmp_path / "three_classes.pt")
    code, _, err = effml("train", "compressor=kd", "compressor.teacher.source=checkpoint",
                         f"compressor.teacher.path={tmp_path / 'three_classes.pt'}",
                         "compressor.teacher.model={name:lenet_300_100,hidden:[32]}", *DIGITS)
    one_line_error(code, err, "classifier.weight is (3, 32), the model's is (10, 32)")


def test_an_encoder_without_a_trained_head_cannot_give_logits(effml, tmp_path):
    code, _, err = effml("train", "compressor=kd", "compressor.teacher.source=hf", "compressor.teacher.path=minilm_l6",
                         "model=minilm_l6", "data=rotten_tomatoes", *TINY)
    one_line_error(code, err, "teacher minilm_l6 has no trained classification head")
    assert not (tmp_path / "outputs").exists()


# -- KD composed with pruning, resumed after kills -----------------------------------------------
COMPOSED = ["train", "recipe=magnitude_lenet", "+compressor@compose.kd=kd", "compose.kd.alpha=0.5",
            "compose.kd.teacher.model={name:lenet_300_100,hidden:[256,128]}", "compose.kd.teacher.epochs=2",
            "compressor.frequency=5", "compressor.sparsity=0.8", "data=digits", "data.batch_size=64",
            "trainer.max_epochs=3", "trainer.progress_bar=off", "measure.enabled=false"]


def finish_composed(cwd: Path) -> dict:
    process = start(cwd, [], run=COMPOSED)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return json.loads(next(cwd.rglob("metrics.json")).read_text())


@pytest.mark.e2e
def test_prune_while_distilling_resumes_exactly_after_kills_in_both_stages(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    reference = finish_composed(straight)
    # the teacher trains first (a prepare stage), then ONE student stage prunes and distils at once
    assert [s["name"] for s in reference["stages"]] == ["teacher", "train"]
    assert set(reference["compressors"]) == {"magnitude", "kd"}
    assert reference["compressors"]["magnitude"]["achieved_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert reference["stages"][0]["teacher_params"] == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    logged = (next(straight.rglob("01_train/metrics.csv"))).read_text()
    assert "train/loss_kd" in logged  # the KD term is in the pruned student's loss

    for marker in ("00_teacher/checkpoints/last.ckpt", "01_train/checkpoints/last.ckpt"):
        kill_when(start(killed, [], run=COMPOSED), f"outputs/*/*/*/stages/{marker}", killed)
        assert not list(killed.rglob("metrics.json"))
    resumed = finish_composed(killed)

    a = torch.load(next(straight.rglob("model.pt")), weights_only=True)
    b = torch.load(next(killed.rglob("model.pt")), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    for key in ("test_acc", "val_acc", "sparsity"):
        assert reference[key] == resumed[key], key
    assert [s["test_acc"] for s in reference["stages"]] == [s["test_acc"] for s in resumed["stages"]]


# -- how composed stages line up -----------------------------------------------------------------
class Declares:
    """A compressor that only declares stages."""

    def __init__(self, *stages):
        self._stages = stages

    def stages(self):
        return list(self._stages)


def test_stages_line_up_by_role():
    from effml.compressors.base import Stage
    from effml.runner import stage_plan

    teacher = Stage("teacher", owner="kd", role="prepare")
    student = Stage("train", owner="kd", role="plain")
    pruning = [Stage("train", owner="magnitude"), Stage("finetune", owner="magnitude")]
    # the teacher first, then the pruner's stages; KD's plain student stage is not run twice
    assert stage_plan([Declares(*pruning), Declares(teacher, student)]) == [teacher, *pruning]
    # alone, KD trains its teacher and then its student; two plain stages of one name are one
    assert stage_plan([Declares(teacher, student)]) == [teacher, student]
    assert [s.label for s in stage_plan([Declares(Stage("train", role="plain")), Declares(student)])] == ["train"]


def test_a_compressor_composed_twice_is_a_one_line_error(effml, tmp_path):
    code, _, err = effml("train", "compressor=kd", TEACHER, "+compressor@compose.again=kd", *DIGITS)
    one_line_error(code, err, "compressor kd appears twice")
    assert not (tmp_path / "outputs").exists()
