"""Top-k selection in original order as one Triton kernel (kernels/routing.py has the dispatch).

A routed MoD layer keeps the k best-scored tokens of each sequence, listed in their original order.
In PyTorch that is `torch.topk` followed by `torch.sort` of the positions: two launches, and topk's
radix select alone took 19-26 us per layer on an H200 (docs/benchmarks.md). Here one program per
sequence (column b of scores [S, B]) holds the whole column in registers and

1. maps each fp32 score to an integer key with the same order (NaN counts as -inf, -0.0 as +0.0), so
   the threshold can be found exactly by a search on integers;
2. finds the k-th largest key t by cutting [-2^31, 2^31) in thirds: ROUNDS = 21 rounds, each counting the
   keys at or above both cuts in one reduction (two 16-bit counts packed in an int32), where halving took
   32 reductions, each a round of warp shuffles and a barrier (the kernel is latency-bound: B programs);
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
assert MAX_SEQ < 1 << 16, "counts of up to S keys are packed in 16-bit fields"
ROUNDS = 21  # thirds of a 2^32 range: the widest part after r cuts is at most max(w // 3, w - 2 * (w // 3))


@triton.jit
def _topk_in_order_kernel(scores_ptr, index_ptr, S, K, sc_s, sc_b, ix_s, ix_b, BLOCK_S: tl.constexpr,
                          ROUNDS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_S)
    live = pos < S
    x = tl.load(scores_ptr + pos.to(tl.int64) * sc_s + b * sc_b, mask=live, other=0.0).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: equal scores are ties
    bits = x.to(tl.int32, bitcast=True)
    # order-preserving int32 key: negative floats' magnitude bits flipped (NaN and padding never reach 2^31 - 1)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(live, key, -2147483648)  # padding lanes rank below every score (-inf is above this)
    lo = tl.full([], -2147483648, tl.int64)  # count(key >= lo) >= K always
    hi = tl.full([], 2147483648, tl.int64)  # count(key >= hi) == 0 < K always
    for _ in range(ROUNDS):  # [lo, hi) in thirds: two counts per round, packed in one int32 reduction
        third = tl.maximum((hi - lo) // 3, 1)
        m1, m2 = lo + third, lo + 2 * third
        t1 = tl.minimum(m1, 2147483647).to(tl.int32)  # no key is 2^31 - 1, so the clamp counts nothing
        t2 = tl.minimum(m2, 2147483647).to(tl.int32)
        packed = tl.sum((key >= t1).to(tl.int32) + ((key >= t2).to(tl.int32) << 16), axis=0)
        c1, c2 = packed & 65535, packed >> 16  # counts <= S <= MAX_SEQ < 2^16
        lo_new = tl.where(c2 >= K, m2, tl.where(c1 >= K, m1, lo))
        hi = tl.where(c2 >= K, hi, tl.where(c1 >= K, m2, m1))
        lo = lo_new
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
                                            index.stride(0), index.stride(1), BLOCK_S=block, ROUNDS=ROUNDS,
                                            num_warps=warps)
    return index
