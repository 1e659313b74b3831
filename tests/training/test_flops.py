"""Model FLOPs (training/flops.py): routed layers count only their k routed tokens, plus the router."""
from __future__ import annotations

from mod_megatron.config import load_config
from mod_megatron.training.flops import forward_flops_per_sequence, layer_forward_flops, train_flops_per_token

SHAPE = ["--model.num_layers=12", "--model.hidden_size=768", "--model.num_attention_heads=12",
         "--model.seq_length=1024", "--model.vocab_size=8192"]


def test_layer_formula():
    cfg = load_config(None, SHAPE)
    n, h = 100, 768
    proj, attn, mlp = 2 * n * h * 3 * h + 2 * n * h * h, 4 * n * n * h, 2 * n * h * 4 * h * 2
    assert layer_forward_flops(cfg, n) == proj + attn + mlp


def test_routed_layers_count_only_routed_tokens():
    dense = load_config(None, SHAPE + ["--mod.enabled=false"])
    mod = load_config(None, SHAPE + ["--mod.capacity=0.125"])  # layers 1, 3, ..., 11 routed: 6 of 12
    s, h, k = 1024, 768, 128
    saved_per_routed_layer = layer_forward_flops(dense, s) - (layer_forward_flops(dense, k) + 2 * s * h)
    assert forward_flops_per_sequence(mod) == forward_flops_per_sequence(dense) - 6 * saved_per_routed_layer
    assert train_flops_per_token(mod) == 3 * forward_flops_per_sequence(mod) / s
