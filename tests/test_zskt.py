"""Zero-shot KT: the losses against hand computation, the generator's shapes, and a data-free run that
never touches the training split and resumes exactly after a stop at an epoch boundary."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import metrics_of, one_line_error
from effml.compressors.zskt import (
    Generator,
    PlaceholderBatches,
    ZeroShotKT,
    ZSKTConfig,
    attention_loss,
    attention_map,
    belief_kl,
)
from effml.errors import EffmlError

# Tiny ResNets on 8x8 digits: a ResNet-8 teacher trained in the run's first stage, a narrower student.
TINY_ZSKT = [
    "compressor=zskt", "data=digits", "model=resnet20", "model.depth=8", "model.width=4",
    "compressor.teacher.model={name:resnet,depth:8,width:8}", "compressor.teacher.epochs=1",
    "compressor.iterations_per_epoch=6", "compressor.student_steps=3", "compressor.batch_size=16",
    "compressor.generator_width=16", "compressor.z_dim=8", "data.batch_size=64", "data.train_subset=256",
    "trainer.max_epochs=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
    "trainer.progress_bar=off", "measure.enabled=false",
]


# -- losses ------------------------------------------------------------------------------------
def test_attention_loss_matches_hand_computation():
    # student: uniform activity → map (1,1,1,1)/2; teacher: all on position 0 → map (1,0,0,0)
    student = torch.ones(1, 1, 2, 2)
    teacher = torch.zeros(1, 1, 2, 2)
    teacher[0, 0, 0, 0] = 3.0
    assert torch.allclose(attention_map(student), torch.full((1, 4), 0.5))
    assert torch.allclose(attention_map(teacher), torch.tensor([[1.0, 0, 0, 0]]))
    # differences (-0.5, 0.5, 0.5, 0.5): squares 0.25, mean 0.25; two matched groups add
    assert attention_loss([student, student], [teacher, teacher]).item() == pytest.approx(0.5)


def test_attention_map_averages_squares_over_channels():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2 channels, 1, 2)
    mean_square = torch.tensor([(1 + 9) / 2, (4 + 0) / 2])
    assert torch.allclose(attention_map(f)[0], mean_square / mean_square.norm())
    assert attention_loss([f], [3 * f]).item() == pytest.approx(0.0, abs=1e-7)  # scale-free


def test_belief_kl_is_teacher_to_student_kl_and_mean_divides_by_classes():
    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    p, q = t.softmax(-1)[0], s.softmax(-1)[0]
    by_hand = sum(p[i] * math.log(p[i] / q[i]) for i in range(3))
    assert belief_kl(s, t, 1.0, "batchmean").item() == pytest.approx(float(by_hand), rel=1e-5)
    assert belief_kl(s, t, 1.0, "mean").item() == pytest.approx(float(by_hand) / 3, rel=1e-5)
    two = torch.cat([s, s]), torch.cat([t, t])
    assert belief_kl(*two, 1.0, "batchmean").item() == pytest.approx(float(by_hand), rel=1e-5)  # per example


# -- generator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32), (1, 7, 9)])
def test_generator_makes_the_data_shape_standardized(shape):
    torch.manual_seed(0)
    x = Generator(10, shape, width=8)(torch.randn(16, 10))
    assert x.shape == (16, *shape)
    per_channel = x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(shape[0]), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(shape[0]), atol=1e-3)


def test_placeholder_batches_are_zeros_of_the_input_shape():
    batches = PlaceholderBatches(3, 5, (1, 8, 8))
    assert len(batches) == 3
    b = batches[0]
    assert b["x"].shape == (5, 1, 8, 8) and not b["x"].any() and b["labels"].shape == (5,)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Conv2d(1, 4, 3, padding=1)
        self.classifier = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.classifier(torch.relu(self.layer1(x)).flatten(1))


def test_generator_step_moves_only_the_generator_and_ascends_the_kl():
    torch.manual_seed(0)
    student, teacher = Net(), Net().requires_grad_(False)
    z = ZeroShotKT(ZSKTConfig(z_dim=8, batch_size=32, generator_width=8, attention_layers=["layer1"]))
    z.teacher_module = teacher
    z.generator = Generator(8, (1, 8, 8), width=8)
    z.optimizer = torch.optim.Adam(z.generator.parameters(), lr=1e-2)
    noise = torch.randn(32, 8)
    before = {k: v.clone() for k, v in z.generator.state_dict().items()}
    kls = []
    for _ in range(5):
        z.generator_step(student, noise, lr=1e-2)
        kls.append(z.last_generator_kl)
    assert all(p.grad is None for p in student.parameters())  # the student's step is the task's
    assert any(not torch.equal(before[k], v) for k, v in z.generator.state_dict().items())
    assert kls[-1] > kls[0]  # the generator seeks disagreement
    assert z.generator_updates == 5


def test_cosine_generator_schedule():
    z = ZeroShotKT(ZSKTConfig())
    assert z.generator_lr(0, 100) == pytest.approx(1e-3)
    assert z.generator_lr(50, 100) == pytest.approx(5e-4)
    assert z.generator_lr(100, 100) == pytest.approx(0.0)


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value", [("student_steps", 0), ("generator_steps", 0), ("beta", -1.0), ("generator_lr", 0.0),
                     ("kl_reduction", "sum"), ("generator_schedule", "step"), ("iterations_per_epoch", 0),
                     ("attention_layers", [])],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        ZSKTConfig(**{field: value})


def test_bad_value_is_one_line(effml):
    one_line_error(*effml("train", "compressor=zskt", "compressor.student_steps=0")[::2], "compressor.student_steps")


def test_missing_attention_layer_is_one_line(effml):
    code, _, err = effml("train", *TINY_ZSKT, "compressor.attention_layers=[layer4]")
    one_line_error(code, err, "no module 'layer4'")


# -- a data-free run ---------------------------------------------------------------------------
class Guard:
    """Counts every use of the training split; raises once the student's (data-free) stage began."""

    def __init__(self):
        self.armed, self.teacher_reads, self.student_batches = False, 0, []

    def touch(self):
        if self.armed:
            raise AssertionError("the datamodule's training split was used in the data-free stage")
        self.teacher_reads += 1


class GuardedSplit(torch.utils.data.Dataset):
    def __init__(self, dataset, guard):
        self.dataset, self.guard = dataset, guard

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.guard.touch()
        return self.dataset[i]


@pytest.fixture
def guard(monkeypatch):
    from effml.data._base import EffmlDataModule
    from effml.data.images import ImageDataModule
    from effml.task import ClassificationTask

    guard = Guard()
    load, loader, begin, step = (ImageDataModule.load, EffmlDataModule.train_dataloader, ZeroShotKT.begin_stage,
                                 ClassificationTask.training_step)

    def guarded_load(self):
        splits, info = load(self)
        return {**splits, "train": GuardedSplit(splits["train"], guard)}, info

    def guarded_loader(self):
        guard.touch()
        return loader(self)

    def arming_begin(self, stage, task):
        guard.armed = stage.role != "prepare"
        return begin(self, stage, task)

    def seeing_step(self, batch, batch_idx):
        if guard.armed:
            guard.student_batches.append(float(batch["x"].abs().sum()))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ImageDataModule, "load", guarded_load)
    monkeypatch.setattr(EffmlDataModule, "train_dataloader", guarded_loader)
    monkeypatch.setattr(ZeroShotKT, "begin_stage", arming_begin)
    monkeypatch.setattr(ClassificationTask, "training_step", seeing_step)
    return guard


def final_state(root):
    run_dir = metrics_of(root)["run_dir"]
    return torch.load(sorted((root / run_dir / "stages").glob("*/end.pt"))[-1], weights_only=True)


def test_data_free_run_never_reads_training_data_and_resumes_exactly(effml, tmp_path, monkeypatch, guard):
    from effml.checkpoints import LastCheckpoint

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    monkeypatch.chdir(straight)
    code, _, err = effml("train", *TINY_ZSKT)
    assert code == 0, err
    assert guard.teacher_reads > 0  # the guard is live: the teacher's stage did read the data ...
    assert len(guard.student_batches) == 12 and all(s > 0 for s in guard.student_batches)  # ... G(z), not zeros
    m = metrics_of(straight)
    assert m["compressors"]["zskt"]["generator_updates"] == 4  # 12 batches, one update every 3
    assert m["compressors"]["zskt"]["student_batches"] == 12

    # the same run, stopped after the student's first epoch (its last.ckpt written), then rerun
    save = LastCheckpoint.on_train_epoch_end

    def stop_after_first_epoch(self, trainer, pl_module):
        save(self, trainer, pl_module)
        if guard.armed and trainer.current_epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.chdir(stopped)
    monkeypatch.setattr(LastCheckpoint, "on_train_epoch_end", stop_after_first_epoch)
    code, _, _ = effml("train", *TINY_ZSKT)
    assert code != 0 and not list(stopped.rglob("metrics.json"))
    monkeypatch.setattr(LastCheckpoint, "on_train_epoch_end", save)
    code, _, err = effml("train", *TINY_ZSKT)
    assert code == 0, err

    a, b = final_state(straight), final_state(stopped)
    gen_a, gen_b = a["compressors"]["compressor/zskt"], b["compressors"]["compressor/zskt"]
    assert gen_a["generator_updates"] == gen_b["generator_updates"] == 4
    assert all(torch.equal(gen_a["generator"][k], gen_b["generator"][k]) for k in gen_a["generator"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert metrics_of(straight)["test_acc"] == metrics_of(stopped)["test_acc"]


def test_kl_reduction_scales_like_the_authors():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    elementwise = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="mean")  # PyTorch 1.0's default
    assert belief_kl(s, t, 1.0, "mean").item() == pytest.approx(elementwise.item(), rel=1e-5)
