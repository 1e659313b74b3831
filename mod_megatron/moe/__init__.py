"""Mixture-of-experts and MoDE layers on megatron-core's MoELayer (docs/mode.md).

`spec.moe_mlp_spec` gives the MLP spec of an MoE layer (megatron's local MoE spec with
`router.MoDERouter`, which adds no-op experts and target-share balancing), `spec.transformer_kwargs`
the TransformerConfig fields, `stats.moe_stats` the imbalance metrics the trainer logs.
"""
from mod_megatron import platform

platform.moe_without_te()  # megatron-core's MoE router needs this without Transformer Engine (CPU or GPU)
