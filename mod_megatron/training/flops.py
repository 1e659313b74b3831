"""MoD-aware FLOP accounting and MFU.

Forward FLOPs per sequence (matmuls only, 2 FLOPs per multiply-add), for a layer processing n of
the S tokens (n = S for dense layers, n = k = ceil(capacity * S) for routed ones):

    qkv + proj   2 * n * H * (H + 2 * H_kv) + 2 * n * H * H
    attention    2 * 2 * n * n * H            (QK^T and AV over the n processed tokens, no causal
                                               discount: the usual convention for MFU)
    mlp          2 * n * H * F * (3 if SwiGLU else 2)
    router       2 * S * H                    (every token is scored)
    MoE mlp      2 * n * H * (E + E_noop) + n * topk * (1 - noop_target) * 2 * H * F_e * (3|2)
                                              (replaces mlp in MoE layers: only the active experts)

plus the LM head 2 * S * H * V. A training step is 3x forward (backward = 2x). MFU divides the
achieved model FLOP/s by the card's dense bf16 peak.
"""
from __future__ import annotations

from typing import Optional

from mod_megatron.config import Config, ffn_hidden, is_moe_layer, padded_vocab
from mod_megatron.model.router import capacity_tokens
from mod_megatron.model.spec import is_routed

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def layer_forward_flops(cfg: Config, n_tokens: int, layer_index: Optional[int] = None) -> float:
    """Forward FLOPs of one layer on n tokens; with `layer_index` a MoE layer's MLP is costed as MoE."""
    m = cfg.model
    h = m.hidden_size
    h_kv = h * (m.num_query_groups or m.num_attention_heads) // m.num_attention_heads
    f = ffn_hidden(m)
    proj = 2 * n_tokens * h * (h + 2 * h_kv) + 2 * n_tokens * h * h
    attn = 4 * n_tokens * n_tokens * h
    mlp = 2 * n_tokens * h * f * (3 if m.activation == "swiglu" else 2)
    if layer_index is not None and is_moe_layer(cfg, layer_index):
        mlp = moe_mlp_flops(cfg, n_tokens)
    return float(proj + attn + mlp)


def moe_mlp_flops(cfg: Config, n_tokens: int) -> float:
    """MoE MLP: router over real + no-op experts, then topk expert MLPs per token, of which the share
    noop_target (integrated MoDE, its target) is skipped. Dropped/padded slots are ignored."""
    m, e = cfg.model, cfg.moe
    f = e.ffn_hidden_size or ffn_hidden(m)
    router = 2 * n_tokens * m.hidden_size * (e.num_experts + e.noop_experts)
    expert = 2 * m.hidden_size * f * (3 if m.activation == "swiglu" else 2)
    return float(router + n_tokens * e.topk * (1.0 - e.noop_target) * expert)


def forward_flops_per_sequence(cfg: Config) -> float:
    m = cfg.model
    s = m.seq_length
    total = 2.0 * s * m.hidden_size * padded_vocab(m)
    for i in range(m.num_layers):
        if is_routed(cfg, i):
            total += layer_forward_flops(cfg, capacity_tokens(s, cfg.mod.capacity), i) + 2.0 * s * m.hidden_size
        else:
            total += layer_forward_flops(cfg, s, i)
    return total


def train_flops_per_token(cfg: Config) -> float:
    return 3.0 * forward_flops_per_sequence(cfg) / cfg.model.seq_length


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16.items():
        if key in device_name:
            return peak
    return None
