"""Core attention on `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient).

megatron-core's local `DotProductAttention` materialises the full fp32 softmax (S x S per head),
which is slow and runs out of memory at modest batch sizes; this drop-in `core_attention` for the
local spec calls SDPA with `is_causal=True` instead. It takes megatron's [s, b, heads, dim] layout,
supports grouped-query attention, and needs no explicit mask (causal masks only).

`FusedRopeSelfAttention` (`model.fused_rope`, model/rope.py) is megatron's SelfAttention with the
rotary embedding moved into SDPAttention: the attention gets no rotary_pos_emb (so megatron applies
none) and the core attention rotates query and key in one fused kernel before SDPA.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal self-attention core: softmax(QK^T / sqrt(d)) V via SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"SDPAttention supports causal attention only, got {attn_mask_type}")
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.rope = None  # (q_freqs, k_freqs), set by FusedRopeSelfAttention for one forward
        self.fused_rope = "auto"  # set by FusedRopeSelfAttention (model.fused_rope)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        if self.rope is not None:
            from mod_megatron.model.rope import apply_rope

            query, key = apply_rope(query, key, *self.rope, mode=self.fused_rope)
        sq, b, nq, d = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=(mask_type == AttnMaskType.causal) and sq > 1,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != nq,
        )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * d)


class FusedRopeSelfAttention(SelfAttention):
    """SelfAttention whose rotary embedding is applied (fused) by its SDPAttention core."""

    def __init__(self, *args, fused_rope: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.core_attention, SDPAttention):
            self.core_attention.fused_rope = fused_rope  # model.fused_rope: auto | on | off (model/rope.py)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, inference_context=None,
                packed_seq_params=None, **kwargs):
        core = self.core_attention
        plain = (rotary_pos_emb is None or inference_context is not None or packed_seq_params is not None
                 or not isinstance(core, SDPAttention))
        if plain:  # megatron's own path (KV-cache inference, packed sequences, other cores)
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                                   inference_context=inference_context, packed_seq_params=packed_seq_params,
                                   **kwargs)
        core.rope = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None,
                                   inference_context=inference_context, packed_seq_params=packed_seq_params,
                                   **kwargs)
        finally:
            core.rope = None
