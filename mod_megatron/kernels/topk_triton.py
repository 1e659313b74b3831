"""Top-k selection in original order as one Triton kernel (kernels/routing.py has the dispatch).

A routed MoD layer keeps the k best-scored tokens of each sequence, listed in their original order.
In PyTorch that is `torch.topk` followed by `torch.sort` of the positions: two launches, and topk's
radix select alone took 19-26 us per layer on an H200 (docs/benchmarks.md). Here one program per
sequence (column b of scores [S, B]) holds the whole column in registers and

1. maps each fp32 score to an integer key with the same order (NaN counts as -inf, -0.0 as +0.0), so
   the threshold can be found exactly by bisection on integers;
2. finds the k-th largest key t: 32 halvings of [0, 2^32), each one count of keys >= the midpoint;
3. keeps every key > t, and of the keys == t the earliest ones, as many as make k (ties go to the
   earlier position: one fixed rule, where torch.topk leaves ties unspecified);
4. writes the kept positions in increasing order with a running count (a cumsum) as the slot.

Exactly k positions are written for any input. S is limited to MAX_SEQ (one column in one program's
registers); longer sequences take the PyTorch path. The op is registered with `torch.library.triton_op`,
so `torch.compile` keeps it inside the compiled routed layer (and CUDA graphs capture it). This module
imports triton at import time: import it only on a CUDA path (or with TRITON_INTERPRET=1 on a CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

MAX_SEQ = 16384


@triton.jit
def _topk_in_order_kernel(scores_ptr, index_ptr, S, K, sc_s, sc_b, ix_s, ix_b, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_S)
    live = pos < S
    x = tl.load(scores_ptr + pos.to(tl.int64) * sc_s + b * sc_b, mask=live, other=0.0).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: equal scores are ties
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    # order-preserving integer key in [0, 2^32): negative floats reversed below the non-negative ones
    key = tl.where(bits >= 0, bits + 2147483648, -bits - 1)
    key = tl.where(live, key, -1)  # padding lanes rank below every score
    lo = tl.full([], 0, tl.int64)  # count(key >= lo) >= K always
    hi = tl.full([], 4294967296, tl.int64)  # count(key >= hi) == 0 < K always
    for _ in range(32):
        mid = (lo + hi) // 2
        enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = key > lo
    need = K - tl.sum(above.to(tl.int32), axis=0)
    tie = key == lo
    keep = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(index_ptr + slot.to(tl.int64) * ix_s + b * ix_b, pos.to(tl.int64), mask=keep)


@triton_op("mod_megatron::topk_in_order", mutates_args=())
def topk_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [S, B] -> int64 positions [k, B] of each column's k largest scores, increasing."""
    s, b = scores.shape
    index = torch.empty((k, b), dtype=torch.int64, device=scores.device)
    block = triton.next_power_of_2(s)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    wrap_triton(_topk_in_order_kernel)[(b,)](scores, index, s, k, scores.stride(0), scores.stride(1),
                                            index.stride(0), index.stride(1), BLOCK_S=block, num_warps=warps)
    return index
