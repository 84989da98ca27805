"""MetaPruning (compressors/metapruning.py): the PruningNet generates the weights of the sampled
structure, FLOPs of a structure, the search keeps to the budget and is reproducible, the uniform
baseline, the beat-chance stop, retraining from scratch, resume, and bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_resume import kill_when, stage_files, start

from conftest import metrics_of, one_line_error
from effml.compressors import metapruning as mp_module
from effml.compressors.base import Stage
from effml.compressors.metapruning import MetaPruning, MetaPruningConfig
from effml.models.resnet import ResNet

SMALL = ["model.depth=8", "model.width=8", "compressor.pruningnet_epochs=1", "compressor.retrain_epochs=1",
         "compressor.population=6", "compressor.parents=2", "compressor.mutations=2", "compressor.crossovers=2",
         "compressor.iterations=2", "compressor.recalibration_batches=1", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2", "trainer.progress_bar=off", "measure.enabled=false"]


class Data:
    """A datamodule stand-in: 8x8 one-channel images, 10 classes."""

    info = SimpleNamespace(num_classes=10)

    def example_inputs(self, n):
        return {"x": torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(2)
        return [{"x": torch.randn(16, 1, 8, 8, generator=g), "labels": torch.randint(10, (16,), generator=g)}
                for _ in range(3)]

    val_dataloader = train_dataloader


def metapruning(**cfg) -> tuple[MetaPruning, torch.nn.Module]:
    torch.manual_seed(0)
    model = ResNet(1, 8, 8, "B", 10)
    mp = MetaPruning(MetaPruningConfig(**cfg))
    mp.attach(model)
    ctx = SimpleNamespace(run_dir=None, seed=0, device=torch.device("cpu"),
                          hardware=SimpleNamespace(channel_multiple=1), measure=SimpleNamespace(batch_size=16))
    mp.prepare(ctx, Data())
    return mp, model


class ParamLatency:
    """compare_models with a latency of one ms per parameter: deterministic, and it counts the calls."""

    def __init__(self):
        self.timed = []

    def __call__(self, models, inputs, device, **options):
        self.timed.append(sorted(models))
        out = {}
        for name, model in models.items():
            ms = float(sum(p.numel() for p in model.parameters()))
            out[name] = {"latency_ms": ms, "latency_min_ms": ms, "device_name": "fake", "batch_size": 16}
        return out


def test_flops_of_a_structure_are_the_shrunk_models():
    from effml.measure import count_flops  # the run's own FLOPs count

    def flops_per_sample(model, inputs):
        return count_flops(model, inputs)["total_per_sample"]

    mp, model = metapruning()
    widths = {g: c[len(c) // 2] for g, c in mp.choices.items()}
    assert mp.flops_fraction({g: c[-1] for g, c in mp.choices.items()}) == pytest.approx(1.0)
    mp.found = widths
    shrunk = mp.finalize(model, SimpleNamespace(channel_multiple=1))
    dense = ResNet(1, 8, 8, "B", 10)
    inputs = Data().example_inputs(2)
    convs_and_linears = mp.flops_fraction(widths)
    measured = flops_per_sample(shrunk, inputs) / flops_per_sample(dense, inputs)
    assert measured == pytest.approx(convs_and_linears, abs=0.03)  # BN and adds are outside our count
    assert not hasattr(shrunk, "pruningnet")


def test_pruningnet_generates_the_weights_of_the_sampled_structure():
    mp, model = metapruning()
    mp.begin_stage(Stage("pruningnet", owner="metapruning"), SimpleNamespace(model=model))
    widths = {g: c[0] for g, c in mp.choices.items()}
    mp._set_masks(widths)
    model(**Data().example_inputs(2))
    layer = model.layer1[0].conv1
    generated = mp.generated["layer1.0.conv1"]
    assert torch.equal(layer.weight, generated * layer.weight_mask)  # the meta block's weight, cropped
    assert int(layer.weight_mask.flatten(1).amax(1).sum()) == widths["layer1.0.conv1"]
    loss = model(**Data().example_inputs(2)).sum()
    loss.backward()
    assert model.pruningnet.blocks["layer1__0__conv1"].fc2.weight.grad.abs().sum() > 0  # the meta net learns
    assert layer.weight_orig.grad is None  # the layer's own weight is not used


def test_search_keeps_to_the_budget_and_is_reproducible(tmp_path):
    found = []
    for attempt in range(2):
        mp, model = metapruning(flops_target=0.4, population=6, parents=2, mutations=3, crossovers=3,
                                iterations=2, chance_margin=-1)
        folder = tmp_path / str(attempt)
        mp.run_dir = SimpleNamespace(artifact=lambda name, folder=folder: folder / name)
        mp.begin_stage(Stage("retrain", owner="metapruning"), SimpleNamespace(model=model))
        assert mp.flops_fraction(mp.found) <= 0.4
        assert model.training  # scoring put the model in eval mode; the retrain must not inherit it
        assert len(mp.search_log["best_per_iteration"]) == 2
        found.append(mp.found)
    assert found[0] == found[1]
    saved = json.loads((tmp_path / "0" / "search.json").read_text())
    assert saved["structure"] == found[0]


def test_latency_constraint_rules_the_search_and_is_cached_per_structure(tmp_path, monkeypatch):
    fake = ParamLatency()
    monkeypatch.setattr(mp_module, "compare_models", fake)
    settings = dict(constraint="latency", latency_target=0.5, population=6, parents=2, mutations=3, crossovers=3,
                    iterations=2, chance_margin=-1)
    mp, model = metapruning(**settings)
    mp.run_dir = SimpleNamespace(artifact=lambda name: tmp_path / name)
    mp.begin_stage(Stage("retrain", owner="metapruning"), SimpleNamespace(model=model))
    log, report = mp.search_log["latency"], mp.report()
    assert report["constraint"] == "latency" and report["latency_target"] == 0.5 and report["flops_target"] is None
    assert log["found_fraction"] <= 0.5 and log["uniform_fraction"] <= 0.5  # parameters here: exact
    assert log["found_fraction"] == log["found_fraction_at_search"]
    assert set(log) >= {"dense_ms", "found_ms", "uniform_ms", "uniform_structure", "device", "batch_size"}
    cached = [json.loads(line) for line in (tmp_path / "latency_cache.jsonl").read_text().splitlines()]
    structures = [tuple(c["structure"]) for c in cached]
    assert len(structures) == len(set(structures)) == log["measured_structures"]  # each measured once
    assert len(fake.timed) == len(structures) + 1 + 1  # + prepare's smallest structure + the final report
    after_finalize = {**report, "channels_after_rounding": 0.5}
    assert MetaPruning.effect("metapruning", {"compressors": {"metapruning": after_finalize}}) is None
    # a search killed midway: the same seed re-draws the same candidates and reads their measurements
    found = mp.found
    (tmp_path / "search.json").unlink()
    lines = (tmp_path / "latency_cache.jsonl").read_text().splitlines()
    (tmp_path / "latency_cache.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n" + lines[len(lines) // 2][:7])
    fake.timed.clear()
    mp, model = metapruning(**settings)
    mp.run_dir = SimpleNamespace(artifact=lambda name: tmp_path / name)
    mp.begin_stage(Stage("retrain", owner="metapruning"), SimpleNamespace(model=model))
    assert mp.found == found
    assert len(fake.timed) == 1 + (len(lines) - len(lines) // 2) + 1  # only the structures not read back


def test_latency_of_a_structure_is_measured_on_the_shrunk_model():
    mp, _ = metapruning(constraint="latency", latency_target=1.0, latency_iters=3)
    full = {g: c[-1] for g, c in mp.choices.items()}
    smallest = {g: c[0] for g, c in mp.choices.items()}
    assert 0.3 < mp.latency_fraction(full) < 3  # the dense model against itself, on a shared machine
    assert not hasattr(mp.skeleton, "pruningnet")
    assert sum(p.numel() for p in mp.skeleton.parameters()) > 0
    mp.latency_fraction(smallest)
    assert len(mp.latencies) == 2


def test_retrain_starts_from_a_fresh_draw_with_the_found_channels(tmp_path):
    mp, model = metapruning(search="uniform", flops_target=0.5)
    mp.run_dir = SimpleNamespace(artifact=lambda name: tmp_path / name)
    before = model.layer1[0].conv1.weight_orig.detach().clone()
    mp.begin_stage(Stage("retrain", owner="metapruning"), SimpleNamespace(model=model))
    assert not torch.equal(model.layer1[0].conv1.weight_orig, before)
    ratio = mp.search_log["uniform_ratio"]
    assert mp.flops_fraction(mp.found) <= 0.5 < mp.flops_fraction({g: min(s, w + 1) for (g, w), s in zip(
        mp.found.items(), [g.size for g in mp.plan.groups], strict=True)})
    assert 0.6 < ratio < 0.8  # FLOPs go with the square of the width: sqrt(0.5) ≈ 0.71


def test_the_search_stops_when_the_pruningnet_is_at_chance(tmp_path):
    mp, model = metapruning(population=4, parents=2, mutations=1, crossovers=1, iterations=1, chance_margin=0.9)
    mp.run_dir = SimpleNamespace(artifact=lambda name: tmp_path / name)
    with pytest.raises(Exception, match="do not beat chance on the held-out split"):
        mp.begin_stage(Stage("retrain", owner="metapruning"), SimpleNamespace(model=model))


@pytest.mark.e2e  # CLI runs of seconds
@pytest.mark.parametrize("override, message", [
    ("compressor.flops_target=0", "compressor.flops_target must be in (0, 1]; got 0"),
    ("compressor.flops_target=0.001", "cannot be met: the smallest structure (min_ratio=0.1) keeps"),
    ("compressor.parents=60", "compressor.parents (60) must be <= compressor.population (50)"),
    ("compressor.min_ratio=0", "compressor.min_ratio must be in (0, 1]"),
    ("compressor.constraint=latency compressor.latency_target=0", "compressor.latency_target must be in (0, 1]"),
    ("compressor.constraint=latency compressor.latency_target=0.01",
     "compressor.latency_target=0.01 cannot be met: the smallest structure (min_ratio=0.1) measures"),
    ("compressor.constraint=memory", "compressor.constraint"),
])
def test_bad_input_is_one_line(effml, tmp_path, override, message):
    code, _, err = effml("train", "recipe=metapruning_resnet", "model.depth=8", *override.split())
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e  # CLI runs of seconds
def test_a_model_without_channels_is_one_line(effml, tmp_path):
    code, _, err = effml("train", "data=digits", "compressor=metapruning", "model=lenet_300_100", "model.hidden=[]")
    one_line_error(code, err, "no conv or linear layer outside the output layer")


@pytest.mark.slow  # about two minutes on 2 CPUs: make test-slow
@pytest.mark.parametrize("marker", ["01_retrain", "00_pruningnet"])
def test_kill_then_rerun_is_exact(tmp_path, marker):
    args = ["train", "recipe=metapruning_resnet", *SMALL, "compressor.pruningnet_epochs=3", "compressor.retrain_epochs=3",
            "compressor.chance_margin=-1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert start(straight, [], args).wait(timeout=600) == 0
    kill_when(start(killed, [], args), f"outputs/*/*/*/stages/{marker}/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("metrics.json"))
    assert start(killed, [], args).wait(timeout=600) == 0
    assert stage_files(straight) == stage_files(killed)  # every end.pt and model.pt, byte for byte
    a, b = metrics_of(straight), metrics_of(killed)
    assert a["compressors"]["metapruning"] == b["compressors"]["metapruning"] and a["test_acc"] == b["test_acc"]
