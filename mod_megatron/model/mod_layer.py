"""A Mixture-of-Depths transformer layer: megatron-core's TransformerLayer, run on routed tokens only.

    x_out[t] = x[t] + r_t * f(x)[t]    for the k routed tokens t of each sequence
    x_out[t] = x[t]                    for the others (bit-identical: they skip the layer)

f is the layer's residual branch (attention + MLP, i.e. TransformerLayer(x) - x over the routed
tokens); the residual itself is never scaled or doubled. Routed tokens are gathered in their
original order and keep their original rotary positions, so skipped tokens add no keys/values and
causal attention among routed tokens is causal in the real sequence.

Everything megatron-core gives a layer (TP linears, dist-checkpoint sharding, the spec system) is
inherited; this class only adds the router and the gather/scatter around `TransformerLayer.forward`.
The top-k selection, the gather and the combine are kernels/routing.py's (Triton on CUDA,
`mod.fused_routing`). The top-k path has no host synchronisation (k is static: topk, sort, gather,
scatter), and the router/predictor diagnostics (`last_aux`) are computed only when read, e.g. by the
trainer at log steps.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from mod_megatron.kernels.routing import combine_tokens, gather_tokens, use_fused
from mod_megatron.model.compiled import run
from mod_megatron.model.fused_layer import (FusedTransformerLayer, layer_fused_wgrads, layer_meta, layer_params,
                                            rope_tables)
from mod_megatron.model.fused_mod import routed_forward
from mod_megatron.model.predictor import Predictor, attach_aux_loss, aux_stats, bce_sum, install_aux_loss_scale
from mod_megatron.model.router import (Router, Routing, causal_route, gather_positions,
                                      topk_membership, topk_route)

install_aux_loss_scale()  # megatron's schedules then scale the aux losses like the LM loss
ROUTING_MODES = ("topk", "causal-router", "causal-predictor")


class MoDTransformerLayer(FusedTransformerLayer):
    """TransformerLayer with an expert-choice top-k router in front of it.

    Where the fused path applies (model.fused_layer, model/fused_layer.py) a top-k forward is one
    compiled function (model/fused_mod.py); otherwise, and in the causal routing modes, it is the eager
    route -> gather -> TransformerLayer.forward -> combine below.
    """

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection=None, vp_stage: Optional[int] = None, *, capacity: float = 0.125,
                 router_weight: str = "sigmoid", router_init_std: float = 0.02, aux_loss_weight: float = 0.0,
                 predictor: bool = False, predictor_loss_weight: float = 1.0, fused_routing: str = "auto",
                 fused_layer: str = "auto", fused_wgrad: bool = False):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage,
                         fused_layer=fused_layer, fused_wgrad=fused_wgrad)
        self.capacity = capacity
        self.router_weight_kind = router_weight
        self.fused_routing = fused_routing  # auto | on | off: Triton top-k, gather/combine, predictor
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.router = Router(config.hidden_size, router_init_std, device=device,
                             dtype=config.params_dtype, sequence_parallel=config.sequence_parallel)
        self.last_routing: Optional[Routing] = None  # kept for aux losses and logging
        # Causal routing for sampling (model/predictor.py, docs/inference.md).
        self.aux_loss_weight = aux_loss_weight  # router BCE on top-k membership; 0 = off
        self.predictor_loss_weight = predictor_loss_weight
        self.predictor = Predictor(config.hidden_size, device=device, dtype=config.params_dtype) if predictor else None
        self.routing_mode = "topk"  # one of ROUTING_MODES; causal modes are for evaluation/sampling
        self._aux_inputs: Optional[dict] = None  # detached tensors of the last top-k forward, for last_aux
        self._aux_stats: Optional[dict] = None

    @property
    def last_aux(self) -> dict:
        """Aux-loss values and [tp, fp, fn, tn] counts of the causal decisions against top-k membership,
        of the last top-k forward ({} otherwise). Computed on first read from detached tensors kept by
        the forward, so a training step pays for them only when someone logs them."""
        if self._aux_stats is None and self._aux_inputs is not None:
            self._aux_stats = aux_stats(**self._aux_inputs)
        return self._aux_stats or {}

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
            return topk_route(logits, self.capacity, self.router_weight_kind, use_fused(self.fused_routing, logits))
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
            output = self._with_aux_losses(output, hidden_states, self.last_routing, sp=True)
            self.last_routing.local_logits = self.last_routing.local_logits.detach()  # see below
            return output, context
        if self.routing_mode == "topk" and self.use_fused(hidden_states, kwargs):
            return self._fused_forward(hidden_states, rotary_pos_emb), None
        s, b, h = hidden_states.shape
        routing = self.route(hidden_states)
        # Kept for stats and aux losses, detached: holding the autograd graph past the step would keep its
        # memory (and, for CUDA graphs, stale stream references of its nodes) alive.
        self.last_routing = dataclasses.replace(routing, weight=routing.weight.detach(), logits=routing.logits.detach())
        index = routing.index  # [k, B], k static for a given S and capacity
        source, fused = hidden_states, use_fused(self.fused_routing, hidden_states)
        if routing.valid is not None:  # causal routing: padded rows point at a dummy row S
            source, fused = torch.cat([hidden_states, hidden_states.new_zeros(1, b, h)]), False
            index_rope = index.clamp(max=s - 1)
        else:
            index_rope = index
        routed = gather_tokens(source, index, fused)  # [k, B, H], original order kept
        if rotary_pos_emb is not None:
            rotary_pos_emb = gather_positions(rotary_pos_emb, index_rope)

        out, context = self.transformer_block(routed, rotary_pos_emb, **kwargs)
        # routed + r * (out - routed) written back at `index`; skipped tokens unchanged
        output = combine_tokens(source, out, routing.weight, index, fused, x_rows=routed)
        if source is not hidden_states:
            output = output[:s]
        return self._with_aux_losses(output, hidden_states, routing), context

    def _fused_forward(self, hidden_states: torch.Tensor, rotary_pos_emb) -> torch.Tensor:
        """The top-k forward as one (compiled) function: the same outputs, losses and diagnostics."""
        pred_params = None if self.predictor is None else self.predictor.weights()
        seq_len = hidden_states.shape[0]
        routing = (self.capacity, self.router_weight_kind, *self._aux_weights(),
                   use_fused(self.fused_routing, hidden_states))
        output, loss, index, weight, logits, pred = run(
            routed_forward, self.fused_layer, hidden_states, self.router.weight, pred_params, layer_params(self),
            rope_tables(rotary_pos_emb, hidden_states.dtype), layer_meta(self), routing,
            layer_fused_wgrads(self, self.fused_wgrad), option="model.fused_layer")
        self.last_routing = Routing(index=index, weight=weight, logits=logits)
        self._aux_inputs = {"logits": logits, "index": index, "seq_len": seq_len, "first": 0, "pred": pred}
        self._aux_stats = None
        return output if loss is None else attach_aux_loss(output, loss)

    def _aux_weights(self) -> tuple:
        """(router BCE weight, predictor BCE weight, run the predictor?) for this forward. A weight is 0 when
        that loss is off (switched off, or not training); in evaluation the predictor still runs, for the
        diagnostics."""
        training = self.training and torch.is_grad_enabled()
        router_w = self.aux_loss_weight if training else 0.0
        pred_w = self.predictor_loss_weight if training and self.predictor is not None else 0.0
        return router_w, pred_w, self.predictor is not None and (pred_w > 0 or not training)

    def _with_aux_losses(self, output: torch.Tensor, hidden_states: torch.Tensor, routing: Routing,
                         sp: bool = False) -> torch.Tensor:
        """In training, attach the router and predictor BCE losses against top-k membership; keep
        detached inputs so `last_aux` can compute the diagnostics when asked.

        Both losses are means over the micro-batch's S*B tokens. Under sequence parallelism the router
        BCE sums over this rank's tokens (still divided by S*B) and the TP all-reduce of the router's
        grad completes the mean; the predictor sees the all-gathered (detached) whole sequence.
        """
        self._aux_inputs, self._aux_stats = None, None
        if self.routing_mode != "topk":
            return output
        seq_len, batch = routing.logits.shape
        norm = seq_len * batch
        first, logits = 0, routing.logits
        if sp:  # this rank's slice of the sequence, with the router's gradient
            from megatron.core import parallel_state as ps

            first = ps.get_tensor_model_parallel_rank() * hidden_states.shape[0]
            logits = routing.local_logits
        router_w, pred_w, run_predictor = self._aux_weights()
        target = topk_membership(routing.index, seq_len) if router_w > 0 or pred_w > 0 else None
        loss = pred = None
        if router_w > 0:
            loss = bce_sum(logits, target[first:first + logits.shape[0]]) * (router_w / norm)
        if run_predictor:
            pred_input = hidden_states
            if sp:
                from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

                pred_input = gather_from_sequence_parallel_region(hidden_states.detach(), False)
            pred = self.predictor(pred_input)
            if pred_w > 0:
                term = bce_sum(pred, target) * (pred_w / norm)
                loss = term if loss is None else loss + term
        self._aux_inputs = {"logits": logits.detach(), "index": routing.index, "seq_len": seq_len, "first": first,
                            "pred": None if pred is None else pred.detach()}
        if loss is not None:
            output = attach_aux_loss(output, loss)
        return output

    def transformer_block(self, hidden_states: torch.Tensor, rotary_pos_emb=None, **kwargs):
        """The plain TransformerLayer forward (attention + MLP with their residuals) on routed tokens."""
        if self.routing_mode != "topk":  # the routed count varies per batch: megatron's path, no per-shape compile
            return TransformerLayer.forward(self, hidden_states=hidden_states, rotary_pos_emb=rotary_pos_emb, **kwargs)
        return super().forward(hidden_states=hidden_states, rotary_pos_emb=rotary_pos_emb, **kwargs)


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
