"""AutoReP (compressors/autorep.py): DaPa's fit, the hysteresis loop, the STE's direction, the budget met
in a run with the ReLU count per layer, whole-layer linearization, starting from a finished dense run,
resume after a kill, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_resume import kill_when, start

from conftest import metrics_of, one_line_error
from effml.compressors.autorep import RELU_BYTES, SQUARE_BYTES, AutoRePConfig, ReLUOrPoly
from effml.errors import EffmlError

DIGITS = ["data=digits", "model=resnet20", "model.depth=8", "model.width=8", "data.train_subset=320",
          "data.batch_size=32", "trainer.limit_val_batches=2", "trainer.limit_test_batches=4",
          "trainer.progress_bar=off", "measure.enabled=false"]
RUN = ["train", "compressor=autorep", *DIGITS, "compressor.dense_epochs=1", "compressor.mask_epochs=3",
       "compressor.finetune_epochs=1", "compressor.relu_budget=0.2"]
# ResNet-8 at width 8 on 8x8 digits: conv1 + 2 per block, 8x8x8 (x3), 16x4x4 (x2), 32x2x2 (x2)
RESNET8_RELUS = 3 * 512 + 2 * 256 + 2 * 128


def site(shape=(4, 3, 3), granularity="element", replacement="poly") -> ReLUOrPoly:
    module = ReLUOrPoly(granularity, replacement)
    module(torch.zeros(1, *shape))  # the first forward records the shape
    torch.manual_seed(0)
    module.materialize()
    return module


def test_dapa_fits_relu_under_a_standard_normal_as_the_normal_equations_say():
    # E[(relu(z) - c0 - c1 z - c2 z^2)^2], z ~ N(0, 1): c1 = 1/2, and c0 = c2 = E|z| / 4 = 1 / sqrt(8 pi)
    module = site((2,))
    module.dapa(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1e-6]))
    c0, c1, c2 = module.coef[:, 0].tolist()
    expected = 1 / (8 * torch.pi) ** 0.5
    assert c1 == pytest.approx(0.5, abs=2e-3) and c0 == pytest.approx(expected, abs=5e-3)
    assert c2 == pytest.approx(expected, abs=5e-3)
    # a channel far on the positive side is ReLU's identity part: x
    assert module.coef[:, 1].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-3)


def test_the_hysteresis_loop_flips_only_outside_the_band():
    module = site((4,))
    module.mask.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    module.aux.copy_(torch.tensor([-0.002, -0.004, 0.002, 0.004]))
    module.hysteresis(-0.003, 0.003)
    # inside the band each keeps its state; below low a ReLU goes, above high a polynomial comes back
    assert module.mask.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_the_forward_mixes_relu_and_the_polynomial_per_unit_and_the_ste_reaches_aux():
    module = site((2, 1, 1), granularity="channel")
    module.coef.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])  # x + x^2 / 2 in both channels
    module.mask.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[[[3.0]], [[3.0]]]])
    assert module(x).flatten().tolist() == [3.0, 3.0 + 0.5 * 9]  # channel 0: ReLU; channel 1: polynomial
    # mask stage: the indicator is a leaf whose gradient is dL/dm = relu(x) - poly(x) per unit
    module.search = True
    module.train()
    before = module.aux.clone()
    leaf = module.gate()
    module(torch.tensor([[[[3.0]], [[-2.0]]]])).sum().backward()
    assert leaf.grad.tolist() == pytest.approx([3.0 - 7.5, 0.0 - 0.0])
    module.adam_step(0.01, 1)
    # dL/dm < 0: keeping the ReLU lowers the loss, so aux rises (Adam's first step is lr); no gradient, no move
    assert module.aux.tolist() == pytest.approx([before[0].item() + 0.01, before[1].item()], abs=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("relu_budget", 0.0, "compressor.relu_budget must be > 0"),
    ("relu_budget", -5.0, "compressor.relu_budget must be > 0"),
    ("relu_budget", 10.5, "must be whole"),
    ("hysteresis_low", 0.01, "hysteresis_low must be <= hysteresis_high"),
    ("penalty", 0.0, "compressor.penalty must be > 0"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(EffmlError, match=message):
        AutoRePConfig(**{field: value})


def bad(result, message):
    code, _, err = result
    one_line_error(code, err, message)


def test_bad_input_is_one_line_and_writes_nothing(effml, tmp_path):
    bad(effml(*RUN, "compressor.relu_budget=0"), "compressor.relu_budget must be > 0")
    bad(effml(*RUN, "compressor.hysteresis_low=0.1", "compressor.hysteresis_high=-0.1"),
        "hysteresis_low must be <= hysteresis_high")
    bad(effml(*RUN, f"compressor.relu_budget={RESNET8_RELUS + 1}"), f"is above the model's {RESNET8_RELUS} ReLUs")
    # a model without a ReLU module: the ViT's activations are GELU
    bad(effml("train", "compressor=autorep", "data=digits", "model=vit_tiny", "model.dim=32", "model.depth=1",
              "model.heads=2"), "found no ReLU module to change in ViT; its activation modules are: GELU")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.json"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One run of every stage (dense, mask, finetune) at 20% of ResNet-8's ReLUs, per element."""
    from conftest import train_in

    root = tmp_path_factory.mktemp("autorep")
    train_in(root, *RUN[1:])
    return metrics_of(root / "outputs")


@pytest.mark.e2e
def test_a_run_ends_at_the_budget_and_reports_relus_per_layer_accuracy_and_the_cost_model(finished):
    report = finished["compressors"]["autorep"]
    assert report["relus_total"] == RESNET8_RELUS and report["relu_budget"] == round(0.2 * RESNET8_RELUS)
    assert 0 < report["relu_count"] <= report["relu_budget"]
    assert sum(layer["relus"] for layer in report["layers"].values()) == report["relu_count"]
    assert sum(layer["of"] for layer in report["layers"].values()) == RESNET8_RELUS
    assert len(report["layers"]) == 7 and report["indicator_steps"] == 3 * 10  # 320 / 32 batches × 3 epochs
    assert [s["name"] for s in finished["stages"]] == ["dense", "mask", "finetune"]
    assert [s["relu_count"] for s in finished["stages"]][0] == RESNET8_RELUS
    cost = report["pi_cost_model"]
    assert cost["kind"].startswith("cost model (not measured)")
    assert cost["activation_bytes"] == report["relu_count"] * RELU_BYTES + cost["squares"] * SQUARE_BYTES
    assert cost["squares"] == RESNET8_RELUS - report["relu_count"] and cost["reduction"] > 1
    points = report["points"]
    assert points[0]["relu_budget"] == RESNET8_RELUS and points[0]["test_acc"] == finished["stages"][0]["test_acc"]
    assert points[1]["test_acc"] == finished["stages"][2]["test_acc"]
    assert finished["test_acc"] > 0.3  # well above chance (0.1) after seconds of training


@pytest.mark.e2e
def test_whole_layer_linearization_from_a_finished_dense_run(effml, tmp_path):
    dense = ["train", "compressor=none", *DIGITS, "trainer.max_epochs=1", "name=dense8"]
    assert effml(*dense)[0] == 0
    code, out, err = effml(*RUN, "compressor.granularity=layer", "compressor.replacement=identity",
                           "compressor.weights.source=recipe", "compressor.weights.recipe=dense8")
    assert code == 0, err
    metrics = metrics_of(tmp_path / "outputs" / "custom")
    report = metrics["compressors"]["autorep"]
    assert [s["name"] for s in metrics["stages"]] == ["mask", "finetune"]
    # whole layers: each layer keeps all of its ReLUs or none
    assert all(layer["relus"] in (0, layer["of"]) for layer in report["layers"].values())
    assert report["relu_count"] <= report["relu_budget"]
    assert report["pi_cost_model"]["squares"] == 0  # the identity costs nothing
    assert report["dense_test_acc"] == metrics_of(tmp_path / "outputs" / "dense8")["test_acc"]


@pytest.mark.e2e
def test_a_kill_mid_mask_training_resumes_to_the_same_model(effml, tmp_path):
    run = [*RUN, "compressor.mask_epochs=4"]
    assert effml(*run, "output_root=straight")[0] == 0
    kill_when(start(tmp_path, ["output_root=killed"], run=run), "killed/*/*/*/stages/01_mask/checkpoints/last.ckpt",
              tmp_path)
    assert not list(tmp_path.glob("killed/**/metrics.json"))
    code, out, err = effml(*run, "output_root=killed")
    assert code == 0 and "resuming" in err + out, err
    a, b = (torch.load(next((tmp_path / root).rglob("model.pt")), weights_only=True) for root in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # masks, coefficients, weights
    straight, resumed = metrics_of(tmp_path / "straight"), metrics_of(tmp_path / "killed")
    for key in ("test_acc", "val_acc"):
        assert straight[key] == resumed[key], key
    assert straight["compressors"]["autorep"] == resumed["compressors"]["autorep"]
    record = json.loads(next(tmp_path.glob("killed/**/01_mask/record.json")).read_text())
    assert record["relu_count"] <= straight["compressors"]["autorep"]["relu_budget"]


def test_the_table_runs_the_dense_models_first_and_draws_only_the_two_methods(tmp_path):
    from effml.tables.spec import find_table, load_spec

    spec = find_table("autorep")
    assert [s.key for s in spec.series] == ["dense", "autorep", "layer"] and spec.series[0].prerequisite
    assert [s.key for s in spec.shown_series] == ["autorep", "layer"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: t\npaper: p\nrecipe: autorep\ny: {key: test_acc}\n"
                   "series: [{key: dense, prerequisite: true}, {key: a}]\nreference: {series: dense}\n")
    with pytest.raises(EffmlError, match="reference.series: unknown series 'dense'; choose from: a"):
        load_spec(bad)
