"""The MoE router of every MoE / MoDE layer: megatron-core's TopKRouter, extended with no-op experts.

Integrated MoDE (docs/mode.md): each MoE layer has `num_experts` real experts and `noop_experts`
no-op experts. The router scores all E = num_experts + noop_experts of them and every token picks its
top-k like in any token-choice MoE. A pick of a no-op expert means "skip": that slot contributes zero
to the MLP output (the token keeps its residual), and it is removed from the routing map *before*
the dispatcher sees it, so it is neither permuted nor sent over the expert-parallel all-to-all. The
MoELayer itself is megatron's, built for the real experts only.

Balancing towards a target distribution t (the no-op experts share `noop_target`, the real experts
share the rest uniformly):
- aux loss: megatron's Switch loss E * sum_i f_i P_i, with P_i scaled by 1 / (E t_i), i.e.
  sum_i f_i P_i / t_i. It is 1 at f = P = t and its gradient pushes down the experts whose load f_i
  is high *relative to their target*. With no no-op experts t is uniform and the loss is megatron's.
- aux-loss-free expert bias: megatron's update (finalize_model_grads) moves each bias by
  sign(mean - count_i); the counts it accumulates here are count_i / (E t_i), whose mean is reached
  exactly when count_i is proportional to t_i.
- z-loss: megatron's, unchanged.

With capacity_factor set, megatron's drop (and optional pad) runs after the no-op experts are
removed, with the capacity of the real experts: ceil(tokens * topk * capacity_factor / num_experts).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping
from megatron.core.transformer.moe.router import TopKRouter


def target_distribution(num_experts: int, noop_experts: int, noop_target: float) -> list[float]:
    """Target share of routing slots per expert: real experts first, then the no-op experts."""
    if noop_experts == 0:
        return [1.0 / num_experts] * num_experts
    return [(1.0 - noop_target) / num_experts] * num_experts + [noop_target / noop_experts] * noop_experts


class MoDERouter(TopKRouter):
    """TopKRouter over real + no-op experts; returns probs and routing map of the real experts only."""

    def __init__(self, config, pg_collection=None, *, noop_experts: int = 0, noop_target: float = 0.0):
        self.num_real_experts = config.num_moe_experts
        routing_config = copy.copy(config)  # the router scores real and no-op experts
        routing_config.num_moe_experts = config.num_moe_experts + noop_experts
        routing_config.moe_expert_capacity_factor = None  # applied below, to the real experts only
        super().__init__(config=routing_config, pg_collection=pg_collection)
        self.noop_experts = noop_experts
        self.noop_target = noop_target
        self.capacity_factor = config.moe_expert_capacity_factor
        self.pad_to_capacity = config.moe_pad_expert_input_to_capacity
        e = routing_config.num_moe_experts
        # 1 / (E * t_i): 1 for every expert when there are no no-op experts (megatron's uniform target).
        self._target_scale = [1.0 / (e * t) for t in target_distribution(self.num_real_experts, noop_experts,
                                                                            noop_target)]
        self._target_scale_cache: dict = {}
        self.reset_stats()
        # Last forward, for tests and debugging: picks over real + no-op experts, and what was dispatched.
        self.last_assigned_map: Optional[torch.Tensor] = None  # [tokens, num_experts + noop_experts]
        self.last_routing_map: Optional[torch.Tensor] = None  # [tokens, num_experts], after drop/pad

    # ------------------------------------------------------------------ balancing towards the target
    def target_scale(self, like: torch.Tensor) -> torch.Tensor:
        """1 / (E t_i) per expert, fp32, on `like`'s device (made once per device)."""
        cached = self._target_scale_cache.get(like.device)
        if cached is None:
            cached = torch.tensor(self._target_scale, dtype=torch.float32, device=like.device)
            self._target_scale_cache[like.device] = cached
        return cached

    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
        scaled = scores_for_aux_loss * self.target_scale(scores_for_aux_loss).to(scores_for_aux_loss.dtype)
        return super()._apply_aux_loss(probs, scaled, routing_map, with_padding_mask=with_padding_mask)

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        # Replaces TopKRouter._apply_expert_bias: the same accumulation, each count scaled by 1/(E t_i).
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & (~padding_mask).unsqueeze(-1)
                counts = routing_map.sum(dim=0).float() * self.target_scale(routing_map)
                self.local_tokens_per_expert += counts.to(self.local_tokens_per_expert.dtype)

    # ------------------------------------------------------------------ routing
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)  # over real + no-op
        assigned = routing_map.detach()
        n = self.num_real_experts
        # No-op picks are dropped here: they never reach the dispatcher (no permute, no all-to-all).
        probs, routing_map = probs[:, :n], routing_map[:, :n]
        if self.capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk, capacity_factor=self.capacity_factor,
                drop_policy=self.config.moe_token_drop_policy, pad_to_capacity=self.pad_to_capacity)
        probs, routing_map = probs.contiguous(), routing_map.contiguous()
        self.last_assigned_map, self.last_routing_map = assigned, routing_map.detach()
        if self.training and torch.is_grad_enabled():
            self._record(assigned, routing_map.detach())
        return probs, routing_map

    # ------------------------------------------------------------------ statistics (mod_megatron.moe.stats)
    def reset_stats(self) -> None:
        """Counts since the last reset: picks per expert (real + no-op), kept and padded slots per real expert."""
        self.stats: dict[str, torch.Tensor] = {}

    def _record(self, assigned: torch.Tensor, kept: torch.Tensor) -> None:
        n = self.num_real_experts
        picked_real = assigned[:, :n]
        new = {"assigned": assigned.sum(0).double(),            # [E]: every pick, before capacity
               "kept": (kept & picked_real).sum(0).double(),     # [n]: picks that reach their expert
               "padded": (kept & ~picked_real).sum(0).double(),  # [n]: pad slots (drop-and-pad only)
               "tokens": torch.tensor([float(assigned.shape[0])], dtype=torch.float64, device=assigned.device)}
        for key, value in new.items():
            self.stats[key] = self.stats[key] + value if key in self.stats else value
