"""Structurally sparse lottery tickets (compressors/slth.py): imp's levels with masks refilled into whole
channels, BN and biases of removed channels masked, the ticket cut out physically with the same outputs,
refill+ and the channel budget, resume after a kill, and bad input."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_resume import kill_when, stage_files, start

from conftest import metrics_of, one_line_error
from effml.compressors.base import Stage
from effml.compressors.slth import SLTHConfig, StructuredTicket
from effml.models import block_sparse as bs
from effml.models import channel_surgery as cs
from effml.models.conv import ConvNet
from effml.models.resnet import ResNet

INPUTS = {"x": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))}


def ticket(model: torch.nn.Module, **cfg) -> tuple[StructuredTicket, SimpleNamespace]:
    slth = StructuredTicket(SLTHConfig(**cfg))
    slth.attach(model)
    slth.inputs = INPUTS
    slth.plan = cs.channel_plan(model, INPUTS)  # what prepare does, without a datamodule
    return slth, SimpleNamespace(model=model)


def run_levels(slth: StructuredTicket, task, levels: int) -> None:
    for level in range(levels + 1):
        stage = Stage(f"level_{level:02d}", owner="slth")
        slth.begin_stage(stage, task)
        slth.end_stage(stage, {"test_acc": 0.5, "val_acc": 0.5, "steps": 1})
        with torch.no_grad():  # "training": new values, so the next ranking differs
            for p in task.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)


def test_masks_are_whole_channels_and_the_cut_changes_nothing():
    torch.manual_seed(0)
    model = ResNet(1, 8, 8, "A", 10)
    slth, task = ticket(model, levels=2)
    run_levels(slth, task, 2)
    keep = slth.channels_kept()
    masks = cs.slice_masks(slth.plan, keep, model)
    for name, layer in slth.layers.items():  # every mask is the outer product of kept channels
        assert torch.equal(layer.weight_mask, masks[(name, "weight")]), name
    assert not model.layer1[0].bn1.weight_mask.all()  # some BN channel is masked with its conv
    levels = slth.report()["levels"]
    assert [lv["channels_remaining"] for lv in levels] == sorted(lv["channels_remaining"] for lv in levels)[::-1]
    assert levels[-1]["channels_remaining"] < 0.9
    model.eval()
    with torch.no_grad():
        masked = model(**INPUTS)
        shrunk = slth.finalize(model, SimpleNamespace(channel_multiple=1))
        shrunk.eval()
        assert torch.allclose(shrunk(**INPUTS), masked, atol=1e-5)
    report = slth.report()
    assert report["channels_kept"] == pytest.approx(levels[-1]["channels_remaining"], abs=1e-6)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in ResNet(1, 8, 8, "A", 10).parameters())


def test_refill_keeps_the_channels_the_survivors_would_fill():
    """A single-producer group keeps round(survivors / weights per channel) channels: the most survivors."""
    torch.manual_seed(0)
    model = ConvNet((1, 8, 8), 2, 0.25, 10)  # convs 16 → 16, fully connected layers dense
    slth, task = ticket(model, levels=1)
    slth.begin_stage(Stage("level_00", owner="slth"), task)
    unstructured = super(StructuredTicket, slth)._next_masks(1)  # IMP's own masks of level 1
    survivors = {n: m for n, m in zip(slth.layers, unstructured, strict=True)}
    rows = {n: m.flatten(1).sum(1) for n, m in survivors.items()}
    slth.begin_stage(Stage("level_01", owner="slth"), task)
    keep = slth.channels_kept()
    for name in slth.layers:
        expected = round(float(survivors[name].sum()) / survivors[name][0].numel())
        assert int(keep[name].sum()) == expected, name
        assert rows[name][keep[name]].min() >= rows[name][~keep[name]].max()  # the fullest rows stay
    assert keep["fc.0"].all()  # no pruned layer makes the FC channels


def test_refill_plus_and_channel_budget():
    counts = {}
    for refill in ("refill", "refill_plus"):
        torch.manual_seed(0)
        slth, task = ticket(ConvNet((1, 8, 8), 4, 0.25, 10), levels=2, refill=refill, refill_rate=0.3)
        run_levels(slth, task, 2)
        counts[refill] = sum(int(k.sum()) for k in slth.channels_kept().values())
    assert counts["refill_plus"] > counts["refill"]
    torch.manual_seed(0)
    slth, task = ticket(ConvNet((1, 8, 8), 4, 0.25, 10), levels=2, channel_budget=0.25)
    run_levels(slth, task, 2)
    keep = slth.channels_kept()
    sizes = {n: slth.plan[n].size for n in slth.layers}
    assert sorted(set(sizes.values())) == [16, 32]
    assert all(int(keep[n].sum()) == size // 4 for n, size in sizes.items())  # 25%, at the last level


def test_rounding_to_the_channel_multiple():
    torch.manual_seed(0)
    model = ConvNet((1, 8, 8), 2, 0.25, 10)
    slth, task = ticket(model, levels=1, channel_budget=0.3)  # 5 of 16 channels
    run_levels(slth, task, 1)
    shrunk = slth.finalize(model, SimpleNamespace(channel_multiple=4))
    assert [m.out_channels for m in shrunk.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 8]
    assert {g["kept"] for g in slth.report()["groups"].values() if g["before"] == 16} == {5}


def test_regroup_finds_planted_blocks():
    """Two dense 8x8 blocks of kernels, rows and columns shuffled, a few survivors missing: the
    partitioner puts each block's rows together and refills exactly the planted blocks."""
    g = torch.Generator().manual_seed(0)
    planted = torch.zeros(16, 16, 3, 3)
    planted[:8, :8] = planted[8:, 8:] = 1
    planted = planted[torch.randperm(16, generator=g)][:, torch.randperm(16, generator=g)]
    holes = (torch.rand(planted.shape, generator=g) < 0.2).float()
    assert torch.equal(bs.regroup_mask(planted * (1 - holes), 2, 8), planted)
    blocks = bs.blocks_of(planted)
    assert sorted((len(r), len(c)) for r, c in blocks) == [(8, 8), (8, 8)]


def test_block_conv_equals_the_masked_conv():
    """Rows in no block (zero outputs), a bias, stride and padding: the block run equals the dense conv
    of the block-masked weight."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 10, 3, stride=2, padding=1, bias=True)
    mask = torch.zeros_like(conv.weight)
    mask[[0, 3, 4], :5] = 1
    mask[[1, 2, 7, 8], 4:] = 1  # rows 5, 6, 9 in no block
    with torch.no_grad():
        conv.weight.mul_(mask)
    block = bs.BlockConv2d(conv, bs.blocks_of(conv.weight))
    x = torch.randn(3, 12, 9, 9)
    assert not block.covers and len(block.weights) == 2
    assert torch.allclose(block(x), conv(x), atol=1e-6)
    assert block.block_weights() == int(mask.sum())


def test_regroup_masks_are_dense_blocks_and_the_block_model_changes_nothing():
    torch.manual_seed(0)
    model = ResNet(1, 8, 16, "A", 10)  # convs of 16, 32 and 64 channels
    slth, task = ticket(model, levels=2, refill="regroup", regroup_blocks=2, block_multiple=8)
    run_levels(slth, task, 2)
    for name, layer in slth.layers.items():
        mask = layer.weight_mask
        blocks = bs.blocks_of(mask)
        rows = torch.cat([r for r, _ in blocks])
        assert len(rows) == len(set(rows.tolist())) and len(blocks) <= 2, name  # disjoint row groups
        for r, c in blocks:  # dense inside, and nothing outside: the blocks hold every survivor
            assert mask[r][:, c].all(), name
            if layer.in_channels >= 8:
                assert len(c) % 8 == 0, name
            if layer.out_channels >= 16:
                assert len(r) % 8 == 0, name
        assert sum(len(r) * len(c) for r, c in blocks) * 9 == int(mask.sum()), name
    remaining = slth.report()["levels"][-1]["weights_remaining"]
    assert 0.45 < remaining < 0.8  # about IMP's 0.8^2 = 0.64 of the weights: blocks sized by the survivors
    model.eval()
    with torch.no_grad():
        masked = model(**INPUTS)
        blocked = slth.finalize(model, SimpleNamespace(channel_multiple=1))
        blocked.eval()
        assert torch.allclose(blocked(**INPUTS), masked, atol=1e-5)
    assert all(isinstance(blocked.get_submodule(n), bs.BlockConv2d) for n in slth.layers)
    report = slth.report()
    assert report["block_density"] == pytest.approx(remaining, abs=0.02)  # channels cut: of the shrunk convs
    assert StructuredTicket.effect("slth", {"compressors": {"slth": report}, "stages": [
        {"owner": "slth"}] * 3}) is None


@pytest.mark.e2e  # CLI runs of seconds
@pytest.mark.parametrize("override, message", [
    ("compressor.channel_budget=0", "compressor.channel_budget must be in (0, 1]; got 0"),
    ("compressor.channel_budget=1.5", "compressor.channel_budget must be in (0, 1]; got 1.5"),
    ("compressor.refill_rate=1", "compressor.refill_rate must be in [0, 1)"),
    ("compressor.control=reinit", "compressor slth finds its own ticket"),
    ("model=lenet_300_100", "compressor slth found no ['Conv2d'] layers"),
    ("compressor.regroup_blocks=0", "compressor.regroup_blocks must be at least 1; got 0"),
    ("compressor.block_multiple=0", "compressor.block_multiple must be at least 1; got 0"),
    ("compressor.refill=regroup compressor.channel_budget=0.5", "compressor.channel_budget is Refill's"),
])
def test_bad_input_is_one_line(effml, tmp_path, override, message):
    code, _, err = effml("train", "recipe=slth_resnet", *override.split())
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()  # nothing written


@pytest.mark.slow  # about a minute on 2 CPUs: make test-slow
@pytest.mark.parametrize("refill", ["refill", "regroup"])
def test_kill_mid_level_then_rerun_is_exact(tmp_path, refill):
    args = ["train", "recipe=slth_resnet", "model.depth=8", "model.width=8", "compressor.levels=2", f"compressor.refill={refill}",
            "trainer.max_epochs=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "trainer.progress_bar=off", "measure.enabled=false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert start(straight, [], args).wait(timeout=600) == 0
    kill_when(start(killed, [], args), "outputs/*/*/*/stages/02_level_02/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("metrics.json"))
    assert start(killed, [], args).wait(timeout=600) == 0
    assert stage_files(straight) == stage_files(killed)  # every end.pt and model.pt, byte for byte
    a, b = metrics_of(straight), metrics_of(killed)
    assert a["compressors"]["slth"] == b["compressors"]["slth"] and a["test_acc"] == b["test_acc"]


def test_masked_copy_is_deepcopyable_after_attach():
    """channel_plan copies a model whose masks are attached (a cached product is a graph node)."""
    model = ResNet(1, 8, 8, "B", 10)
    slth, _ = ticket(model, levels=1)
    copy.deepcopy(model)
    assert slth.plan.widths()
