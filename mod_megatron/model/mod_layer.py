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

from mod_megatron.model.predictor import (
    Predictor, attach_aux_loss, bce_sum, confusion, install_aux_loss_scale)
from mod_megatron.model.router import Router, Routing, causal_route, topk_membership, topk_route

install_aux_loss_scale()  # megatron's schedules then scale the aux losses like the LM loss
ROUTING_MODES = ("topk", "causal-router", "causal-predictor")


class MoDTransformerLayer(TransformerLayer):
    """TransformerLayer with an expert-choice top-k router in front of it."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection=None, vp_stage: Optional[int] = None, *, capacity: float = 0.125,
                 router_weight: str = "sigmoid", router_init_std: float = 0.02, aux_loss_weight: float = 0.0,
                 predictor: bool = False, predictor_loss_weight: float = 1.0):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        self.capacity = capacity
        self.router_weight_kind = router_weight
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.router = Router(config.hidden_size, router_init_std, device=device,
                             dtype=config.params_dtype, sequence_parallel=config.sequence_parallel)
        self.last_routing: Optional[Routing] = None  # kept for aux losses and logging
        # Causal routing for sampling (model/predictor.py, docs/inference.md).
        self.aux_loss_weight = aux_loss_weight  # router BCE on top-k membership; 0 = off
        self.predictor_loss_weight = predictor_loss_weight
        self.predictor = Predictor(config.hidden_size, device=device, dtype=config.params_dtype) if predictor else None
        self.routing_mode = "topk"  # one of ROUTING_MODES; causal modes are for evaluation/sampling
        self.last_aux: dict = {}  # detached aux-loss values and confusion counts of the last forward

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
        if self.predictor is not None:
            parts = make_sharded_tensors_for_checkpoint(dict(self.predictor.named_parameters()), "",
                                                        sharded_offsets=())
            for name, tensor in parts.items():
                tensor.key = f"{prefix}predictor.layer{self.layer_number}.{name}"
                sd[f"{prefix}predictor.{name}"] = tensor
        return sd

    def route(self, hidden_states: torch.Tensor) -> Routing:
        logits = self.router(hidden_states)
        if self.routing_mode == "topk":
            return topk_route(logits, self.capacity, self.router_weight_kind)
        return causal_route(logits, self.causal_decision(hidden_states, logits), self.router_weight_kind)

    def causal_decision(self, hidden_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[S, B] bool, per token and from that token alone: route it in a causal mode?"""
        if self.routing_mode == "causal-router":
            return logits > 0  # sigmoid(logit) > 0.5
        if self.routing_mode == "causal-predictor":
            if self.predictor is None:
                raise ValueError("routing mode causal-predictor needs a model trained with mod.predictor=true")
            return self.predictor(hidden_states) > 0
        raise ValueError(f"unknown routing mode {self.routing_mode!r}; choose from {', '.join(ROUTING_MODES)}")

    def forward(self, hidden_states: torch.Tensor, *args, rotary_pos_emb=None, **kwargs):
        if args:
            raise TypeError("MoDTransformerLayer takes its inputs as keyword arguments")
        if self.config.sequence_parallel:
            # hidden_states is this TP rank's slice of the sequence; top-k is over the whole sequence.
            from mod_megatron.parallel.sequence import sequence_parallel_forward

            if self.routing_mode != "topk":
                raise ValueError("causal routing modes run without sequence parallelism (parallel.sp=false)")
            output, context = sequence_parallel_forward(self, hidden_states, rotary_pos_emb, **kwargs)
            return self._with_aux_losses(output, hidden_states, self.last_routing, sp=True), context
        s, b, h = hidden_states.shape
        routing = self.route(hidden_states)
        self.last_routing = routing
        index = routing.index  # [k, B]
        k = index.shape[0]
        source = hidden_states
        if routing.valid is not None:  # causal routing: padded rows point at a dummy row S
            source = torch.cat([hidden_states, hidden_states.new_zeros(1, b, h)])

        gather_index = index.unsqueeze(-1).expand(k, b, h)
        routed = torch.gather(source, 0, gather_index)  # [k, B, H], original order kept
        if rotary_pos_emb is not None:
            rotary_pos_emb = _gather_rotary(rotary_pos_emb, index.clamp(max=s - 1))

        out, context = self.transformer_block(routed, rotary_pos_emb, **kwargs)
        delta = out - routed  # the residual branch f(x) of the routed tokens
        mixed = routed + routing.weight.unsqueeze(-1).to(delta.dtype) * delta
        output = source.scatter(0, gather_index, mixed)[:s]  # skipped tokens unchanged
        return self._with_aux_losses(output, hidden_states, routing), context

    def _with_aux_losses(self, output: torch.Tensor, hidden_states: torch.Tensor, routing: Routing,
                         sp: bool = False) -> torch.Tensor:
        """Keep router/predictor stats against top-k membership; in training attach their BCE losses.

        Both losses are means over the micro-batch's S*B tokens. Under sequence parallelism the router
        BCE sums over this rank's tokens (still divided by S*B) and the TP all-reduce of the router's
        grad completes the mean; the predictor sees the all-gathered (detached) whole sequence.
        """
        self.last_aux = {}
        if self.routing_mode != "topk":
            return output
        seq_len, batch = routing.logits.shape
        full_target = target = topk_membership(routing.index, seq_len)
        logits, pred_input = routing.logits, hidden_states
        if sp:  # this rank's slice of the sequence, with the router's gradient
            from megatron.core import parallel_state as ps
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            first = ps.get_tensor_model_parallel_rank() * hidden_states.shape[0]
            target = target[first:first + hidden_states.shape[0]]
            logits = self.router(hidden_states)
            if self.predictor is not None:
                pred_input = gather_from_sequence_parallel_region(hidden_states.detach(), False)
        norm = seq_len * batch
        router_bce = bce_sum(logits, target) / norm
        self.last_aux = {"router_bce": router_bce.detach(), "router_confusion": confusion(logits.detach() > 0, target)}
        loss = self.aux_loss_weight * router_bce if self.aux_loss_weight > 0 else None
        if self.predictor is not None:
            target = full_target
            pred = self.predictor(pred_input)
            pred_bce = bce_sum(pred, target) / norm
            self.last_aux.update(predictor_bce=pred_bce.detach(), predictor_confusion=confusion(pred.detach() > 0, target))
            if self.predictor_loss_weight > 0:
                term = self.predictor_loss_weight * pred_bce
                loss = term if loss is None else loss + term
        if loss is not None and self.training and torch.is_grad_enabled():
            output = attach_aux_loss(output, loss)
        return output

    def transformer_block(self, hidden_states: torch.Tensor, rotary_pos_emb=None, **kwargs):
        """The plain TransformerLayer forward (attention + MLP with their residuals) on routed tokens."""
        return super().forward(hidden_states=hidden_states, rotary_pos_emb=rotary_pos_emb, **kwargs)


def _gather_rotary(rotary_pos_emb, index: torch.Tensor):
    """Pick each routed token's rotary frequencies at its original position: [S,1,1,d] -> [k,B,1,d]."""
    if isinstance(rotary_pos_emb, tuple):
        return tuple(_gather_rotary(r, index) for r in rotary_pos_emb)
    freqs = rotary_pos_emb[:, 0, 0, :]  # [S, d]
    return freqs[index].unsqueeze(2)  # [k, B, 1, d]


def mod_layers(chunks) -> list:
    """The MoDTransformerLayers of these model chunks (DDP-wrapped or not), in order."""
    return [layer for chunk in chunks for layer in getattr(chunk, "module", chunk).decoder.layers
            if isinstance(layer, MoDTransformerLayer)]


def set_capacity(chunks, capacity: float) -> None:
    """Set every MoD layer's capacity (capacity warm-up changes it between steps, never within one)."""
    for layer in mod_layers(chunks):
        layer.capacity = capacity


def set_routing_mode(chunks, mode: str) -> None:
    """topk (training) | causal-router | causal-predictor, for every MoD layer."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; choose from {', '.join(ROUTING_MODES)}")
    for layer in mod_layers(chunks):
        layer.routing_mode = mode
