"""Triton kernels for the MoD gather and combine (kernels/routing.py has the maths and the dispatch).

Each program handles one routed row (j, b) of the k*B rows and loops over the hidden size in blocks,
so a launch is k*B programs whatever H is. Routed positions are distinct per column (top-k), so
the scatters need no atomics. Arithmetic is fp32; results are stored in the tensors' dtype.

    gather   forward: routed[j,b] = x[p,b]                   backward: zeros, then gx[p,b] = g[j,b]
    combine  forward: out = copy of x; out[p,b] = xr + r*(y - xr)
             backward: gx = copy of g with gx[p,b] = 0;  gxr = (1-r)*g[p,b];  gy = r*g[p,b];
                       gr = sum_h g[p,b] * (y - xr)
with p = index[j, b]. This module imports triton at import time: import it only on a CUDA path
(or with TRITON_INTERPRET=1 for debugging on a CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, index_ptr, B, H, src_s, src_b, dst_s, dst_b,
                      GATHER: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # j * B + b
    j = row // B
    b = row % B
    pos = tl.load(index_ptr + row).to(tl.int64)
    if GATHER:
        src = src_ptr + pos * src_s + b * src_b
        dst = dst_ptr + j * dst_s + b * dst_b
    else:
        src = src_ptr + j * src_s + b * src_b
        dst = dst_ptr + pos * dst_s + b * dst_b
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        mask = offs < H
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _combine_fwd_kernel(out_ptr, xr_ptr, y_ptr, w_ptr, index_ptr, B, H, out_s, out_b, k_s, k_b,
                        BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = row // B
    b = row % B
    pos = tl.load(index_ptr + row).to(tl.int64)
    r = tl.load(w_ptr + row).to(tl.float32)
    out = out_ptr + pos * out_s + b * out_b
    xr = xr_ptr + j * k_s + b * k_b
    y = y_ptr + j * k_s + b * k_b
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        mask = offs < H
        xv = tl.load(xr + offs, mask=mask).to(tl.float32)
        yv = tl.load(y + offs, mask=mask).to(tl.float32)
        tl.store(out + offs, (xv + r * (yv - xv)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(g_ptr, gx_ptr, xr_ptr, y_ptr, w_ptr, index_ptr, gxr_ptr, gy_ptr, gw_ptr,
                        B, H, g_s, g_b, k_s, k_b, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = row // B
    b = row % B
    pos = tl.load(index_ptr + row).to(tl.int64)
    r = tl.load(w_ptr + row).to(tl.float32)
    g = g_ptr + pos * g_s + b * g_b
    gx = gx_ptr + pos * g_s + b * g_b
    xr = xr_ptr + j * k_s + b * k_b
    y = y_ptr + j * k_s + b * k_b
    gxr = gxr_ptr + j * k_s + b * k_b
    gy = gy_ptr + j * k_s + b * k_b
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        mask = offs < H
        gv = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(xr + offs, mask=mask, other=0.0).to(tl.float32)
        yv = tl.load(y + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx + offs, tl.zeros([BLOCK_H], dtype=tl.float32).to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gxr + offs, ((1.0 - r) * gv).to(gxr_ptr.dtype.element_ty), mask=mask)
        tl.store(gy + offs, (r * gv).to(gy_ptr.dtype.element_ty), mask=mask)
        acc += gv * (yv - xv)  # masked lanes are 0
    tl.store(gw_ptr + row, tl.sum(acc, axis=0))


def _launch_args(hidden: int) -> dict:
    block = min(triton.next_power_of_2(hidden), 2048)
    return {"BLOCK_H": block, "num_warps": 4 if block <= 1024 else 8}


def _check(x: torch.Tensor, index: torch.Tensor) -> None:
    if x.dim() != 3 or index.dim() != 2 or index.shape[1] != x.shape[1]:
        raise ValueError(f"expected x [S,B,H] and index [k,B], got {tuple(x.shape)} and {tuple(index.shape)}")


class GatherRows(torch.autograd.Function):
    """x [S,B,H], index [k,B] -> x's rows at `index`, [k,B,H]."""

    @staticmethod
    def forward(ctx, x, index):
        _check(x, index)
        x, index = x.contiguous(), index.contiguous()
        k, b = index.shape
        out = x.new_empty(k, b, x.shape[2])
        _copy_rows_kernel[(k * b,)](x, out, index, b, x.shape[2], x.stride(0), x.stride(1), out.stride(0),
                                    out.stride(1), GATHER=True, **_launch_args(x.shape[2]))
        ctx.save_for_backward(index)
        ctx.seq_len = x.shape[0]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        k, b, h = grad.shape
        gx = grad.new_zeros(ctx.seq_len, b, h)
        _copy_rows_kernel[(k * b,)](grad, gx, index, b, h, grad.stride(0), grad.stride(1), gx.stride(0),
                                    gx.stride(1), GATHER=False, **_launch_args(h))
        return gx, None


class CombineRows(torch.autograd.Function):
    """out = x with out[index] = x_rows + weight * (y - x_rows); gradients for x, x_rows, y and weight."""

    @staticmethod
    def forward(ctx, x, x_rows, y, weight, index):
        _check(x, index)
        if x_rows.shape != y.shape or y.shape != (*index.shape, x.shape[2]) or weight.shape != index.shape:
            raise ValueError(f"combine: x_rows {tuple(x_rows.shape)}, y {tuple(y.shape)} and weight "
                             f"{tuple(weight.shape)} do not fit index {tuple(index.shape)} and H={x.shape[2]}")
        x_rows, y, weight, index = (t.contiguous() for t in (x_rows, y, weight, index))
        out = x.contiguous().clone()
        k, b = index.shape
        _combine_fwd_kernel[(k * b,)](out, x_rows, y, weight, index, b, out.shape[2], out.stride(0), out.stride(1),
                                      y.stride(0), y.stride(1), **_launch_args(out.shape[2]))
        ctx.save_for_backward(x_rows, y, weight, index)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_rows, y, weight, index = ctx.saved_tensors
        grad = grad.contiguous()
        gx = grad.clone()
        g_rows, gy = torch.empty_like(x_rows), torch.empty_like(y)
        gw = torch.empty(index.shape, dtype=torch.float32, device=grad.device)
        k, b = index.shape
        _combine_bwd_kernel[(k * b,)](grad, gx, x_rows, y, weight, index, g_rows, gy, gw, b, grad.shape[2],
                                      grad.stride(0), grad.stride(1), y.stride(0), y.stride(1),
                                      **_launch_args(grad.shape[2]))
        return gx, g_rows, gy, gw.to(weight.dtype), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return GatherRows.apply(x, index)


def combine_rows(x: torch.Tensor, x_rows: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
    return CombineRows.apply(x, x_rows, y, weight, index)
