"""Activation sparsity (compressors/act_sparsity.py): CATS thresholds calibrated per layer to the target,
ReLU-fication, FATReLU, the Hoyer term, sparsity measured per layer on validation data, resume after a
kill, and bad input."""

from __future__ import annotations

import re

import pytest
import torch
from test_resume import kill_when, start

from conftest import metrics_of, one_line_error, train_in
from effml.compressors.act_sparsity import ActSparsityConfig, hoyer_square, quantile
from effml.compressors.smoke import SETUPS
from effml.errors import EffmlError

QUIET = ["trainer.progress_bar=off", "measure.enabled=false", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2"]
BERT = ["train", "compressor=act_sparsity", *SETUPS["bert"], *QUIET, "trainer.max_epochs=1",
        "compressor.calibration_examples=32", "compressor.measure_examples=64"]
MLP = ["train", "compressor=act_sparsity", "data=digits", "data.train_subset=320", "data.batch_size=32", *QUIET,
       "trainer.max_epochs=2", "compressor.calibration_examples=64", "compressor.measure_examples=128"]


def test_hoyer_square_is_one_over_n_for_one_nonzero_and_one_for_equal_entries():
    assert float(hoyer_square(torch.tensor([0.0, 0.0, 3.0, 0.0]))) == pytest.approx(0.25)
    assert float(hoyer_square(torch.tensor([-2.0, 2.0, 2.0, -2.0]))) == pytest.approx(1.0)


def test_quantile_is_the_kth_smallest():
    values = torch.arange(1.0, 101.0)
    assert quantile(values, 0.5) == 50.0 and quantile(values, 0.0) == 0.0 and quantile(values, 0.9) == 90.0


@pytest.mark.parametrize("field, value, message", [
    ("target_sparsity", 1.0, "compressor.target_sparsity must be in [0, 1)"),
    ("target_sparsity", -0.1, "compressor.target_sparsity must be in [0, 1)"),
    ("hoyer_weight", -1.0, "compressor.hoyer_weight must be >= 0"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(EffmlError, match=re.escape(message)):
        ActSparsityConfig(**{field: value})


def test_bad_input_is_one_line(effml):
    def bad(args, message):
        code, _, err = effml(*args)
        one_line_error(code, err, message)

    bad([*MLP, "compressor.target_sparsity=1.5"], "compressor.target_sparsity must be in [0, 1)")
    bad([*MLP, "compressor.kind=relufy"],
        "compressor act_sparsity (kind=relufy) found no GELU or SiLU module to change in LeNet; "
        "its activation modules are: ReLU")
    bad(["train", "compressor=act_sparsity", "compressor.kind=fatrelu", "data=digits", "model=vit_tiny",
         "model.dim=32", "model.depth=1", "model.heads=2"], "found no ReLU module to change in ViT; its activation "
        "modules are: GELU")


@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory):
    """CATS at 70% and ReLU-fication on the smoke BERT (2 layers, GELU FFNs)."""
    root = tmp_path_factory.mktemp("act_sparsity")
    train_in(root, *BERT[1:], "compressor.target_sparsity=0.7", "output_root=cats")
    train_in(root, *BERT[1:], "compressor.kind=relufy", "output_root=relufy")
    return metrics_of(root / "cats"), metrics_of(root / "relufy")


@pytest.mark.e2e
def test_cats_thresholds_each_ffn_to_the_target_sparsity_measured_per_layer(bert_runs):
    report = bert_runs[0]["compressors"]["act_sparsity"]
    sites = [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    assert sorted(report["sparsity"]) == sites and sorted(report["thresholds"]) == sites
    assert all(report["thresholds"][s] > 0 for s in sites)
    # calibrated on training examples, measured on validation ones after a fine-tuning epoch
    assert all(0.6 <= report["sparsity"][s] <= 0.8 for s in sites), report["sparsity"]
    assert report["replaced"] == {s: "GELUActivation" for s in sites}
    assert report["ffn_speedup_batch1"] > 0 and report["ffn_speedup"] > 0  # intermediate + output.dense, timed


@pytest.mark.e2e
def test_relufication_turns_gelu_into_relu_and_zeros_appear(bert_runs):
    report = bert_runs[1]["compressors"]["act_sparsity"]
    assert report["kind"] == "relufy" and report["target_sparsity"] is None
    assert all(t == 0 for t in report["thresholds"].values())
    assert all(0.2 < s < 1 for s in report["sparsity"].values()), report["sparsity"]  # GELU had none


@pytest.mark.e2e
def test_fatrelu_and_hoyer_on_relu_layers(effml, tmp_path):
    assert effml(*MLP, "compressor.kind=fatrelu", "compressor.target_sparsity=0.85", "output_root=fat")[0] == 0
    fat = metrics_of(tmp_path / "fat")["compressors"]["act_sparsity"]
    assert effml(*MLP, "compressor.kind=hoyer", "compressor.hoyer_weight=1.0", "output_root=hoyer")[0] == 0
    assert effml(*MLP, "compressor.kind=hoyer", "compressor.hoyer_weight=0.0", "output_root=plain")[0] == 0
    hoyer, plain = (metrics_of(tmp_path / r)["compressors"]["act_sparsity"] for r in ("hoyer", "plain"))
    # the thresholds are calibrated to 85% at each epoch start; training drifts back within the epoch
    assert all(t > 0 for t in fat["thresholds"].values()) and fat["mean_sparsity"] >= 0.6
    assert fat["mean_sparsity"] > plain["mean_sparsity"] + 0.1
    assert hoyer["mean_sparsity"] > plain["mean_sparsity"]  # the regulariser makes more ReLU outputs zero


@pytest.mark.e2e
def test_a_kill_mid_training_resumes_to_the_same_model(effml, tmp_path):
    run = [*MLP, "trainer.max_epochs=4", "compressor.kind=cats"]
    assert effml(*run, "output_root=straight")[0] == 0
    kill_when(start(tmp_path, ["output_root=killed"], run=run), "killed/*/*/*/stages/00_train/checkpoints/last.ckpt",
              tmp_path)
    code, out, err = effml(*run, "output_root=killed")
    assert code == 0 and "resuming" in err + out, err
    a, b = (torch.load(next((tmp_path / root).rglob("model.pt")), weights_only=True) for root in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".threshold") for k in a)
    straight, resumed = metrics_of(tmp_path / "straight"), metrics_of(tmp_path / "killed")
    assert straight["test_acc"] == resumed["test_acc"]
    untimed = [{k: v for k, v in m["compressors"]["act_sparsity"].items() if not k.startswith("ffn_speedup")}
               for m in (straight, resumed)]  # the speedups are timings: they differ from run to run
    assert untimed[0] == untimed[1]


@pytest.mark.e2e
def test_the_gather_kernel_is_chosen_by_measurement_or_forced(effml, tmp_path):
    # LeNet-300-100's ReLUs feed the next Linear: measured, the gather is kept only where it is faster;
    # forced, every reader becomes a GatherLinear, and the model computes what it computed before
    common = [*MLP, "compressor.kind=fatrelu", "compressor.target_sparsity=0.9", "trainer.max_epochs=1"]
    assert effml(*common, "output_root=measured")[0] == 0
    assert effml(*common, "hardware.selection=force", "output_root=forced")[0] == 0
    measured, forced = metrics_of(tmp_path / "measured"), metrics_of(tmp_path / "forced")
    decisions = measured["kernels"]["layers"] if "layers" in measured.get("kernels", {}) else None
    for metrics in (measured, forced):
        assert metrics["test_acc"] == measured["test_acc"]  # same function whichever kernel runs
    # the ReLU between the two hidden Linears feeds features.3 (the last one feeds the classifier, outside
    # the Sequential: not found, so left alone)
    assert [d["layer"] for d in forced["kernels"]["layers"]] == ["features.3"]
    assert all(d["kernel"] == "gather" and d["forced"] for d in forced["kernels"]["layers"])
    assert decisions is not None and [d["layer"] for d in decisions] == ["features.3"]
    assert decisions[0]["kernel"] in ("dense", "gather") and "x at batch 64" in decisions[0]["reason"]
    assert set(decisions[0]["timings_ms"]) == {"dense", "gather", "dense_batch1", "gather_batch1", "up", "up_batch1"}
    t, report = decisions[0]["timings_ms"], measured["compressors"]["act_sparsity"]
    # the FFN's speedup: the up-projection's time is in both, so it is between 1 and the down-projection's
    assert report["ffn_speedup_batch1"] == pytest.approx((t["up_batch1"] + t["dense_batch1"]) /
                                                          (t["up_batch1"] + t["gather_batch1"]), rel=1e-3)
    saved = torch.load(next((tmp_path / "forced").rglob("model.pt")), weights_only=True)
    assert not any(k.endswith("weight_t") for k in saved)  # saved as the Linear it replaced
