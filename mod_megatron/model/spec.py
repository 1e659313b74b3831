"""Per-layer specs: dense, MoD, MoE and MoDE models differ only by this list.

`layer_specs(cfg)` returns one megatron-core `ModuleSpec` per layer of the whole model;
`block_spec(cfg, tcfg, ...)` slices it to the layers one pipeline stage builds, like
megatron-core's `get_gpt_decoder_block_spec` does for its own specs.
"""
from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mod_megatron.config import Config, is_moe_layer
from mod_megatron.model.attention import FusedRopeSelfAttention, SDPAttention
from mod_megatron.model.fused_layer import FusedTransformerLayer
from mod_megatron.model.mod_layer import MoDTransformerLayer
from mod_megatron.parallel.norm import SequenceParallelTorchNorm


def is_routed(cfg: Config, layer_index: int) -> bool:
    """Whether 0-based layer `layer_index` is a MoD (routed) layer."""
    mod = cfg.mod
    return mod.enabled and layer_index >= mod.first_routed and (layer_index - mod.first_routed) % mod.every == 0


def dense_layer_spec(cfg: Config) -> ModuleSpec:
    """megatron-core's local (TE-free) layer spec, with SDPA core attention unless asked otherwise, as a
    FusedTransformerLayer (model.fused_layer: the layer compiled as one function where it can be)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=cfg.model.normalization))
    spec.module = FusedTransformerLayer
    spec.params = dict(spec.params or {}, fused_layer=cfg.model.fused_layer, fused_wgrad=cfg.model.fused_wgrad)
    if cfg.model.attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        if cfg.model.position_embedding == "rope" and cfg.model.fused_rope != "off":
            spec.submodules.self_attention.module = FusedRopeSelfAttention
            spec.submodules.self_attention.params = dict(spec.submodules.self_attention.params or {},
                                                         fused_rope=cfg.model.fused_rope)
    if cfg.parallel.sp and spec.submodules.input_layernorm is WrappedTorchNorm:
        # megatron's torch norm refuses sequence parallelism; this one marks its params for it.
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return spec


def mod_layer_spec(cfg: Config) -> ModuleSpec:
    spec = dense_layer_spec(cfg)
    spec.module = MoDTransformerLayer
    spec.params = dict(spec.params or {}, capacity=cfg.mod.capacity, router_weight=cfg.mod.router_weight,
                       router_init_std=cfg.mod.router_init_std,
                       aux_loss_weight=cfg.mod.aux_loss_weight if cfg.mod.aux_loss else 0.0,
                       predictor=cfg.mod.predictor, predictor_loss_weight=cfg.mod.predictor_loss_weight,
                       fused_routing=cfg.mod.fused_routing)
    return spec


def layer_spec(cfg: Config, i: int) -> ModuleSpec:
    """Layer i: dense or MoD, with megatron's MoE MLP (mod_megatron.moe) when it is a MoE layer."""
    spec = mod_layer_spec(cfg) if is_routed(cfg, i) else dense_layer_spec(cfg)
    if is_moe_layer(cfg, i):
        from mod_megatron.moe.spec import moe_mlp_spec

        spec.submodules.mlp = moe_mlp_spec(cfg)
    return spec


def layer_specs(cfg: Config) -> list[ModuleSpec]:
    return [layer_spec(cfg, i) for i in range(cfg.model.num_layers)]


def block_spec(cfg: Config, tcfg, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """The TransformerBlockSubmodules of the layers this pipeline stage (and virtual stage) builds."""
    specs = layer_specs(cfg)
    if tcfg.pipeline_model_parallel_layout is not None:
        from megatron.core.transformer.enums import LayerType

        ids = tcfg.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        local = [specs[i] for i in ids]
    else:
        n = get_num_layers_to_build(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
        offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
        local = specs[offset:offset + n]
    final_norm = dense_layer_spec(cfg).submodules.input_layernorm
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=final_norm)
