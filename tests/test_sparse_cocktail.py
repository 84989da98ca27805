"""Sparse Cocktail (compressors/sparse_cocktail.py): the masks of each pattern nest across ratios (Unified
Mask Generation), N:M masks hold the pattern, the dense pivot alternates with the round's subnetworks,
the extracted subnetworks (channels cut out) compute what the masked model computes, the run reports
every subnetwork, and bad ratios are one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import metrics_of, one_line_error
from effml.compressors.nm_sparsity import groups
from effml.compressors.sparse_cocktail import SparseCocktail, SparseCocktailConfig, mix, subnet_key
from effml.models import channel_surgery as cs
from effml.models.resnet import ResNet

INPUTS = {"x": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))}
RATIOS = dict(unstructured_ratios=[0.5, 0.75], channel_ratios=[0.25, 0.5], nm_ratios=[0.5, 0.75], m=4)


def cocktail(**cfg) -> tuple[SparseCocktail, torch.nn.Module]:
    torch.manual_seed(0)
    model = ResNet(1, 8, 8, "A", 10)
    c = SparseCocktail(SparseCocktailConfig(**(RATIOS | cfg)))
    c.attach(model)
    c.inputs = INPUTS
    c.plan = cs.channel_plan(model, INPUTS)  # what prepare does, without a datamodule
    return c, model


def run_rounds(c: SparseCocktail, model: torch.nn.Module) -> None:
    """Every stage's begin and end, the weights moved in between as training would."""
    for stage in c.stages():
        c.begin_stage(stage, SimpleNamespace(model=model))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        c.end_stage(stage, {"steps": 3, "time_s": 0.1})


def test_masks_nest_across_ratios_and_reach_them():
    c, model = cocktail()
    run_rounds(c, model)
    low, high = c.masks["unstructured_50"], c.masks["unstructured_75"]
    assert all(torch.equal(high[k] & low[k], high[k]) for k in low)  # 75% ⊂ 50%
    total = sum(m.numel() for m in low.values())
    assert sum(int(m.sum()) for m in low.values()) == total - round(0.5 * total)
    assert sum(int(m.sum()) for m in high.values()) == total - round(0.75 * total)
    low, high = c.masks["nm_50"], c.masks["nm_75"]
    assert all(torch.equal(high[k] & low[k], high[k]) for k in low)  # 1:4 ⊂ 2:4
    low, high = c.keeps["channel_25"], c.keeps["channel_50"]
    assert all(torch.equal(high[g] & low[g], high[g]) for g in low)
    assert sum(int(k.sum()) for k in high.values()) < sum(int(k.sum()) for k in low.values())
    # nested although the second round's ranking ran on other weights than the first's
    assert len(c.round_weights) == 2 and c.rewind_weights is not None


def test_nm_masks_keep_exactly_n_of_every_m():
    c, model = cocktail()
    run_rounds(c, model)
    assert c.nm_layers and "conv1" not in c.nm_layers  # one input channel: no whole group of 4
    for key, n in (("nm_50", 2), ("nm_75", 1)):
        for name, mask in c.masks[key].items():
            assert (groups(mask.float(), 4).sum(1) == n).all(), (key, name)


def test_extracted_subnetworks_compute_what_the_masked_model_computes():
    c, model = cocktail()
    run_rounds(c, model)
    with torch.no_grad():  # BN statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    model.eval()
    dense_params = sum(p.numel() for p in c._plain(model).parameters())
    for key in ("unstructured_75", "nm_75", "channel_25", "channel_50"):
        c.use(key)
        with torch.no_grad():
            masked = model(**INPUTS)
            subnet = c.extract(key).eval()
            assert torch.allclose(subnet(**INPUTS), masked, atol=1e-5), key
        assert not hasattr(subnet.conv1, "weight_orig")  # a plain model
        if key.startswith("channel"):  # physically smaller
            assert sum(p.numel() for p in subnet.parameters()) < dense_params
    assert c.active == "channel_50"  # extraction leaves the model as it was


def test_dense_pivot_alternates_with_the_round_subnetworks():
    c, model = cocktail()
    stages = c.stages()
    assert [s.key for s in stages] == ["dense", "round_00", "round_01"]
    c.begin_stage(stages[0], SimpleNamespace(model=model))
    c.end_stage(stages[0], {"steps": 1, "time_s": 0.1})
    c.begin_stage(stages[1], SimpleNamespace(model=model))
    seen = []
    for step in range(8):
        c.on_train_batch_start(SimpleNamespace(global_step=step), None, None, step)
        seen.append(c.active)
    assert seen == ["dense", "unstructured_50", "dense", "channel_25", "dense", "nm_50", "dense", "unstructured_50"]
    assert not model.conv1.weight_mask.all() or not model.layer1[0].conv1.weight_mask.all()  # a sparse mask is on
    c.cfg.dense_pivot = False
    c.on_train_batch_start(SimpleNamespace(global_step=1), None, None, 1)
    assert c.active == "channel_25"


@pytest.mark.parametrize("cfg, message", [
    ({"nm_ratios": [0.5, 1.0]}, "compressor.nm_ratios must be ratios in (0, 1)"),
    ({"alphas": [1.5]}, "compressor.alphas must be weights in [0, 1]"),
    ({"round_epochs": 0}, "compressor.round_epochs must be >= 1"),
    ({"patterns": ["channel"], "channel_ratios": [0.5, 0.4]}, "compressor.channel_ratios must be increasing"),
])
def test_config_refuses_bad_values_naming_the_field(cfg, message):
    from effml.errors import EffmlError

    with pytest.raises(EffmlError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SparseCocktailConfig(**(RATIOS | cfg))
    SparseCocktailConfig(**(RATIOS | {"patterns": ["unstructured"], "channel_ratios": [0.5, 0.4]}))  # unused: ignored


def test_interpolation_mixes_floats_and_keeps_counts():
    a = {"w": torch.ones(2), "n": torch.tensor(3)}
    b = {"w": torch.zeros(2), "n": torch.tensor(5)}
    out = mix(a, b, 0.25)
    assert torch.allclose(out["w"], torch.full((2,), 0.25)) and int(out["n"]) == 5
    assert subnet_key("nm", 0.875) == "nm_87p5" and subnet_key("channel", 0.5) == "channel_50"


@pytest.mark.e2e  # CLI runs of seconds
@pytest.mark.parametrize("override, message", [
    ("compressor.channel_ratios=[0.5,0.25]", "compressor.channel_ratios must be increasing"),
    ("compressor.unstructured_ratios=[0.5,0.5]", "compressor.unstructured_ratios must be increasing"),
    ("compressor.nm_ratios=[0.3]", "compressor.nm_ratios: 0.3 is not 1 - N/4"),
    ("compressor.patterns=[unstructured,blocks]", "compressor.patterns must be distinct names"),
])
def test_bad_input_is_one_line(effml, tmp_path, override, message):
    code, _, err = effml("train", "recipe=sparse_cocktail_resnet", override)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()  # nothing written


@pytest.mark.e2e
def test_run_reports_every_subnetwork_and_the_cost(effml, tmp_path):
    code, out, err = effml("train", "recipe=sparse_cocktail_resnet", "model.depth=8", "model.width=8",
                           "compressor.dense_epochs=1", "compressor.round_epochs=1", "compressor.recalibration_batches=2",
                           "data.train_subset=256", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                           "trainer.progress_bar=off", "measure.iters=2", "measure.min_time_s=0", "measure.batch_size=8")
    assert code == 0, err
    report = metrics_of(tmp_path)["compressors"]["sparse_cocktail"]
    assert set(report["subnets"]) == {"unstructured_50", "unstructured_75", "channel_25", "channel_50", "nm_50", "nm_75"}
    for s in report["subnets"].values():
        assert 0 <= s["test_acc"] <= 1 and s["speed"]["compressed"]["latency_ms"] > 0
        if s["pattern"] != "channel":
            assert s["layer_sparsity"] == pytest.approx(s["ratio"], abs=0.01)
    assert report["subnets"]["channel_50"]["flops"]["compressed"] < report["subnets"]["channel_25"]["flops"]["compressed"]
    assert report["subnets"]["nm_75"]["groups_over_n"] == 0
    cost = report["training_cost"]
    assert [s["stage"] for s in cost["stages"]] == ["dense", "round_00", "round_01"] and cost["steps"] > 0
    assert len(report["interpolation_steps"]) == 1
    artifact = torch.load(next(tmp_path.rglob("cocktail.pt")), weights_only=True)
    assert set(artifact["masks"]) == {"unstructured_50", "unstructured_75", "nm_50", "nm_75"}


def test_table_reads_each_subnetwork_of_the_one_run_as_its_own_series():
    from effml.tables import read_points
    from effml.tables.spec import find_table

    spec = find_table("sparse_cocktail")
    subnet = {"test_acc": 0.9, "train_time_s": 30.0, "speed": {"compressed": {"latency_ms": 2.0}},
              "flops": {"compressed": 1e6}}
    metrics = {"test_acc": 0.5, "compressors": {"sparse_cocktail": {"subnets": {"channel_50": subnet}}}}
    (point,) = read_points(spec, "cocktail_channel_50", 0, metrics)
    assert point.y == pytest.approx(90.0) and dict(point.also)["speed.compressed.latency_ms"] == 2.0
    (point,) = read_points(spec, "dedicated_channel_50", 0, metrics | {"train_time_s": 10.0})
    assert point.y == pytest.approx(50.0)  # a dedicated run is one point: its own metrics
    with pytest.raises(ValueError, match="nm_75"):
        read_points(spec, "cocktail_nm_75", 0, metrics)
