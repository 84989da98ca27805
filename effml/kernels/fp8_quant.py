"""Row-wise fp8 (e4m3) quantization of activations in one pass over memory (Triton, CUDA only).

``Fp8Linear`` quantizes its input at every call: one scale per row (token) mapping the row's largest
magnitude to e4m3's 448, then the row divided by it and rounded. Eager PyTorch takes four passes
(abs, amax, divide, cast); ``torch.compile`` fuses them but puts dynamo's guards on every call, and
once a run has recompiled past dynamo's cache limit it silently falls back to eager. Measured on an
H200 (torch 2.11, Triton 3.6) for 65536 rows: eager 0.53 ms (1024 wide) / 1.91 ms (4096 wide), compiled
0.16 / 0.46 ms, this kernel 0.053 / 0.19 ms, the memory floor (read bf16, write fp8) 0.047 / 0.19 ms,
against a bf16 matmul of 0.75 / 0.80 ms. It computes what ``library._quantize_rows`` does (scale =
amax × (1/448), values times the scale's IEEE reciprocal, round to nearest e4m3); the GPU test checks the
two agree. With ``gelu=True`` the row is first passed through the exact (erf) GELU and rounded to
its own dtype, as ``F.gelu`` would hand it on: a BERT FFN's down-projection then reads the
up-projection's output once instead of three times (GELU's read and write, then the quantization's
read). ``layer_norm_quantize`` does the same for a LayerNorm: its output and that output's fp8 form
in one pass (``effml.kernels.fusion.Fp8LayerNorm``).

Imported only on CUDA: the CPU wheel of PyTorch ships without Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

INV_E4M3_MAX = tl.constexpr(1.0 / 448.0)  # 448: the largest finite float8_e4m3fn value
INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, x_row_stride,
                          BLOCK_COLS: tl.constexpr, ROWS: tl.constexpr, GELU: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
    if GELU:  # PyTorch's formula in fp32, then rounded to the input's dtype as F.gelu returns it
        f = x.to(tl.float32)
        x = (0.5 * f * (1.0 + tl.math.erf(f * INV_SQRT2))).to(x.dtype)
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) * INV_E4M3_MAX, 1e-12)
    q = (x * tl.div_rn(1.0, scale)[:, None]).to(tl.float8e4nv)  # one IEEE division a row, not an element
    tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], q, mask=inside)
    tl.store(scale_ptr + rows, scale, mask=rows < n_rows)


@triton.jit
def _layer_norm_quantize_kernel(x_ptr, w_ptr, b_ptr, y_ptr, q_ptr, scale_ptr, n_rows, n_cols, eps, x_row_stride,
                                BLOCK_COLS: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(inside, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = (centered * rstd[:, None] * w[None, :] + b[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y, mask=inside)
    y = y.to(tl.float32)  # the output as the next layer reads it, quantized
    scale = tl.maximum(tl.max(tl.abs(y), axis=1) * INV_E4M3_MAX, 1e-12)
    q = (y * tl.div_rn(1.0, scale)[:, None]).to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], q, mask=inside)
    tl.store(scale_ptr + rows, scale, mask=rows < n_rows)


def layer_norm_quantize(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.layer_norm`` of ``rows`` (n, k) over k, in ``out_dtype``, and that output quantized as
    :func:`quantize_rows` would: (output, e4m3 values, fp32 scales), one pass over memory."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n, k = rows.shape
    y = torch.empty((n, k), device=rows.device, dtype=out_dtype)
    q = torch.empty((n, k), device=rows.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((n, 1), device=rows.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)

    def launch(per_program: int, warps: int) -> None:
        _layer_norm_quantize_kernel[(triton.cdiv(n, per_program),)](
            rows, weight, bias, y, q, scale, n, k, eps, rows.stride(0), BLOCK_COLS=block, ROWS=per_program,
            num_warps=warps)

    _launch_tuned(("layer_norm", k, rows.dtype, out_dtype, n.bit_length()), launch, block)
    return y, q, scale


def quantize_rows(rows: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (n, k) → (e4m3 values (n, k), fp32 scales (n, 1)); the same as ``library._quantize_rows``
    (of ``F.gelu(rows)`` with ``gelu``)."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n, k = rows.shape
    q = torch.empty((n, k), device=rows.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((n, 1), device=rows.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)

    def launch(per_program: int, warps: int) -> None:
        _quantize_rows_kernel[(triton.cdiv(n, per_program),)](
            rows, q, scale, n, k, rows.stride(0), BLOCK_COLS=block, ROWS=per_program, GELU=gelu, num_warps=warps)

    _launch_tuned((k, gelu, rows.dtype, n.bit_length()), launch, block)  # rows bucketed by powers of two
    return q, scale


_TILES: dict[tuple, tuple[int, int]] = {}  # (kernel's shape key, rows bucket) → (rows a program, warps)


def _launch_tuned(key: tuple, launch, block: int) -> None:
    """``launch`` on the tile measured fastest for ``key`` (measured on the first call)."""
    if key not in _TILES:
        _TILES[key] = fastest_tile(launch, block)
    launch(*_TILES[key])


def fastest_tile(launch, block: int) -> tuple[int, int]:
    """Rows per program and warps, measured once per shape (``triton.testing.do_bench``): the best
    tile depends on the width and on the GELU's arithmetic. H200, 65536 rows: 1024 wide, 4 rows on
    8 warps 0.055 ms (1 on 16: 0.15); 4096 wide with GELU, 1 row on 4 warps 0.39 ms, 4 on 8 0.60 ms
    (fewer rows a program: more of them in flight); without GELU every tile is near the memory floor
    (0.19 ms)."""
    candidates = [(r, w) for r in (1, 2, 4, 8) for w in (4, 8, 16) if r * block <= 16384 and r * block >= 32 * w]
    candidates = candidates or [(1, 4)]
    return min(candidates, key=lambda tile: triton.testing.do_bench(lambda: launch(*tile), warmup=5, rep=20))
