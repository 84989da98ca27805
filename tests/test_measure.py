"""effml.measure and effml.report: counts exact, FLOPs exact, timings real, the report renders."""

import json

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.nn.utils import prune

from effml import measure, report


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def _zero_fraction(layer: nn.Linear, fraction: float) -> None:
    """Zero exactly `fraction` of the weight, by hand."""
    with torch.no_grad():
        flat = layer.weight.view(-1)
        flat[torch.randperm(flat.numel())[: round(fraction * flat.numel())]] = 0


def _sparse_mlp(fraction: float = 0.9) -> nn.Sequential:
    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            _zero_fraction(layer, fraction)
    return model


def test_sparsity_counted_from_weights():
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 20))
    _zero_fraction(model[0], 0.9)  # 4500 of 5000 zeros
    mask = (torch.rand(20, 50) > 0.3).float()
    prune.custom_from_mask(model[1], "weight", mask)
    mask_nnz = int(mask.sum())
    rep = measure.sparsity_report(model)

    assert rep["layers"]["0"] == {"shape": [50, 100], "numel": 5000, "sparsity": pytest.approx(0.9)}
    assert rep["layers"]["1"]["sparsity"] == pytest.approx(1 - mask_nnz / 1000)
    assert rep["prunable_weights"] == 6000
    assert rep["nonzero_prunable"] == 500 + mask_nnz
    assert rep["sparsity"] == pytest.approx(1 - (500 + mask_nnz) / 6000)
    # weight_orig + weight_mask count once, as the effective weight; biases count too.
    assert rep["params_total"] == 6000 + 50 + 20
    assert rep["params_nonzero"] == 500 + mask_nnz + 50 + 20
    assert measure.model_size_bytes(model) == (6000 + 70) * 4
    assert measure.sparse_size_bytes(model) < measure.model_size_bytes(model)


def test_flops_exact_and_effective():
    layer = nn.Linear(784, 300)
    flops = measure.count_flops(layer, {"input": torch.randn(8, 784)})
    assert flops["total"] == 2 * 8 * 784 * 300
    assert flops["total_per_sample"] == 2 * 784 * 300
    assert flops["effective"] == flops["total"]

    _zero_fraction(layer, 0.75)
    assert measure.count_flops(layer, {"input": torch.randn(8, 784)})["effective"] == 2 * 8 * 784 * 300 // 4

    model = _sparse_mlp(0.9)
    f = measure.count_flops(model, {"input": torch.randn(4, 784)})
    assert f["per_module"]["0"] == 2 * 4 * 784 * 300
    assert f["effective"] == pytest.approx(0.1 * f["total"], rel=1e-3)


def test_measure_inference_cpu():
    model = _mlp()
    small = measure.measure_inference(model, {"input": torch.randn(8, 784)}, "cpu", iters=5, min_time_s=0.05)
    big = measure.measure_inference(model, {"input": torch.randn(256, 784)}, "cpu", iters=5, min_time_s=0.05)
    assert 0 < small["latency_ms"] <= small["latency_p90_ms"]
    assert small["throughput"] > 0 and small["iters"] >= 5
    assert small["batch_size"] == 8 and small["device_name"]
    # Widest point: Linear(784, 300) output and its ReLU output, float32.
    assert small["activation_peak_bytes"] >= 2 * 8 * 300 * 4
    assert big["activation_peak_bytes"] > small["activation_peak_bytes"]
    assert big["peak_mem_bytes"] > small["peak_mem_bytes"] > measure.resident_bytes(model)


@pytest.mark.e2e  # inductor compiles two graphs on the CPU: seconds
def test_compiled_measurement_times_the_compiled_models_and_says_so(monkeypatch):
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or real_compile(m, **kw))
    dense, small = _mlp(), _mlp()
    r = measure.compare_dense_compressed(dense, small, {"input": torch.randn(8, 784)}, "cpu", iters=3,
                                         min_time_s=0.01, compile=True)
    assert compiled == [dense, small] and r["compiled"] is True and r["dense"]["latency_ms"] > 0
    assert r["dense"]["flops_per_sample"] > 0  # the static report still reads the eager models
    assert measure.compare_dense_compressed(dense, small, {"input": torch.randn(8, 784)}, "cpu", iters=3,
                                            min_time_s=0.01)["compiled"] is False


def test_measure_train_step_restores_weights():
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    r = measure.measure_train_step(
        model, {"input": torch.randn(16, 784)}, torch.randint(0, 10, (16,)), "cpu", iters=3, min_time_s=0.02
    )
    assert r["train_step_ms"] > 0 and r["train_peak_mem_bytes"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_compare_notes_flops_fell_but_time_did_not():
    dense, sparse = _mlp(), _sparse_mlp(0.9)
    # Same dense kernels on both, so the speedup is ~1.0; a shared 2-core CI box can still throw one
    # run past 1.1 by noise, hence up to 3 tries.
    for _ in range(3):
        r = measure.compare_dense_compressed(
            dense, sparse, {"input": torch.randn(64, 784)}, "cpu", iters=30, min_time_s=0.3
        )
        if r["speedup"] < 1.1:
            break
    assert r["flops_ratio"] == pytest.approx(10, rel=0.01) and r["flops_ratio_dense"] == 1
    assert r["speedup"] < 1.1
    assert any("FLOPs fell 10.0x" in n and "dense kernels on cpu" in n for n in r["notes"]), r["notes"]
    assert r["dense"]["size_bytes"] == r["compressed"]["size_bytes"]
    assert r["sparse_size_ratio"] > 3


def test_notes_for_structured_and_slower():
    r = {
        "speedup": 0.7,
        "flops_ratio": 2.0,
        "flops_ratio_dense": 2.0,
        "size_ratio": 2.0,
        "compressed": {"sparsity": 0.0},
    }
    notes = measure._notes(r, torch.device("cuda"))
    assert "smaller shapes do not run faster on cuda" in notes[0]
    assert "1.43x SLOWER" in notes[1]


def _metrics() -> dict:
    speed = {
        "device_name": "Test CPU",
        "batch_size": 64,
        "speedup": 1.01,
        "memory_ratio": 1.0,
        "dense": {
            "latency_ms": 0.25,
            "latency_p90_ms": 0.3,
            "throughput": 256000,
            "peak_mem_bytes": 1.4 * 2**20,
            "params": 266610,
            "sparsity": 0.0,
            "size_bytes": 1066440,
            "sparse_size_bytes": 1066440,
        },
        "compressed": {
            "latency_ms": 0.2475,
            "latency_p90_ms": 0.31,
            "throughput": 258000,
            "peak_mem_bytes": 1.4 * 2**20,
            "params_nonzero": 27030,
            "sparsity": 0.9,
            "size_bytes": 1066440,
            "sparse_size_bytes": 216252,
        },
        "notes": ["FLOPs fell 9.5x (counting skipped zeros) but measured latency did not (1.01x)"],
    }
    return {
        "recipe": "lth_lenet",
        "run_dir": "outputs/lth_lenet/abc123/seed_0",
        "seed": 0,
        "test_acc": {"dense": 0.981, "compressed": 0.978},
        "val_acc": 0.979,
        "sparsity": {"sparsity": 0.9, "params_total": 266610, "params_nonzero": 27030},
        "target_sparsity": 0.9,
        "flops": {"dense": 532400, "compressed": 532400, "effective": 53240},
        "speed": speed,
        "train_time_s": 12.34,
        "stages": [{"name": "level_0", "time_s": 6.1, "val_acc": 0.98, "epochs": 2}],
        "compressors": {"imp": {"levels": 8, "masks": [1, 2]}},
        "kernels": {"linear": "dense"},
        "notes": ["[bold]brackets[/] stay literal"],
    }


def test_summary_table_renders():
    console = Console(record=True, width=140)
    report.print_summary(_metrics(), console)
    text = console.export_text()
    for s in (
        "lth_lenet",
        "97.80%",
        "-0.30 pt",
        "90.00%",
        "266.6k",
        "27.0k",
        "9.86×",
        "532.4k",
        "53.2k",
        "10.00×",
        "0.25 ms",
        "1.01×",
        "1.40 MiB",
        "Test CPU",
        "stage level_0",
        "imp.levels",
        "FLOPs fell 9.5x",
        "[bold]brackets[/]",
        "seed_0",
    ):
        assert s in text, s
    assert "masks" not in text  # lists stay in the json
    report.print_summary({}, Console(record=True))  # nothing to show is not an error


def test_write_metrics_atomic(tmp_path):
    path = tmp_path / "run" / "metrics.json"
    report.write_metrics(path, _metrics() | {"x": 1 / 3, "nan": float("nan"), "t": torch.tensor([1.5])})
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    data = json.loads(path.read_text())
    assert data["x"] == 0.333333 and data["nan"] is None and data["t"] == [1.5]
    assert report.load_metrics(path)["recipe"] == "lth_lenet"
