"""Dense blocks in sparse conv masks: the Regroup of structurally sparse lottery tickets (issue 22).

Chen et al., "Coarsening the Granularity: Towards Structurally Sparse Lottery Tickets" (ICML 2022,
arXiv 2202.04736), §3.2 "IMP-Regroup": reorder the rows and columns of each layer's unstructured
mask so that the survivors form dense blocks, refill the blocks and drop everything outside them.
The paper partitions a hypergraph (each column a hyperedge over the rows it has survivors in) with
hMETIS; hMETIS is not installable here (no package in the lock), so effml uses a stated
approximation:

- **partitioner:** recursive *spectral* bisection of the row–column bipartite graph (the spectral
  co-clustering of Dhillon, KDD 2001: the second left singular vector of D_r^-1/2 A D_c^-1/2 orders
  the rows, which are split in two at the balanced point, and each half again), giving ``parts``
  balanced row groups of similar column support, as hMETIS's balanced k-way partition does;
- **columns:** the input channels (whole k×k kernels), not the code's im2col entries, so that every
  block runs as one small dense convolution; a row group keeps its input channels of most
  survivors, as many as its survivors would fill (survivors / (rows × k×k), rounded), the way
  Refill counts channels, so a level keeps about IMP's number of weights.

``BlockConv2d`` runs such a layer as its dense blocks: each block gathers its input channels, runs a
dense conv with its (rows × columns × k × k) weight and writes its rows of the output; rows in no
block output zero, exactly as the masked layer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Block = tuple[Tensor, Tensor]  # (output rows, input channels), int64 index tensors


def spectral_order(support: Tensor) -> Tensor:
    """The rows of a 0/1 matrix ordered by the second left singular vector of its normalized
    bipartite adjacency (Dhillon 2001); rows of similar column support end up next to each other."""
    rows = support.sum(1).clamp_min(1e-12).rsqrt()
    cols = support.sum(0).clamp_min(1e-12).rsqrt()
    u, _, _ = torch.linalg.svd(rows[:, None] * support * cols[None, :], full_matrices=False)
    if u.shape[1] < 2:
        return torch.arange(support.shape[0])
    z = u[:, 1] * rows
    z = z * torch.sign(z[z.abs().argmax()])  # the SVD's sign is arbitrary: fix it
    return torch.sort(z, stable=True).indices


def round_to(n: float, multiple: int, limit: int) -> int:
    """``n`` to the nearest multiple of ``multiple`` (at least one multiple), at most ``limit``."""
    return int(min(limit, max(multiple, multiple * round(n / multiple))))


def bisect(support: Tensor, parts: int, multiple: int = 1) -> list[Tensor]:
    """``parts`` balanced groups of row indices of ``support`` (recursive spectral bisection), each
    group's size a multiple of ``multiple`` where the rows allow (fewer groups where they don't)."""
    rows = support.shape[0]
    if parts <= 1 or rows < 2 * multiple:
        return [torch.arange(rows)]
    order = spectral_order(support)
    left_parts = parts // 2
    split = round_to(rows * left_parts / parts, multiple, rows - multiple)
    groups = []
    for half, k in ((order[:split], left_parts), (order[split:], parts - left_parts)):
        groups += [half[g] for g in bisect(support[half], k, multiple)]
    return groups


def regroup_mask(mask: Tensor, parts: int, multiple: int = 1) -> Tensor:
    """A conv weight's unstructured 0/1 mask (out, in, kh, kw) regrouped into at most ``parts`` dense
    blocks: row groups by ``bisect``, each with its input channels of most survivors; rows per group
    and columns per block rounded to ``multiple`` where the layer allows (small convs of odd widths
    are slow on CPU kernels with blocked layouts)."""
    kernel = mask.flatten(2).sum(2)  # survivors per (row, input channel)
    per_kernel = mask[0, 0].numel()
    alive = torch.where(kernel.sum(1) > 0)[0]
    out = torch.zeros_like(mask)
    if alive.numel() == 0:
        return out
    for group in bisect((kernel[alive] > 0).float(), min(parts, alive.numel()), multiple):
        rows = alive[group]
        count = round_to(float(kernel[rows].sum()) / (len(rows) * per_kernel), multiple, kernel.shape[1])
        cols = torch.sort(kernel[rows].sum(0), descending=True, stable=True).indices[:count]
        out[rows[:, None], cols[None, :]] = 1
    return out


def blocks_of(weight: Tensor) -> list[Block]:
    """The dense blocks of a block-structured conv weight: rows with the same nonzero input channels
    form one block (rows with none are in no block). Exact for any weight, block-structured or not."""
    support = weight.detach().flatten(2).ne(0).any(2)  # (out, in)
    patterns: dict[bytes, list[int]] = {}
    for row in range(support.shape[0]):
        if support[row].any():
            patterns.setdefault(bytes(support[row].tolist()), []).append(row)
    return [(torch.tensor(rows), torch.where(support[rows[0]])[0]) for rows in patterns.values()]


def blockable(module: nn.Module) -> bool:
    """A conv that ``BlockConv2d`` can run: 2-d, groups=1, numeric zero padding."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str)
            and module.padding_mode == "zeros")


class BlockConv2d(nn.Module):
    """A conv layer run as its dense blocks (gathered input channels, one dense conv per block)."""

    def __init__(self, conv: nn.Conv2d, blocks: list[Block]):
        super().__init__()
        if not blockable(conv):
            raise ValueError("BlockConv2d takes a conv with groups=1 and numeric zero padding")
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.kernel_size = conv.kernel_size
        weight = conv.weight.detach()
        self.weights = nn.ParameterList([nn.Parameter(weight[rows][:, cols].clone()) for rows, cols in blocks])
        for i, (rows, cols) in enumerate(blocks):
            self.register_buffer(f"rows_{i}", rows.clone())
            self.register_buffer(f"cols_{i}", cols.clone())
        self.full = [len(cols) == self.in_channels for _, cols in blocks]  # all input channels: no gather
        rows = torch.cat([r for r, _ in blocks]) if blocks else torch.zeros(0, dtype=torch.long)
        # blocks' rows cover every output: concatenate, then one gather puts the rows in order
        self.covers = len(rows) == self.out_channels
        self.register_buffer("order", torch.argsort(rows) if self.covers else rows)
        self.identity = self.covers and torch.equal(rows, torch.arange(self.out_channels))
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def block_weights(self) -> int:
        return sum(w.numel() for w in self.weights)

    def forward(self, x: Tensor) -> Tensor:
        parts = [F.conv2d(x if self.full[i] else x.index_select(1, getattr(self, f"cols_{i}")), weight, None,
                          self.stride, self.padding, self.dilation) for i, weight in enumerate(self.weights)]
        if self.covers:
            out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            out = out if self.identity else out.index_select(1, self.order)
        else:  # rows in no block output zero
            size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                    zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride, strict=True)]
            out = x.new_zeros(x.shape[0], self.out_channels, *size)
            for i, part in enumerate(parts):
                out.index_copy_(1, getattr(self, f"rows_{i}"), part)
        if self.bias is not None:
            out = out + self.bias[None, :, None, None]
        return out

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{tuple(w.shape[:2])}" for w in self.weights)
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, blocks=[{shapes}]"


def to_blocks(model: nn.Module, names: list[str]) -> dict[str, list[Block]]:
    """Replace each named conv (groups=1) of ``model`` by a ``BlockConv2d`` of its weight's blocks,
    in place; returns the blocks per layer."""
    found = {}
    for name in names:
        conv = model.get_submodule(name)
        if not blockable(conv):
            continue
        found[name] = blocks_of(conv.weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, BlockConv2d(conv, found[name]))
    return found
