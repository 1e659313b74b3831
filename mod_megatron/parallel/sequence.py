"""MoD routing under sequence parallelism: top-k over the whole sequence, tokens spread over TP ranks.

With sequence parallelism (SP) each of the `tp` tensor-parallel ranks holds a contiguous slice
[S/tp, B, H] of the hidden states, while MoD must pick the top k = ceil(c*S) tokens of the *whole*
sequence. The kept tokens are spread unevenly: one rank may own all of them, another none. The
layer runs in four steps, all with equal-size collectives over the TP group (gloo needs that):

1. scores: each rank scores its own tokens; the [S/tp, B] fp32 scores are all-gathered (no grad) so
   every rank computes the same global top-k index [k, B] (sorted, as without SP).
2. dispatch: the k kept tokens are laid out in order and padded at the end to k_pad, a multiple of tp.
   Each rank fills the rows of the kept tokens it owns (zeros elsewhere); a reduce-scatter sums these
   [k_pad, B, H] buffers (every row has exactly one owner, so the sum is exact) and hands rank r the
   r-th slice [k_pad/tp, B, H]: precisely the SP input layout the TransformerLayer expects.
3. block: megatron's TransformerLayer runs on that slice with SP as usual (all-gather before the QKV
   and FC1 projections, reduce-scatter after the output projections), with the kept tokens' RoPE
   frequencies at their original positions. The pad rows sit *after* all real tokens and attention is
   causal, so no real token attends to them: padding needs no mask. Their outputs are dropped.
4. combine: the residual branch f = out - in of the slice is all-gathered to [k_pad, B, H]; each
   rank adds r * f to the kept tokens it owns, with r from its own local scores (so the router's
   gradient is partial per rank; the router weight is marked `sequence_parallel`, and megatron's
   finalize_model_grads sums it over TP).

Backward mirrors it: the reduce-scatter's backward is an all-gather and vice versa. Per routed layer
and micro-batch this adds, on top of the block's own SP collectives over k_pad tokens, an all-gather of
S*B scores and a reduce-scatter plus an all-gather of k_pad*B*H (docs/parallel.md has the numbers).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from mod_megatron.model.router import router_weight, topk_route


def padded_capacity(k: int, tp: int) -> int:
    """k rounded up to a multiple of tp: every rank gets the same number of routed rows."""
    return -(-k // tp) * tp


def sequence_parallel_forward(layer, hidden_states: torch.Tensor, rotary_pos_emb=None, **kwargs):
    """MoDTransformerLayer.forward when `hidden_states` is this TP rank's slice [S/tp, B, H]."""
    from mod_megatron.model.router import gather_positions

    group = ps.get_tensor_model_parallel_group()
    tp, rank = group.size(), group.rank()
    s_local, b, h = hidden_states.shape

    # 1. scores of the local tokens; the global top-k from all of them.
    local_logits = layer.router(hidden_states)  # [S/tp, B] fp32, with grad
    logits = gather_from_sequence_parallel_region(local_logits.detach(), False, group)  # [S, B]
    routing = topk_route(logits, layer.capacity, layer.router_weight_kind)
    routing.local_logits = local_logits  # reused by the router's aux loss
    layer.last_routing = routing  # global index and logits (detached): for stats, like without SP
    index = routing.index  # [k, B], same on every rank
    k = index.shape[0]
    k_pad = padded_capacity(k, tp)

    # 2. dispatch: rows of the kept tokens this rank owns, zeros elsewhere; reduce-scatter assembles.
    first = rank * s_local
    owned = ((index >= first) & (index < first + s_local)).unsqueeze(-1)  # [k, B, 1]
    local_index = (index - first).clamp(0, s_local - 1).unsqueeze(-1).expand(k, b, h)
    mine = torch.where(owned, torch.gather(hidden_states, 0, local_index), 0.0)
    mine = _pad_rows(mine, k_pad)
    routed = reduce_scatter_to_sequence_parallel_region(mine, group)  # [k_pad/tp, B, H]

    # 3. the TransformerLayer on this rank's slice of the routed tokens.
    if rotary_pos_emb is not None:
        rotary_pos_emb = gather_positions(rotary_pos_emb, _pad_rows(index, k_pad, repeat_last=True))
    out, context = layer.transformer_block(routed, rotary_pos_emb, **kwargs)

    # 4. combine: every rank gets f for all kept tokens and updates the ones it owns.
    delta = gather_from_sequence_parallel_region(out - routed, True, group)[:k]  # [k, B, H]
    weight = router_weight(torch.gather(local_logits, 0, local_index[..., 0]), layer.router_weight_kind)
    update = torch.where(owned, weight.unsqueeze(-1).to(delta.dtype) * delta, 0.0)
    output = hidden_states + torch.zeros_like(hidden_states).scatter_add(0, local_index, update)
    return output, context


def _pad_rows(x: torch.Tensor, rows: int, repeat_last: bool = False) -> torch.Tensor:
    """x with extra rows at the end (zeros, or copies of the last row) up to `rows`."""
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    pad = x[-1:].expand(extra, *x.shape[1:]) if repeat_last else x.new_zeros(extra, *x.shape[1:])
    return torch.cat([x, pad], dim=0)


__all__ = ["sequence_parallel_forward", "padded_capacity"]
