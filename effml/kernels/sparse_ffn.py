"""The down-projection of an FFN whose activation is sparse, computed from the active rows only.

TEAL (Liu et al., "Training-Free Activation Sparsity in Large Language Models", 2024) and CATS (Lee et
al. 2024) time a custom GEMV at batch 1: with h = act(up(x)) mostly zero, down(h) = W_down h needs
only the columns of W_down (rows of its transpose) where h is nonzero. Two plain-PyTorch paths, no
loop over tokens:

- ``gather_down`` (``GatherLinear`` uses it): every row of h reads its own active rows of W_downᵀ and
  sums them weighted by its activations, all rows in one ``embedding_bag`` call (a gather that reduces
  as it reads: nothing is copied). Work grows with the total nonzeros, so b rows read b·(1 − s)·F
  weight rows where the dense GEMM reads F once: it pays at batch 1 and fades with the batch.
- ``gather_down_union``: the rows share one gather of the union of their nonzeros, ``index_select``
  of those rows of W_downᵀ, then one dense matmul. The copy costs as much as the saved reads at
  moderate sparsity, and the union is nearly everything after a few tokens.

``benchmarks/sparse_ffn.py`` times both against the dense FFN.

``GatherLinear`` holds the transposed weight contiguous (rows of W_downᵀ are read whole) and computes
what the ``nn.Linear`` it replaces computes, up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def active_columns(h: Tensor) -> Tensor:
    """Indices of the features that are nonzero in any row of h (..., F)."""
    return h.reshape(-1, h.shape[-1]).ne(0).any(0).nonzero().squeeze(1)


def gather_down(h: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """h (..., F) @ weight_t (F, H) + bias, reading for each row of h only the rows of weight_t where that
    row is nonzero: ``embedding_bag`` in ``sum`` mode weighted by the activations is exactly this
    gather-GEMV, for all rows at once (their nonzeros as one flat list, split by offsets)."""
    flat = h.reshape(-1, h.shape[-1])
    rows, cols = flat.nonzero(as_tuple=True)  # row-major: each row's nonzeros together, in order
    offsets = torch.zeros(flat.shape[0], dtype=torch.long, device=h.device)
    offsets[1:] = torch.bincount(rows, minlength=flat.shape[0]).cumsum(0)[:-1]
    out = F.embedding_bag(cols, weight_t, offsets, mode="sum", per_sample_weights=flat[rows, cols])
    if bias is not None:
        out = out + bias
    return out.reshape(*h.shape[:-1], weight_t.shape[1])


def gather_down_union(h: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """The same with one shared gather: the union of the rows' nonzero features (``index_select`` of
    those rows of weight_t, then one dense matmul). Copies the active rows first."""
    flat = h.reshape(-1, h.shape[-1])
    active = active_columns(flat)
    out = flat.index_select(1, active) @ weight_t.index_select(0, active)
    if bias is not None:
        out = out + bias
    return out.reshape(*h.shape[:-1], weight_t.shape[1])


class GatherLinear(nn.Module):
    """An inference-only ``nn.Linear`` for sparse inputs (``gather_down``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # parameters (frozen), so that counts of the model's parameters still see them
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> Tensor:  # what measurements of the model read as the layer's weight
        return self.weight_t.t()

    def forward(self, h: Tensor) -> Tensor:
        return gather_down(h, self.weight_t, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # saved as the nn.Linear it replaces (weight, bias): model.pt loads into the dense architecture
        destination[prefix + "weight"] = self.weight_t.t().contiguous()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "weight" in state_dict:
            with torch.no_grad():
                self.weight_t.copy_(state_dict[prefix + "weight"].t())
                if self.bias is not None:
                    self.bias.copy_(state_dict[prefix + "bias"])
        elif strict:
            missing_keys.append(prefix + "weight")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gather rows of active inputs"


def dense_ffn(x: Tensor, up: nn.Linear, act: nn.Module, down: nn.Linear) -> Tensor:
    return down(act(up(x)))


def sparse_ffn(x: Tensor, up: nn.Linear, act: nn.Module, down: GatherLinear) -> Tensor:
    return down(act(up(x)))


@torch.no_grad()
def time_ms(fn, *args, iters: int = 50, warmup: int = 5) -> float:
    """Median wall time of fn(*args) in milliseconds (synchronised on CUDA)."""
    import statistics
    import time

    cuda = any(isinstance(a, Tensor) and a.is_cuda for a in args)
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
