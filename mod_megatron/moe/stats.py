"""Load-balance metrics of the MoE layers for TensorBoard (called by Trainer.routing_stats).

Each MoDERouter counts its routing decisions during training forwards since the last call (all
micro-batches of all steps in the log window). `moe_stats` sums the counts over the tensor x data
parallel ranks of this pipeline stage (one all-reduce), derives per layer

    moe/layerNN/noop_share            share of routing slots that picked a no-op expert (integrated MoDE)
    moe/layerNN/expert_max_over_mean  max / mean tokens per real expert (1.0 = perfectly balanced)
    moe/layerNN/ep_rank_max_over_mean max / mean tokens per expert-parallel rank (its experts' sum)
    moe/layerNN/expert_min_over_mean, ep_rank_min_over_mean   the same with min (0 = an idle expert/rank)
    moe/layerNN/dropped_share         picks of real experts dropped by the capacity (capacity_factor only)

and resets the counts. It is a collective: every rank of the stage must call it at the same step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mod_megatron.moe.router import MoDERouter


def moe_routers(chunks) -> list[MoDERouter]:
    """The MoE routers of this rank's model chunks, in layer order."""
    found = []
    for chunk in chunks:
        module = chunk
        while hasattr(module, "module"):  # DDP / Float16Module wrappers
            module = module.module
        found += [m for m in module.modules() if isinstance(m, MoDERouter)]
    return found


def _counts(router: MoDERouter, device) -> torch.Tensor:
    """[assigned (E total) | kept (n) | padded (n) | tokens (1)] as one float64 vector."""
    n, e = router.num_real_experts, router.config.num_moe_experts
    s = router.stats
    if not s:
        return torch.zeros(e + 2 * n + 1, dtype=torch.float64, device=device)
    return torch.cat([s["assigned"], s["kept"], s["padded"], s["tokens"]]).to(device)


def moe_stats(chunks) -> dict:
    """Per-layer imbalance and no-op share since the last call (a collective over the stage's tp x dp)."""
    routers = moe_routers(chunks)
    if not routers:
        return {}
    device = routers[0].weight.device
    vecs = [_counts(r, device) for r in routers]
    flat = torch.cat(vecs)
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        group = ps.get_tensor_and_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
    out = {}
    offset = 0
    for router, vec in zip(routers, vecs):
        n, e = router.num_real_experts, router.config.num_moe_experts
        c = flat[offset:offset + vec.numel()]
        offset += vec.numel()
        assigned, kept = c[:e], c[e:e + n]
        router.reset_stats()
        if c[-1] == 0:  # no training forward in this window
            continue
        ep = ps.get_expert_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        per_rank = kept.reshape(ep, n // ep).sum(1)
        key = f"moe/layer{router.layer_number:02d}"
        out[f"{key}/expert_max_over_mean"] = _ratio(kept, torch.max)
        out[f"{key}/ep_rank_max_over_mean"] = _ratio(per_rank, torch.max)
        out[f"{key}/expert_min_over_mean"] = _ratio(kept, torch.min)
        out[f"{key}/ep_rank_min_over_mean"] = _ratio(per_rank, torch.min)
        if router.noop_experts:
            out[f"{key}/noop_share"] = (assigned[n:].sum() / assigned.sum().clamp(min=1)).item()
        if router.capacity_factor is not None:
            out[f"{key}/dropped_share"] = (1 - kept.sum() / assigned[:n].sum().clamp(min=1)).item()
    return out


def _ratio(x: torch.Tensor, reduce) -> float:
    mean = x.mean()
    return (reduce(x) / mean).item() if mean > 0 else 1.0
