"""The whole top-k MoD layer forward as one function, for `torch.compile` (`model.fused_layer`).

The eager MoD layer (model/mod_layer.py) is router -> top-k -> gather -> TransformerLayer -> combine
-> aux losses, each step a handful of kernels; at capacity 12.5% the routed layer's matmuls are small
and those ~100 launches and memory passes are most of its time. `routed_forward` is the same math
written as one function of tensors, so the compiler fuses the router score into one reduction, the
gather into the first norm's loads, the rotary frequencies' gather into the rotation, the weighted
combine into one scatter, and the BCE aux losses (router and predictor) into a few kernels.

Same definitions as the eager path (and tested against it on CPU, tests/model/test_fused_layer.py):
router logits in fp32, k = ceil(c*S) tokens per sequence kept in their original order, output
x + r * (f(x_r) - x_r) on routed rows and x elsewhere, aux losses as sums over S*B tokens times
weight / (S*B), predictor on detached inputs.
"""
from __future__ import annotations

import torch

from mod_megatron.model.fused_layer import block
from mod_megatron.model.predictor import bce_sum, predictor_logits
from mod_megatron.model.router import gather_positions, topk_membership, topk_route


class _GatherRows(torch.autograd.Function):
    """routed = x[index] along dim 0 of x [S, B, H] (index [k, B] distinct per column), whose backward
    writes the routed rows' gradient into zeros with a plain indexed store: torch.gather's backward is
    a scatter-add, i.e. atomic adds, which are slow in bf16 and needless for distinct rows."""

    @staticmethod
    def forward(ctx, x, index):
        s, b, h = x.shape
        flat = (index * b + torch.arange(b, device=index.device)).reshape(-1)  # row of [S*B, H]
        ctx.save_for_backward(flat)
        ctx.shape = (s, b, h)
        return x.reshape(s * b, h).index_select(0, flat).view(*index.shape, h)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        s, b, h = ctx.shape
        out = grad.new_zeros(s * b, h)
        out[flat] = grad.reshape(-1, h)
        return out.view(s, b, h), None


def routed_forward(x, router_w, pred_params, params, rope, meta: tuple, routing: tuple):
    """One MoD layer on x [S, B, H] with top-k routing.

    router_w: [H]; pred_params: (fc1 weight, fc1 bias, fc2 weight, fc2 bias) or None; params/rope/meta:
    the TransformerLayer's (model/fused_layer.py), rope's tables per position [S, 1, 1, d]; routing: (capacity,
    router weight kind, router aux weight, predictor aux weight, run the predictor?, Triton top-k?) with a
    weight of 0 meaning "no such loss".
    Returns (output [S,B,H], aux loss or None, index [k,B], router weight [k,B], logits [S,B],
    predictor logits [S,B] or None); all but the output and the loss are detached.
    """
    capacity, weight_kind, router_loss_w, pred_loss_w, run_predictor, fused_topk = routing
    s, b, h = x.shape
    logits = (x.float() * router_w.float()).sum(-1)  # [S, B], fp32, one read of x
    chosen = topk_route(logits, capacity, weight_kind, fused_topk)
    index, r = chosen.index, chosen.weight
    rows = index.unsqueeze(-1).expand(*index.shape, h)
    xr = _GatherRows.apply(x, index)
    y = block(xr, params, rope and gather_positions(rope, index), meta)
    out = x.scatter(0, rows, xr + r.unsqueeze(-1).to(y.dtype) * (y - xr))

    loss, pred = None, None
    if router_loss_w > 0 or pred_loss_w > 0:
        target = topk_membership(index, s)
    if router_loss_w > 0:
        loss = bce_sum(logits, target) * (router_loss_w / (s * b))
    if run_predictor:
        pred = predictor_logits(x, *pred_params)
        if pred_loss_w > 0:
            term = bce_sum(pred, target) * (pred_loss_w / (s * b))
            loss = term if loss is None else loss + term
        pred = pred.detach()
    return out, loss, index, r.detach(), logits.detach(), pred
