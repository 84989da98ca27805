"""The gather kernel for sparse FFN activations (effml/kernels/sparse_ffn.py) equals the dense layer,
and its benchmark's code path runs (benchmarks/sparse_ffn.py)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from effml.kernels.sparse_ffn import GatherLinear, active_columns, gather_down, gather_down_union


def sparse(shape, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) >= sparsity)


@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (2, 5, 64), (1, 1, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_gather_paths_equal_the_dense_linear(shape, sparsity):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    h = sparse(shape, sparsity)
    dense = linear(h)
    gathered = GatherLinear(linear)
    for out in (gathered(h), gather_down(h, gathered.weight_t, gathered.bias),
                gather_down_union(h, gathered.weight_t, gathered.bias)):
        assert out.shape == dense.shape
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_only_the_active_rows_are_read():
    # a weight row the activations never touch may hold anything: the result does not change
    torch.manual_seed(0)
    linear = nn.Linear(16, 4)
    h = torch.zeros(3, 16)
    h[0, 2], h[2, 7] = 1.5, -2.0
    assert active_columns(h).tolist() == [2, 7]
    gathered = GatherLinear(linear)
    expected = gathered(h)
    gathered.weight_t[[0, 1, 3, 15]] = float("nan")
    assert torch.equal(gathered(h), expected)
    assert torch.equal(gather_down_union(h, gathered.weight_t, gathered.bias), expected)
    torch.testing.assert_close(expected, linear(h))


def test_gather_linear_saves_and_loads_as_the_linear_it_replaced():
    linear = nn.Linear(8, 3)
    gathered = GatherLinear(linear)
    state = gathered.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], linear.weight)
    other = GatherLinear(nn.Linear(8, 3))
    other.load_state_dict(linear.state_dict())
    assert torch.equal(other.weight_t, gathered.weight_t)
    fresh = nn.Linear(8, 3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, linear.weight)


def test_the_benchmark_writes_its_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("sparse_ffn", None)
    import sparse_ffn

    result = sparse_ffn.main(["--quick", "--device", "cpu", "--shapes", "minilm_l6", "--out", str(tmp_path)])
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".md"]
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["device"] == result["device"] and len(saved["cases"]) == 4
    assert all(c["max_rel_error"] < 1e-4 for c in saved["cases"])
    assert "gather speedup" in next(tmp_path.glob("*.md")).read_text()
