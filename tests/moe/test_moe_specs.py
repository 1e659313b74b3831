"""Dense, MoD, MoE and both MoDE variants differ only in their per-layer specs; FLOPs count active experts."""
from __future__ import annotations

import pytest
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from mod_megatron.config import load_config
from mod_megatron.model.fused_layer import FusedTransformerLayer
from mod_megatron.model.mod_layer import MoDTransformerLayer
from mod_megatron.model.spec import layer_specs
from mod_megatron.moe.router import MoDERouter, target_distribution
from mod_megatron.training.flops import forward_flops_per_sequence, layer_forward_flops

MOE = ["--moe.num_experts=4", "--moe.topk=2"]
INTEGRATED = MOE + ["--mod.enabled=false", "--moe.noop_experts=2", "--moe.noop_target=0.5"]


def _kinds(*overrides):
    specs = layer_specs(load_config(None, list(overrides)))
    return [(s.module, s.submodules.mlp.module) for s in specs]


def test_models_differ_only_in_the_layer_list():
    T, D, E = FusedTransformerLayer, MoDTransformerLayer, MoELayer  # T: megatron's layer + fused fast path
    assert _kinds("--mod.enabled=false") == [(T, MLP)] * 4
    assert _kinds() == [(T, MLP), (D, MLP), (T, MLP), (D, MLP)]
    assert _kinds("--mod.enabled=false", *MOE) == [(T, E)] * 4
    assert _kinds(*MOE) == [(T, E), (D, E), (T, E), (D, E)]  # staged MoDE
    assert _kinds(*MOE, "--moe.every=2", "--moe.first=1") == [(T, MLP), (D, E), (T, MLP), (D, E)]
    assert _kinds(*INTEGRATED) == [(T, E)] * 4
    dense, staged = layer_specs(load_config(None, [])), layer_specs(load_config(None, MOE))
    assert dense[1].submodules.self_attention == staged[1].submodules.self_attention
    router = layer_specs(load_config(None, INTEGRATED))[0].submodules.mlp.submodules.router
    assert router.func is MoDERouter and router.keywords == {"noop_experts": 2, "noop_target": 0.5}


def test_target_distribution():
    assert target_distribution(4, 0, 0.0) == [0.25] * 4
    t = target_distribution(4, 2, 0.5)
    assert t == [0.125] * 4 + [0.25] * 2 and sum(t) == pytest.approx(1.0)


def test_flops_count_active_experts_and_router():
    base = ["--mod.enabled=false", "--model.hidden_size=64", "--model.seq_length=32"]
    dense = load_config(None, base)
    moe = load_config(None, base + MOE + ["--moe.ffn_hidden_size=128"])  # top-2 of half-size experts
    integrated = load_config(None, base + INTEGRATED + ["--moe.ffn_hidden_size=128"])
    h, s = 64, 32
    mlp_dense = 2 * s * h * 256 * 2
    assert layer_forward_flops(moe, s, 0) - layer_forward_flops(dense, s, 0) == 2 * s * h * 4  # router only
    assert layer_forward_flops(dense, s, 0) - layer_forward_flops(integrated, s, 0) == mlp_dense / 2 - 2 * s * h * 6
    assert forward_flops_per_sequence(integrated) < forward_flops_per_sequence(dense)
