"""The MoD predictor MLP's forward (model/predictor.py) as one Triton kernel, its backward as one GEMM.

Every routed layer's predictor scores all T = S*B tokens: logit = w2 . gelu(W1 x + b1) + b2, with x [T, H]
detached (no gradient flows back into the model) and W1 [N, H], N = H/8. Written with F.linear that is two
narrow GEMMs each way, fc2's matrix-vector products with their split-K reductions, GeLU forward and
backward and the bias sums: about 15 kernels and 50 us at d=1024, T=8192 on an H100, a tenth of a routed
layer at capacity 12.5% (docs/benchmarks.md, twelfth session). Here:

forward   one program per (BT tokens, BN hidden units): pre = x W1^T + b1 over H in BK steps; it stores
          h = gelu(pre) and q = w2 * gelu'(pre) (x's dtype) for the backward, and this block's share of
          w2 . h for each token. The caller sums the shares [N/BN, T] (in a fixed order: no atomics).
backward  with g the logits' gradient, dpre = g * q row by row, so dW1 = (g * q)^T x is one cuBLAS GEMM,
          db1 = sum_t g * q, dw2 = sum_t g * h and db2 = sum_t g are column sums the compiler fuses.
          (A Triton kernel forming g * q on the fly inside the dW1 GEMM, tried first, was 2-6x slower
          than this on an H100.)

router    in the routed layer the router's score x . wr also reads every token; with `RouterAndPredictor`
          the forward kernel computes it from the same loads of x (fp32 products and sums, as
          model/fused_mod.py's `_RouterScore`), and the backward's GEMM gives the router's weight
          gradient as one more row, [g * q | g_router]^T x: two passes over [S, B, H] fewer per layer.

GeLU is the exact (erf) one, F.gelu's default. The forward is a `torch.library.triton_op`, so a compiled
routed layer keeps it and CUDA graphs capture it. This module imports triton: import it only on a CUDA
path (or with TRITON_INTERPRET=1 on a CPU); model/predictor.py holds the PyTorch reference and dispatch.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Launch shape: tokens per program, hidden units per program at most, input features per step, warps, stages.
FWD = {"BT": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
# Over 128 hidden units (H = 2048: 256), one program takes all of them, so x is read once: at T = 16,384
# tokens (x 67 MB, more than the L2 cache holds) 58 instead of 76 us on an H100, at T = 8,192 30 instead of
# 33 us; the best of 32 launch shapes swept at each size (docs/benchmarks.md, fifteenth session).
FWD_WIDE = {"BT": 64, "BN": 256, "BK": 128, "num_warps": 8, "num_stages": 3}
# x is read once per block of BN hidden units: at H = 4096 (512 units) the kernel was slower than F.linear
# on an H100 (212 vs 150 us per fwd+bwd), so model/predictor.py takes it for up to MAX_UNITS hidden units.
MAX_UNITS = 256


@triton.jit
def _predictor_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, h_ptr, q_ptr, part_ptr, wr_ptr, r_ptr, T, H, N,
                          BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ROUTER: tl.constexpr):
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    rt = pid_t * BT + tl.arange(0, BT)
    rn = pid_n * BN + tl.arange(0, BN)
    t_ok, n_ok = rt < T, rn < N
    x_rows = x_ptr + rt.to(tl.int64)[:, None] * H
    w_rows = w1_ptr + rn.to(tl.int64)[None, :] * H
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    score = tl.zeros((BT,), dtype=tl.float32)  # the router's logit x . wr, fp32 products and sums
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < H
        xa = tl.load(x_rows + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_rows + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # W1^T block
        acc = tl.dot(xa, wb, acc)
        if ROUTER:
            wr = tl.load(wr_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            score += tl.sum(xa.to(tl.float32) * wr[None, :], axis=1)
    if ROUTER:
        if pid_n == 0:
            tl.store(r_ptr + rt, score, mask=t_ok)
    pre = acc + tl.load(b1_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
    h = pre * cdf  # exact GeLU
    w2 = tl.load(w2_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    q = w2[None, :] * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)  # w2 * GeLU'(pre)
    out = rt.to(tl.int64)[:, None] * N + rn[None, :]
    both = t_ok[:, None] & n_ok[None, :]
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=both)
    tl.store(q_ptr + out, q.to(q_ptr.dtype.element_ty), mask=both)
    tl.store(part_ptr + pid_n * T + rt, tl.sum(h * w2[None, :], axis=1), mask=t_ok)


@triton_op("mod_megatron::predictor_fwd", mutates_args=())
def predictor_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  wr: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], w1 [N, H], b1 [N], w2 [N] (one dtype) -> (shares [ceil(N/BN), T] fp32 whose column sums
    are w2 . h, h = gelu(x W1^T + b1) [T, N], q = w2 * gelu'(x W1^T + b1) [T, N], both in x's dtype,
    the router's logits x . wr [T] fp32 from the same reads of x, or an empty tensor without wr [H])."""
    t, k = x.shape
    n = w1.shape[0]
    base = FWD_WIDE if n > FWD["BN"] else FWD
    cfg = dict(base, BN=min(base["BN"], max(16, triton.next_power_of_2(n))))
    h = torch.empty((t, n), dtype=x.dtype, device=x.device)
    q = torch.empty((t, n), dtype=x.dtype, device=x.device)
    parts = torch.empty((triton.cdiv(n, cfg["BN"]), t), dtype=torch.float32, device=x.device)
    router = torch.empty((t if wr is not None else 0,), dtype=torch.float32, device=x.device)
    wrap_triton(_predictor_fwd_kernel)[(triton.cdiv(t, cfg["BT"]), triton.cdiv(n, cfg["BN"]))](
        x, w1, b1, w2, h, q, parts, wr if wr is not None else w2, router, t, k, n, ROUTER=wr is not None, **cfg)
    return parts, h, q, router


class RouterAndPredictor(torch.autograd.Function):
    """(router logits x . wr, predictor logits) [T] fp32 for x [T, H] (contiguous) from one read of x; with
    wr None, the predictor alone (the router logits an empty tensor, no gradient for x).

    The forward is the kernel. The backward's one GEMM gives the weight gradients: dW1 = (g * q)^T x, and with
    the router [g_pred * q | g_router | 0]^T x (the zero columns keep the GEMM's operand rows 16-byte
    aligned). x's gradient is the router's alone, g_router wr (the predictor's input is detached)."""

    @staticmethod
    def forward(ctx, x, wr, w1, b1, w2, b2):
        parts, h, q, router = predictor_fwd(x, w1, b1, w2.reshape(-1), wr)
        ctx.save_for_backward(x, h, q, wr)
        return router, parts.sum(0) + b2.float()

    @staticmethod
    def backward(ctx, grad_router, grad_pred):
        x, h, q, wr = ctx.saved_tensors
        g = grad_pred.float().unsqueeze(1)
        dpre = (g * q.float()).to(x.dtype)  # the gradient of pre = x W1^T + b1, [T, N]
        db1 = dpre.float().sum(0).to(x.dtype)
        dw2 = (g * h.float()).sum(0).to(x.dtype).unsqueeze(0)
        db2 = g.sum().view(1).to(x.dtype)
        if wr is None:
            return None, None, dpre.t().mm(x), db1, dw2, db2
        n = q.shape[1]
        gr = grad_router.float().unsqueeze(1)
        pad = (-(n + 1)) % 8
        both = torch.cat([dpre, gr.to(x.dtype), dpre.new_zeros(dpre.shape[0], pad)], dim=1).t().mm(x)
        return (gr * wr.float()).to(x.dtype), both[n].to(wr.dtype), both[:n], db1, dw2, db2
