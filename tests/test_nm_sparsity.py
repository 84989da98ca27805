"""N:M sparsity (compressors/nm_sparsity.py): the masks by hand, conv grouping, skipped layers, masks
through training, the gradual schedule, kernel selection on the CPU, weights from a finished dense run,
resume after a kill, and bad input."""

from __future__ import annotations

import io
import json
import warnings
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
from test_resume import kill_when, start

from conftest import TINY, metrics_of, one_line_error
from effml.compressors.base import Stage
from effml.compressors.nm_sparsity import (
    NMConfig,
    NMSparsity,
    groups_over_n,
    nm_mask,
    save_semi_structured_dense,
    scheduled_n,
)
from effml.errors import EffmlError
from effml.kernels.hardware import preset
from effml.models.lenet import LeNet
from effml.models.resnet import ResNet

DIGITS = ["data=digits", "data.train_subset=640", "data.batch_size=32", "trainer.limit_val_batches=2", "trainer.limit_test_batches=4",
          "trainer.progress_bar=off", "measure.enabled=false"]
NM_LENET = ["train", "recipe=nm_lenet", *DIGITS, "compressor.dense_epochs=2", "compressor.sparse_epochs=4"]


# -- the pattern, by hand ---------------------------------------------------------------------------
ROW = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 9.0]])


@pytest.mark.parametrize("n, m, kept", [
    (2, 4, [0, 1, 1, 0, 1, 0, 0, 1]),  # |-4|, 3 of the first four; 9, 0.5 of the second
    (1, 4, [0, 1, 0, 0, 0, 0, 0, 1]),
    (4, 8, [0, 1, 1, 1, 0, 0, 0, 1]),  # 9, |-4|, 3, 2 of all eight
])
def test_masks_keep_the_n_largest_magnitudes_of_every_m(n, m, kept):
    assert nm_mask(ROW, n, m).tolist() == [kept]


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    weight = torch.zeros(1, 4, 1, 2)  # (out, in, kh, kw)
    weight[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight[0, :, 0, 1] = torch.tensor([8.0, 7.0, 6.0, 5.0])
    mask = nm_mask(weight, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [0, 0, 1, 1]  # channels 2, 3 at the first position
    assert mask[0, :, 0, 1].tolist() == [1, 1, 0, 0]  # channels 0, 1 at the second
    # (grouping the (in, kh, kw) flattening instead would have kept 8, 7 and 6, 5)
    conv = torch.randn(16, 32, 3, 3)
    masked = conv * nm_mask(conv, 2, 4)
    assert groups_over_n(masked, 2, 4) == 0 and groups_over_n(conv, 2, 4) == 16 * 8 * 9
    assert (masked.movedim(1, -1).reshape(-1, 4) != 0).sum(1).eq(2).all()


def test_the_gradual_schedule_steps_from_m_minus_1_down_to_n():
    assert [scheduled_n(t, 10, 110, 2, 4) for t in (0, 9, 10, 109, 110, 500)] == [4, 4, 3, 3, 2, 2]
    assert [scheduled_n(t, 0, 90, 1, 4) for t in (0, 44, 45, 89, 90)] == [3, 3, 2, 2, 1]
    assert [scheduled_n(t, 0, 90, 4, 8) for t in (0, 30, 60, 90)] == [7, 6, 5, 4]
    assert scheduled_n(0, 0, 90, 3, 4) == 3  # one step: at t0


# -- layers and masks on real models ------------------------------------------------------------------
def attached(model, **cfg) -> NMSparsity:
    compressor = NMSparsity(NMConfig(**cfg))
    compressor.attach(model)
    return compressor


def test_layers_whose_width_m_does_not_divide_are_skipped_and_reported():
    torch.manual_seed(0)
    lenet = attached(LeNet(64, [302, 100], 10))
    assert list(lenet.layers) == ["features.1"]  # 64 inputs; 302 is not divisible by 4
    assert lenet.skipped == {"features.3": "in_features 302 not divisible by M=4", "classifier": "matches compressor.skip"}
    resnet = attached(ResNet(1, 8, 8, "A", 10), n=4, m=8)
    assert resnet.skipped["conv1"] == "in_channels 1 not divisible by M=8"
    assert "layer1.0.conv1" in resnet.layers and resnet.report()["skipped"] == resnet.skipped
    with pytest.raises(EffmlError, match="found no"):
        attached(LeNet(6, [30], 10))  # every layer skipped: nothing to prune


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4)])
def test_masks_stay_n_of_m_through_optimizer_steps_and_finalize(n, m):
    torch.manual_seed(0)
    model = LeNet(64, [300, 100], 10)
    nm = attached(model, n=n, m=m)
    nm.prune_to(n)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 1, 8, 8)).square().mean().backward()
        optimizer.step()
        report = nm.report()
        assert report["verified_nm"] and report["achieved_sparsity"] == 1 - n / m
    nm.example_inputs = {"x": torch.randn(4, 1, 8, 8)}
    nm.finalize(model, preset("cpu"))
    assert not hasattr(model.features[1], "weight_mask")
    assert all(groups_over_n(model.get_submodule(k).weight, n, m) == 0 for k in nm.layers)
    assert (model.classifier.weight != 0).all()  # skipped: dense
    reasons = [d["reason"] for d in nm.kernel_decisions]
    expected = "sparse_2to4: not in hardware.kernels" if n == 2 else "2:4 only; 1:4 is accuracy-only"
    assert len(reasons) == 2 and all(expected in r for r in reasons), reasons


def test_gradual_masks_tighten_in_steps_and_nest():
    torch.manual_seed(0)
    model = LeNet(64, [300, 100], 10)
    nm = attached(model, n=1, m=4, schedule="gradual", start_fraction=0.0, end_fraction=0.5)
    nm.begin_stage(Stage("train", owner="nm_sparsity"), None)
    trainer, task = SimpleNamespace(estimated_stepping_batches=100, global_step=0), SimpleNamespace(log=lambda *a: None)
    nm.on_train_start(trainer, task)
    masks = []
    for step in range(1, 101):
        trainer.global_step = step
        nm.on_train_batch_end(trainer, task, None, None, step)
        if nm.events > len(masks):
            masks.append(model.features[1].weight_mask.clone())
    assert nm.events == 3 and nm.current_n == 1  # 3:4, 2:4, 1:4
    assert [float(mk.mean()) for mk in masks] == [0.75, 0.5, 0.25]
    assert all(((later > 0) <= (earlier > 0)).all() for earlier, later in pairwise(masks))  # nested


def test_a_converted_layer_is_saved_as_its_dense_weight():
    """model.pt holds plain tensors after a GPU conversion. Emulated on the CPU: the CUTLASS layout of
    to_sparse_semi_structured, built by PyTorch's own (pure-torch) conversion."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    layer = torch.nn.Linear(64, 32).half()
    dense = layer.weight.detach() * nm_mask(layer.weight, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prototype" warning
        packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
        layer.weight = torch.nn.Parameter(SparseSemiStructuredTensorCUTLASS(
            dense.shape, packed=packed, meta=meta, packed_t=None, meta_t=None, compressed_swizzled_bitmask=None),
            requires_grad=False)
    layer.register_state_dict_post_hook(save_semi_structured_dense)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors only
    assert type(saved["weight"]) is torch.Tensor and torch.equal(saved["weight"], dense)


@pytest.mark.parametrize("field, value", [("n", 4), ("n", 5), ("n", 0), ("schedule", "sideways"),
                                          ("start_fraction", 0.9), ("sparse_lr_scale", 0.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        NMConfig(**{field: value})


# -- through the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["compressor.n=5"], "compressor.n must satisfy 1 <= n < m (keep n of every m weights); got n=5, m=4"),
    (["compressor.n=0"], "got n=0, m=4"),
    (["hardware.selection=force", "hardware.kernels=[sparse_2to4]"], "kernel sparse_2to4 cannot run for features.1: 2:4 sparsity (cuSPARSELt) needs a CUDA GPU"),
    (["compressor.weights.source=recipe", "compressor.weights.recipe=dense_lenet"],
     "dense model: no finished run of recipe dense_lenet (seed 0)"),
    (["compressor.weights.source=run"], "compressor.weights.path is needed for weights.source=run"),
])
def test_bad_input_is_one_line_and_exit_2(effml, tmp_path, overrides, message):
    code, _, err = effml(*NM_LENET, *overrides)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()  # failed before anything was written


def test_retrains_a_finished_dense_run_to_2_of_4_near_its_accuracy(effml, tmp_path):
    assert effml("train", "recipe=dense_lenet", *DIGITS, "trainer.max_epochs=4")[0] == 0
    dense = metrics_of(tmp_path / "outputs" / "dense_lenet")
    code, _, err = effml(*NM_LENET, "compressor.weights.source=recipe", "compressor.weights.recipe=dense_lenet",
                         "compressor.sparse_epochs=2")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs" / "nm_lenet")
    report = m["compressors"]["nm_sparsity"]
    assert [s["name"] for s in m["stages"]] == ["retrain"]  # no dense stage: the weights came trained
    assert report["dense_weights"] == "recipe:dense_lenet" and report["dense_test_acc"] == dense["test_acc"]
    assert report["achieved_sparsity"] == 0.5 and report["verified_nm"]
    assert all(m["layers"][k]["sparsity"] == 0.5 for k in report["layers"])  # the runner's own count agrees
    assert m["test_acc"] >= dense["test_acc"] - 0.03, (m["test_acc"], dense["test_acc"])
    decisions = m["kernels"]["layers"]  # measured selection on the CPU: dense kept, the reason recorded
    assert [d["layer"] for d in decisions] == ["features.1", "features.3"]
    assert all(d["kernel"] == "dense" and "sparse_2to4: not in hardware.kernels" in d["reason"] for d in decisions)
    saved = torch.load(next((tmp_path / "outputs" / "nm_lenet").rglob("model.pt")), weights_only=True)
    assert "features.1.weight" in saved and not any(k.endswith("_mask") for k in saved)


def test_a_kill_mid_retrain_resumes_to_the_same_model(effml, tmp_path):
    assert effml(*NM_LENET, "output_root=straight")[0] == 0
    straight = metrics_of(tmp_path / "straight")
    assert [s["name"] for s in straight["stages"]] == ["dense", "retrain"]
    assert straight["test_acc"] >= straight["stages"][0]["test_acc"] - 0.02  # 2:4 + retrain is near dense

    # killed by SIGKILL after the first retraining epoch, then the same command again (in-process)
    kill_when(start(tmp_path, ["output_root=killed"], run=NM_LENET),
              "killed/*/*/*/stages/01_retrain/checkpoints/last.ckpt", tmp_path)
    assert not list(tmp_path.glob("killed/**/metrics.json")) and not list(tmp_path.glob("killed/**/01_retrain/end.pt"))
    code, out, err = effml(*NM_LENET, "output_root=killed")
    assert code == 0 and "resuming" in err + out, err
    resumed = metrics_of(tmp_path / "killed")

    a, b = (torch.load(next((tmp_path / root).rglob("model.pt")), weights_only=True) for root in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    for key in ("test_acc", "val_acc", "sparsity"):
        assert straight[key] == resumed[key], key
    assert [s["steps"] for s in straight["stages"]] == [s["steps"] for s in resumed["stages"]]
    assert json.loads(next(tmp_path.glob("killed/**/01_retrain/record.json")).read_text())["nm_n"] == 2


def test_2to4_then_int8_compose_in_one_recipe_and_the_pattern_survives_quantization(effml, tmp_path):
    """recipe=nm_ptq_lenet: nm_sparsity's stages train, then ptq quantizes the sparse model at
    finalize; zeros stay zeros on the symmetric grid, and the int8 model stays near the sparse one."""
    code, _, err = effml("train", "recipe=nm_ptq_lenet", *TINY, "compressor.dense_epochs=1", "compressor.sparse_epochs=1")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    assert [s["name"] for s in m["stages"]] == ["dense", "retrain"]
    assert set(m["compressors"]) == {"nm_sparsity", "ptq"} and m["compressors"]["ptq"]["bits"] == 8
    assert m["compressors"]["nm_sparsity"]["verified_nm"] is True
    assert abs(m["sparsity"]["sparsity"] - m["target_sparsity"]) < 0.01  # still 2:4 after int8
    assert abs(m["test_acc"] - m["stages"][-1]["test_acc"]) < 0.02
