"""A pre-LN layer's norm backward, with the residual stream's gradient added, as one Triton kernel.

In a pre-LN layer the norm's input h also goes on along the residual, so its gradient is two terms:
the one that comes down the residual (dres) and the norm's own,

    LayerNorm:  xhat = (h - mean) * rstd,  dh = dres + rstd * (w*dy - mean(w*dy * xhat) * xhat - mean(w*dy))
    RMSNorm:    xhat = h * rstd,           dh = dres + rstd * (w*dy - mean(w*dy * xhat) * xhat)
    dw = sum over rows of dy * xhat,       db = sum over rows of dy

(means over the row). Compiled by inductor, that was a row kernel for dh and column reductions for dw
and db that read dy and h again. Here one program walks a band of rows, a tile of rows at a time: it
writes each row's dh and keeps its band's dw and db in registers, stored once as an fp32 partial
[programs, N] that a small sum finishes. At the 368M layer's shape on an H100, the two norms of a layer
went from 238 to 207 us of kernels (docs/benchmarks.md, tenth session). Rows of up to MAX_N elements
fit one program's registers; model/fused_norm.py takes PyTorch's path beyond that.

The op is registered with `torch.library.triton_op`, so `torch.compile` keeps it inside the compiled
layer (and CUDA graphs capture it). This module imports triton: import it only on a CUDA path (or with
TRITON_INTERPRET=1 on a CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

MAX_N = 16384


@triton.jit
def _norm_residual_bwd_kernel(x_ptr, dy_ptr, dres_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
                              M, N, TILE: tl.constexpr, TILES: tl.constexpr, RMS: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """One band of TILES * TILE rows, TILE rows at a time (their loads in flight together)."""
    band = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    live = cols < N
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([TILE, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([TILE, BLOCK_N], dtype=tl.float32)
    for t in range(0, TILES):
        row = (band * TILES + t) * TILE + tl.arange(0, TILE)
        here = row < M  # the last band may be short
        on = here[:, None] & live[None, :]
        at = row.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + at, mask=on, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=on, other=0.0).to(tl.float32)  # 0 off the rows: adds nothing to dw, db
        dres = tl.load(dres_ptr + at, mask=on, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=here, other=0.0)[:, None]
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(on, (x - tl.load(mean_ptr + row, mask=here, other=0.0)[:, None]) * rstd, 0.0)
        wdy = w * dy
        c1 = (tl.sum(xhat * wdy, axis=1) / N)[:, None]
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - xhat * c1 - (tl.sum(wdy, axis=1) / N)[:, None]) * rstd
        tl.store(dx_ptr + at, (dx + dres).to(dx_ptr.dtype.element_ty), mask=on)
        dw += dy * xhat
        db += dy
    tl.store(dw_ptr + band * N + cols, tl.sum(dw, axis=0), mask=live)
    if not RMS:
        tl.store(db_ptr + band * N + cols, tl.sum(db, axis=0), mask=live)


def launch_config(m: int, n: int) -> tuple[int, int, int]:
    """(rows per tile, programs, warps) for m rows of n: tiles of 2048 elements (or one row), 4 warps up to
    that, 512 programs. In `benchmarks/bench_norm.py --sweep` on an H100 this was the best configuration,
    or within 0.3% of it, at the 368M and 1.3B layers' shapes (32768 x 1024, 16384 x 2048) and at the 368M
    routed layer's (4096 x 1024); tiles of 8192 or more elements were 1.3-15x slower
    (docs/data/norm-bwd-sweep-h100.txt)."""
    block = triton.next_power_of_2(n)
    tile = max(1, 2048 // block)
    return tile, 512, 4 if block * tile <= 2048 else 8


def launch(dy, x, dres, weight, mean, rstd, rms: bool, tile: int, programs: int, warps: int):
    """The kernel with an explicit launch configuration (the op below; benchmarks/bench_norm.py sweeps it)."""
    x, dy, dres = x.contiguous(), dy.contiguous(), dres.contiguous()  # the kernel addresses rows of n
    n = x.shape[-1]
    m = x.numel() // n
    row_tiles = triton.cdiv(m, tile)
    tiles = triton.cdiv(row_tiles, min(programs, row_tiles))  # tiles per band
    bands = triton.cdiv(m, tiles * tile)
    dx = torch.empty_like(x)
    dw = torch.empty(bands, n, device=x.device, dtype=torch.float32)
    db = dw if rms else torch.empty(bands, n, device=x.device, dtype=torch.float32)
    wrap_triton(_norm_residual_bwd_kernel)[(bands,)](
        x, dy, dres, weight, mean, rstd, dx, dw, db, m, n, TILE=tile, TILES=tiles, RMS=rms,
        BLOCK_N=triton.next_power_of_2(n), num_warps=warps)
    dw_sum = dw.sum(0).to(weight.dtype)
    return dx, dw_sum, torch.zeros_like(dw_sum) if rms else db.sum(0).to(weight.dtype)


@triton_op("mod_megatron::norm_residual_backward", mutates_args=())
def norm_residual_backward(dy: torch.Tensor, x: torch.Tensor, dres: torch.Tensor, weight: torch.Tensor,
                           mean: torch.Tensor, rstd: torch.Tensor, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dres + the norm's gradient of x, dw, db) for x, dy, dres [..., N] and contiguous mean, rstd [...]
    in fp32 (mean unused for RMSNorm; db is zeros then). dw and db come in the weight's dtype."""
    n = x.shape[-1]
    return launch(dy, x, dres, weight, mean, rstd, rms, *launch_config(x.numel() // n, n))
