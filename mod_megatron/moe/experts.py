"""The experts of every MoE layer: megatron-core's SequentialMLP, its gradients reduced over expert groups.

Our experts are never tensor-parallel (expert TP = 1, mod_megatron/moe/spec.py). So with TP > 1 and
EP = 1 every TP rank holds all the experts, yet under sequence parallelism each rank routes only its
own slice of the sequence: the expert gradients are partial on each TP rank and must be summed over
all ranks that hold the same experts, megatron's expert-data-parallel group (at EP = 1: the TP x DP
ranks of a pipeline stage).

megatron-core 0.16.1 sends an expert parameter through that group only when it is marked
`allreduce = False`, and marks experts so only when `expert_model_parallel_size > 1`: it assumes that
at EP = 1 the experts are split over TP like a dense MLP (expert TP = TP). With our expert TP = 1 that
left the expert gradients reduced over DP only, i.e. not summed over TP (wrong gradients and grad norm).

`SequentialExperts` marks its parameters `allreduce = False` in every layout. Then megatron's DDP
reduces them over the expert-DP group (scaled by 1 / dp like every gradient), the optimizer keeps them
in its expert sub-optimizer and the grad norm counts each expert once, exactly as with EP > 1. Where
the expert-DP group equals the DP group (TP = 1, EP = 1) nothing changes numerically; what is gained
is one optimizer layout (dense + expert) for every MoE run, so a checkpoint resumes with any TP or EP.
"""
from __future__ import annotations

from megatron.core.transformer.moe.experts import SequentialMLP


class SequentialExperts(SequentialMLP):
    """megatron's SequentialMLP whose params are always reduced over the expert-data-parallel group."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        for param in self.parameters():
            param.allreduce = False
