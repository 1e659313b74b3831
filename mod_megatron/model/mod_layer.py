"""A Mixture-of-Depths transformer layer: megatron-core's TransformerLayer, run on routed tokens only.

    x_out[t] = x[t] + r_t * f(x)[t]    for the k routed tokens t of each sequence
    x_out[t] = x[t]                    for the others (bit-identical: they skip the layer)

f is the layer's residual branch (attention + MLP, i.e. TransformerLayer(x) - x over the routed
tokens); the residual itself is never scaled or doubled. Routed tokens are gathered in their
original order and keep their original rotary positions, so skipped tokens add no keys/values and
causal attention among routed tokens is causal in the real sequence.

Everything megatron-core gives a layer (TP linears, dist-checkpoint sharding, the spec system) is
inherited; this class only adds the router and the gather/scatter around `TransformerLayer.forward`.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from mod_megatron.model.router import Router, Routing, topk_route


class MoDTransformerLayer(TransformerLayer):
    """TransformerLayer with an expert-choice top-k router in front of it."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection=None, vp_stage: Optional[int] = None, *, capacity: float = 0.125,
                 router_weight: str = "sigmoid", router_init_std: float = 0.02):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        self.capacity = capacity
        self.router_weight_kind = router_weight
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.router = Router(config.hidden_size, router_init_std, device=device,
                             dtype=config.params_dtype, sequence_parallel=config.sequence_parallel)
        self.last_routing: Optional[Routing] = None  # kept for aux losses and logging

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The router is saved per layer, not stacked along the layer axis like the other params.

        megatron-core stacks each layer parameter into one [num_layers, ...] tensor; only routed
        layers have a router, so its weight gets its own key with the global layer number.
        """
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        (tensor,) = make_sharded_tensors_for_checkpoint(
            {"weight": self.router.weight}, f"{prefix}router.", sharded_offsets=()).values()
        tensor.key = f"{prefix}router.layer{self.layer_number}.weight"
        sd[f"{prefix}router.weight"] = tensor
        return sd

    def route(self, hidden_states: torch.Tensor) -> Routing:
        return topk_route(self.router(hidden_states), self.capacity, self.router_weight_kind)

    def forward(self, hidden_states: torch.Tensor, *args, rotary_pos_emb=None, **kwargs):
        if args:
            raise TypeError("MoDTransformerLayer takes its inputs as keyword arguments")
        if self.config.sequence_parallel:
            # hidden_states is this TP rank's slice of the sequence; top-k is over the whole sequence.
            from mod_megatron.parallel.sequence import sequence_parallel_forward

            return sequence_parallel_forward(self, hidden_states, rotary_pos_emb, **kwargs)
        s, b, h = hidden_states.shape
        routing = self.route(hidden_states)
        self.last_routing = routing
        index = routing.index  # [k, B]
        k = index.shape[0]

        gather_index = index.unsqueeze(-1).expand(k, b, h)
        routed = torch.gather(hidden_states, 0, gather_index)  # [k, B, H], original order kept
        if rotary_pos_emb is not None:
            rotary_pos_emb = _gather_rotary(rotary_pos_emb, index)

        out, context = self.transformer_block(routed, rotary_pos_emb, **kwargs)
        delta = out - routed  # the residual branch f(x) of the routed tokens
        mixed = routed + routing.weight.unsqueeze(-1).to(delta.dtype) * delta
        output = hidden_states.scatter(0, gather_index, mixed)  # skipped tokens unchanged
        return output, context

    def transformer_block(self, hidden_states: torch.Tensor, rotary_pos_emb=None, **kwargs):
        """The plain TransformerLayer forward (attention + MLP with their residuals) on routed tokens."""
        return super().forward(hidden_states=hidden_states, rotary_pos_emb=rotary_pos_emb, **kwargs)


def _gather_rotary(rotary_pos_emb, index: torch.Tensor):
    """Pick each routed token's rotary frequencies at its original position: [S,1,1,d] -> [k,B,1,d]."""
    if isinstance(rotary_pos_emb, tuple):
        return tuple(_gather_rotary(r, index) for r in rotary_pos_emb)
    freqs = rotary_pos_emb[:, 0, 0, :]  # [S, d]
    return freqs[index].unsqueeze(2)  # [k, B, 1, d]
