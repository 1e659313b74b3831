"""The whole top-k MoD layer forward as one function, for `torch.compile` (`model.fused_layer`).

The eager MoD layer (model/mod_layer.py) is router -> top-k -> gather -> TransformerLayer -> combine
-> aux losses, each step a handful of kernels; at capacity 12.5% the routed layer's matmuls are small
and those ~100 launches and memory passes are most of its time. `routed_forward` is the same math
written as one function of tensors, so the compiler fuses the router score into one reduction, the
gather into the first norm's loads, the rotary frequencies' gather into the rotation, the weighted
combine into one pass over [S, B, H], and the BCE aux losses (router and predictor) into a few kernels.
The gather and the combine are written as indexed loads by each position's slot (its row among the
routed ones, or -1), never as scatters, so that in the backward the three gradients of x (the
combine's pass-through, the routed rows' and the router score's) are one fused pass too, with no zero
fill (one routed layer at the 368M model's shape, fwd+bwd kernels profiled on H200s: 1.04 -> 1.00 ms).

Same definitions as the eager path (and tested against it on CPU, tests/model/test_fused_layer.py):
router logits in fp32, k = ceil(c*S) tokens per sequence kept in their original order, output
x + r * (f(x_r) - x_r) on routed rows and x elsewhere, aux losses as sums over S*B tokens times
weight / (S*B), predictor on detached inputs.
"""
from __future__ import annotations

import torch

from mod_megatron.model.fused_layer import block
from mod_megatron.model.predictor import bce_sum, kernel_applies, predictor_logits
from mod_megatron.model.router import gather_positions, topk_route


def _slots(index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """index [k, B] (distinct per column) -> slot [S, B]: j where index[j, b] = s, else -1."""
    k, b = index.shape
    rows = torch.arange(k, device=index.device).unsqueeze(1).expand(k, b)
    return torch.full((seq_len, b), -1, dtype=index.dtype, device=index.device).scatter(0, index, rows)


def _by_slot(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """rows [k, B, H] read back at each position's slot: [S, B, H] (garbage where slot is -1; mask it).
    An indexed load, which the compiler fuses into the pointwise kernel that consumes it."""
    return rows[slot.clamp(min=0), torch.arange(slot.shape[1], device=slot.device)]


class _GatherRows(torch.autograd.Function):
    """routed = x[index] along dim 0 of x [S, B, H]. Its backward is a masked indexed load,
    where(slot >= 0, grad[slot], 0), not a scatter into zeros: the compiler fuses it, the combine's
    and the router's gradients of x into one pass over [S, B, H] (no zero fill, no atomics)."""

    @staticmethod
    def forward(ctx, x, index, slot):
        s, b, h = x.shape
        flat = (index * b + torch.arange(b, device=index.device)).reshape(-1)  # row of [S*B, H]
        ctx.save_for_backward(slot)
        return x.reshape(s * b, h).index_select(0, flat).view(*index.shape, h)

    @staticmethod
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        return torch.where(slot.unsqueeze(-1) >= 0, _by_slot(grad, slot), 0), None, None


class _CombineRows(torch.autograd.Function):
    """out = x, except out[index] = xr + r * (y - xr); forward and backward each one pass over
    [S, B, H] (the routed rows read by slot), gradients of the k routed rows from a gather of grad."""

    @staticmethod
    def forward(ctx, x, xr, y, r, index, slot):
        mixed = xr + r.unsqueeze(-1).to(y.dtype) * (y - xr)
        ctx.save_for_backward(xr, y, r, index, slot)
        return torch.where(slot.unsqueeze(-1) >= 0, _by_slot(mixed, slot), x)

    @staticmethod
    def backward(ctx, grad):
        xr, y, r, index, slot = ctx.saved_tensors
        g = grad.gather(0, index.unsqueeze(-1).expand(*index.shape, grad.shape[-1])).float()  # [k, B, H]
        rr = r.unsqueeze(-1).float()
        grad_r = (g * (y.float() - xr.float())).sum(-1).to(r.dtype)
        grad_x = torch.where(slot.unsqueeze(-1) >= 0, 0, grad)
        return grad_x, ((1 - rr) * g).to(xr.dtype), (rr * g).to(y.dtype), grad_r, None, None


@torch.library.custom_op("mod_megatron::token_sum", mutates_args=())
def token_sum(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_t g[t] * x[t, :] for x [T, H], g [T] (one dtype): a [1, T] x [T, H] matmul, fp32 accumulation.
    An op of its own, which the compiler calls as written (cuBLAS), never rewrites into a reduction."""
    return g.unsqueeze(0).mm(x).squeeze(0)


@token_sum.register_fake
def _(x, g):
    return x.new_empty(x.shape[1])


class _RouterScore(torch.autograd.Function):
    """logits = x . w per token, in fp32 (one read of x). The weight's gradient, a sum over all S*B tokens,
    is one matrix-vector product (cuBLAS, fp32 accumulation) on the gradient rounded to x's dtype, as a
    linear layer's weight gradient is: a column reduction the compiler fused into the gradient's kernel
    read x at a third of the card's bandwidth (43 us per routed layer at the 368M shape on an H200)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (x.float() * w.float()).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = (grad.unsqueeze(-1) * w.float()).to(x.dtype)
        grad_w = token_sum(x.reshape(-1, x.shape[-1]), grad.reshape(-1).to(x.dtype)).view(w.shape)
        return grad_x, grad_w.to(w.dtype)


def routed_forward(x, router_w, pred_params, params, rope, meta: tuple, routing: tuple, fused_wgrads=None):
    """One MoD layer on x [S, B, H] with top-k routing.

    router_w: [H]; pred_params: (fc1 weight, fc1 bias, fc2 weight, fc2 bias) or None; params/rope/meta:
    the TransformerLayer's (model/fused_layer.py), rope's tables per position [S, 1, 1, d]; routing: (capacity,
    router weight kind, router aux weight, predictor aux weight, run the predictor?, Triton kernels for the
    top-k and the predictor?) with a weight of 0 meaning "no such loss"; fused_wgrads: as block's
    (model/fused_layer.py).
    Returns (output [S,B,H], aux loss or None, index [k,B], router weight [k,B], logits [S,B],
    predictor logits [S,B] or None); all but the output and the loss are detached.
    """
    capacity, weight_kind, router_loss_w, pred_loss_w, run_predictor, triton = routing
    s, b, h = x.shape
    pred = None
    if run_predictor and triton and kernel_applies(x, *pred_params[:2]):
        # router score and predictor from one read of x, both weight gradients from one GEMM
        from mod_megatron.kernels.predictor_triton import RouterAndPredictor

        logits, pred = RouterAndPredictor.apply(x.reshape(s * b, h).contiguous(), router_w, *pred_params)
        logits, pred = logits.view(s, b), pred.view(s, b)
    else:
        logits = _RouterScore.apply(x, router_w)  # [S, B], fp32, one read of x
    chosen = topk_route(logits, capacity, weight_kind, triton)
    index, r = chosen.index, chosen.weight
    slot = _slots(index, s)
    xr = _GatherRows.apply(x, index, slot)
    y = block(xr, params, rope and gather_positions(rope, index), meta, residual_gemm=False, fused_wgrads=fused_wgrads)
    out = _CombineRows.apply(x, xr, y, r, index, slot)

    loss = None
    if router_loss_w > 0 or pred_loss_w > 0:
        target = (slot >= 0).float()  # top-k membership
    if router_loss_w > 0:
        loss = bce_sum(logits, target) * (router_loss_w / (s * b))
    if run_predictor:
        if pred is None:
            pred = predictor_logits(x, *pred_params, fused=triton)
        if pred_loss_w > 0:
            term = bce_sum(pred, target) * (pred_loss_w / (s * b))
            loss = term if loss is None else loss + term
        pred = pred.detach()
    return out, loss, index, r.detach(), logits.detach(), pred
