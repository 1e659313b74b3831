"""The two data-movement ops around a routed layer, and the choice between PyTorch and Triton.

A MoD layer selects its tokens (`topk_positions`: top-k per sequence, in original order) and moves
them twice (docs/mod.md, model/mod_layer.py):

    gather   routed[j, b] = x[index[j, b], b]                               [S,B,H] -> [k,B,H]
    combine  out = x, except out[index[j, b], b] = x_r[j, b] + r[j, b] * (y[j, b] - x_r[j, b])
             with x_r = routed, the layer's input; y its output [k,B,H]     -> [S,B,H]

The router weight r scales only the residual branch y - x_r, so it belongs to the combine; the
gather is a plain copy. The functions below are the PyTorch reference (and the CPU path); with
`fused=True` they run the Triton kernels of kernels/routing_triton.py instead (one launch each way
plus a copy or a zero fill; gradients for x, y and r in one backward kernel), and the selection runs
kernels/topk_triton.py's one-launch top-k. `index` must hold distinct positions per column (top-k
routing), which is what lets the scatters go without atomics.

`use_fused(mode, x)` decides per forward: "off" never, "on" always (an error where it cannot),
"auto" when `x` is a CUDA tensor and triton imports. triton is imported only then, so on a CPU
machine importing the model never imports triton.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

FUSED_MODES = ("auto", "on", "off")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels import (triton installed and working)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import mod_megatron.kernels.routing_triton  # noqa: F401
    except Exception:  # a broken or CPU-only triton install: fall back to PyTorch
        return False
    return True


def use_fused(mode: str, x: torch.Tensor) -> bool:
    """Run the Triton kernels for this forward? (mod.fused_routing: auto | on | off)"""
    if mode == "off":
        return False
    if mode not in FUSED_MODES:
        raise ValueError(f"unknown fused_routing mode {mode!r}; choose from {', '.join(FUSED_MODES)}")
    ok = x.is_cuda and triton_available()
    if mode == "on" and not ok:
        why = "a CUDA tensor" if not x.is_cuda else "triton (pip install triton)"
        raise RuntimeError(f"mod.fused_routing=on needs {why}; use --mod.fused_routing=auto or off")
    return ok


def topk_positions(scores: torch.Tensor, k: int, fused: bool = False) -> torch.Tensor:
    """Positions [k, B] of the k highest scores in each column of scores [S, B], in increasing order.

    PyTorch: torch.topk, then a sort of the positions. fused: the one-launch Triton kernel of
    kernels/topk_triton.py (ties go to the earlier position, NaN ranks lowest) where S fits it."""
    if fused:
        from mod_megatron.kernels.topk_triton import MAX_SEQ, topk_in_order

        if scores.shape[0] <= MAX_SEQ:
            return topk_in_order(scores.detach(), k)
    index = torch.topk(scores.detach(), k, dim=0, sorted=False).indices
    return torch.sort(index, dim=0).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """x [S,B,H], index [k,B] -> the routed rows [k,B,H], in the order of `index`."""
    if fused:
        from mod_megatron.kernels.routing_triton import gather_rows

        return gather_rows(x, index)
    k, b = index.shape
    return torch.gather(x, 0, index.unsqueeze(-1).expand(k, b, x.shape[-1]))


def combine_tokens(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                   fused: bool = False, x_rows=None) -> torch.Tensor:
    """x [S,B,H] with rows `index` [k,B] replaced by x_r + weight * (y - x_r); y [k,B,H], weight [k,B].

    x_r = gather_tokens(x, index): pass it as `x_rows` when the caller has it already (the layer's
    input), else it is gathered here. Rows not in `index` are x's own values, bit for bit.
    """
    if x_rows is None:
        x_rows = gather_tokens(x, index, fused)
    if fused:
        from mod_megatron.kernels.routing_triton import combine_rows

        return combine_rows(x, x_rows, y, weight, index)
    k, b = index.shape
    mixed = x_rows + weight.unsqueeze(-1).to(y.dtype) * (y - x_rows)
    return x.scatter(0, index.unsqueeze(-1).expand(k, b, x.shape[-1]), mixed)
