"""MoE pieces of the per-layer specs and the TransformerConfig fields they need.

A MoE layer is the same layer spec as a dense (or MoD) layer with its `mlp` replaced by megatron-core's
local MoE spec (`get_gpt_layer_local_spec(num_experts=..., moe_grouped_gemm=False)`: MoELayer, the
alltoall dispatcher, SequentialMLP experts), whose router is `MoDERouter` and whose experts are
`GroupedExperts` (moe/grouped.py: megatron's SequentialMLP, its grads reduced over the
expert-data-parallel group as in moe/experts.py, its forward two grouped GEMMs where
`moe.grouped_gemm` allows). Dense, MoD, MoE, staged MoDE (MoD layer + MoE MLP) and integrated MoDE
(MoE MLP with no-op experts) models differ only in this per-layer list (mod_megatron/model/spec.py).
"""
from __future__ import annotations

import copy
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from mod_megatron.config import Config, ffn_hidden, is_moe_layer
from mod_megatron.moe.grouped import GroupedExperts
from mod_megatron.moe.router import MoDERouter


def moe_mlp_spec(cfg: Config) -> ModuleSpec:
    """megatron's local MoE MLP spec (no grouped GEMM, no shared experts) with the MoDE router and experts."""
    e = cfg.moe
    layer = get_gpt_layer_local_spec(num_experts=e.num_experts, moe_grouped_gemm=False,
                                     normalization=cfg.model.normalization)
    spec = copy.deepcopy(layer.submodules.mlp)
    spec.submodules.shared_experts = None
    spec.submodules.experts.module = GroupedExperts  # SequentialExperts with a grouped-GEMM forward
    spec.submodules.experts.params = {**(spec.submodules.experts.params or {}), "mode": e.grouped_gemm}
    spec.submodules.router = functools.partial(MoDERouter, noop_experts=e.noop_experts, noop_target=e.noop_target)
    return spec


def transformer_kwargs(cfg: Config) -> dict:
    """TransformerConfig fields of the MoE layers; {} for a model without them."""
    e, m = cfg.moe, cfg.model
    if e.num_experts == 0:
        return {}
    return dict(
        num_moe_experts=e.num_experts,  # real experts; the router adds the no-op ones
        moe_router_topk=e.topk,
        moe_ffn_hidden_size=e.ffn_hidden_size or ffn_hidden(m),
        expert_model_parallel_size=e.ep,
        # Experts are never tensor-parallel: with TP the EP ranks come from TP x DP (megatron's ETP=1
        # layout); gloo also cannot all-gather the uneven token counts expert-TP would need.
        expert_tensor_parallel_size=1,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_router_dtype="fp32",
        moe_router_score_function=e.score_function,
        moe_router_load_balancing_type="aux_loss" if e.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=e.aux_loss_coeff,
        moe_z_loss_coeff=e.z_loss_coeff or None,
        moe_router_enable_expert_bias=e.expert_bias,
        moe_router_bias_update_rate=e.bias_update_rate,
        moe_expert_capacity_factor=e.capacity_factor,
        moe_pad_expert_input_to_capacity=e.pad_to_capacity,
        # Per-layer pattern: tells megatron's dist-checkpointing the layers are not homogeneous.
        moe_layer_freq=[int(is_moe_layer(cfg, i)) for i in range(m.num_layers)],
    )
