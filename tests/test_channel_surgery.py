"""Physical channel removal (effml/models/channel_surgery.py, Torch-Pruning's DepGraph): on every conv
model family the shrunk model computes what the model with the removed channels zeroed computes, every
dependent layer has the right shape, and kept widths round up to the hardware's channel multiple."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from effml.errors import EffmlError
from effml.models import channel_surgery as cs
from effml.models.conv import ConvNet
from effml.models.lenet import LeNet
from effml.models.resnet import ResNet


def randomize_norms(model: nn.Module) -> nn.Module:
    """BN with non-trivial statistics and affine parameters, so a channel that is not truly zero shows."""
    generator = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
    return model.eval()


MODELS = {
    "resnet20_A": lambda: (ResNet(1, 20, 16, "A", 10), (1, 8, 8)),
    "resnet8_B": lambda: (ResNet(1, 8, 8, "B", 10), (1, 8, 8)),
    "conv2": lambda: (ConvNet((1, 8, 8), 2, 0.25, 10), (1, 8, 8)),
    "conv4": lambda: (ConvNet((1, 8, 8), 4, 0.25, 10), (1, 8, 8)),
    "conv6": lambda: (ConvNet((1, 8, 8), 6, 0.25, 10), (1, 8, 8)),
    "lenet": lambda: (LeNet(64, [30, 10], 10), (1, 8, 8)),
}


def random_keep(plan: cs.ChannelPlan, fraction: float, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.size, generator=generator) > fraction for g in plan.groups}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("multiple", [1, 4])
def test_shrunk_equals_zeroed(name, multiple):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model = randomize_norms(model)
    inputs = {"x": torch.randn(3, *shape)}
    plan = cs.channel_plan(model, inputs)
    keep = random_keep(plan, 0.4)
    zeroed = cs.zero_channels(copy.deepcopy(model), plan, keep)
    shrunk, widths = cs.remove_channels(zeroed, inputs, keep, multiple, plan=plan)
    assert torch.allclose(shrunk(**inputs), zeroed(**inputs), atol=1e-5)
    assert shrunk(**inputs).shape == model(**inputs).shape  # the classes stay
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    for group, w in widths.items():
        assert w["kept"] <= w["after"] <= w["before"]
        assert w["after"] % multiple == 0 or w["after"] == w["before"], (group, w)
    # every producing layer of a group has the group's new width, every reader its inputs
    modules = dict(shrunk.named_modules())
    for group in plan.groups:
        root = modules[group.name]
        width = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        assert width == widths[group.name]["after"]


def test_untouched_model_and_full_keep():
    model, shape = MODELS["resnet20_A"]()
    inputs = {"x": torch.randn(2, *shape)}
    before = copy.deepcopy(model.state_dict())
    plan = cs.channel_plan(model, inputs)
    shrunk, widths = cs.remove_channels(model, inputs, {}, 1, plan=plan)  # nothing removed
    assert all(w["after"] == w["before"] for w in widths.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    model.eval(), shrunk.eval()
    assert torch.allclose(shrunk(**inputs), model(**inputs), atol=1e-6)


def test_resnet_groups_follow_residuals():
    """ResNet-20: a stage's stream (the stem or the first block's conv2, and every conv2 of the stage)
    is one group; each block's inner conv is a group of its own; the classifier is in no group's producers."""
    model, shape = MODELS["resnet20_A"]()
    plan = cs.channel_plan(model, {"x": torch.randn(2, *shape)})
    assert plan.widths() == {"conv1": 16, "layer1.0.conv1": 16, "layer1.1.conv1": 16, "layer1.2.conv1": 16,
                             "layer2.0.conv2": 32, "layer2.0.conv1": 32, "layer2.1.conv1": 32, "layer2.2.conv1": 32,
                             "layer3.0.conv2": 64, "layer3.0.conv1": 64, "layer3.1.conv1": 64, "layer3.2.conv1": 64}
    stream = {m.module for m in plan["layer2.0.conv2"].producers}
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2", "layer2.2.bn2"} <= stream
    assert any(m.module == "classifier" and m.kind == "in" for m in plan["layer3.0.conv2"].members)
    assert len(plan.links) == 2  # the two zero-padding shortcuts


def test_option_a_keeps_channels_its_shortcut_feeds():
    """Removing all of stage 2's stream keeps the 16 channels the padded shortcut fills from stage 1."""
    model, shape = MODELS["resnet20_A"]()
    plan = cs.channel_plan(model, {"x": torch.randn(2, *shape)})
    keep = plan.close({"layer2.0.conv2": torch.zeros(32, dtype=torch.bool)})
    assert keep["layer2.0.conv2"].tolist() == [False] * 8 + [True] * 16 + [False] * 8
    stem_gone = plan.close({"conv1": torch.zeros(16, dtype=torch.bool), "layer2.0.conv2": torch.zeros(32, dtype=torch.bool)})
    assert not stem_gone["layer2.0.conv2"].any()


def test_rounding_brings_back_best_scored():
    model, shape = MODELS["conv2"]()
    plan = cs.channel_plan(model, {"x": torch.randn(2, *shape)})
    group = plan.groups[-1].name
    keep = {group: torch.tensor([True, False, False, False] * (plan[group].size // 4))}
    scores = {group: torch.arange(plan[group].size, dtype=torch.float)}
    kept = cs.rounded_keep(plan, keep, 8, scores)[group]
    assert int(kept.sum()) == 8 and kept[-4:].all()  # the two highest-scored removed ones came back


def test_refusals():
    classifier_only = nn.Sequential()
    classifier_only.add_module("flatten", nn.Flatten())
    classifier_only.add_module("classifier", nn.Linear(64, 10))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = classifier_only

        def forward(self, x):
            return self.net(x)

    with pytest.raises(EffmlError, match="no conv or linear layer outside the output layer"):
        cs.channel_plan(Wrapped(), {"x": torch.randn(2, 1, 8, 8)})
    model, shape = MODELS["conv2"]()
    with pytest.raises(EffmlError, match="no channel group named nope"):
        cs.remove_channels(model, {"x": torch.randn(2, *shape)}, {"nope": torch.ones(3)})
