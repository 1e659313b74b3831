"""Autoregressive decoding of a megatron GPT (dense or MoD) with a per-layer, routed KV cache.

Plain PyTorch on the trained model's own submodules (input_layernorm, self_attention.linear_qkv,
linear_proj, pre_mlp_layernorm, mlp, the final norm and the LM head); attention is SDPA over the cache.

- Every layer has its own cache per sequence. A dense layer caches every token; a MoD layer caches
  only the tokens routed into it, so its cache is shorter and grows only when a token is routed.
- A cached key is rotated (RoPE) at the token's original position, exactly as in training, where the
  routed tokens keep their positions.
- A token that skips a MoD layer adds nothing to that layer's cache and leaves the layer unchanged
  (x_out = x); a routed one gets x + r * f(x) with r = router_weight(logit), as in training.
- The decision is causal, per token: `causal-router` (sigmoid(router logit) > 0.5) or
  `causal-predictor` (the auxiliary predictor's logit > 0). See docs/inference.md.

Batches of prompts of different lengths use per-sequence caches (no left padding): each prompt is
prefilled on its own, then all sequences decode together; a cache row holds `lengths[b]` valid
entries and attention masks the rest.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from mod_megatron.model.mod_layer import ROUTING_MODES, MoDTransformerLayer
from mod_megatron.model.router import router_weight

CAUSAL_MODES = tuple(m for m in ROUTING_MODES if m != "topk")


class LayerCache:
    """Keys and values one layer has computed, per sequence: [B, G, capacity, d] and `lengths` [B]."""

    def __init__(self, batch: int, groups: int, head_dim: int, capacity: int, dtype, device):
        self.k = torch.zeros(batch, groups, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.span = 0  # host-side upper bound of max(lengths): attention reads cache[:, :, :span]

    def extend(self, row: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Append n entries ([n, G, d], original positions [n]) to one sequence's cache."""
        start, n = int(self.lengths[row]), k.shape[0]
        self.k[row, :, start:start + n] = k.transpose(0, 1)
        self.v[row, :, start:start + n] = v.transpose(0, 1)
        self.positions[row, start:start + n] = positions
        self.lengths[row] += n
        self.span = max(self.span, start + n)

    def append(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Append one entry ([n, G, d]) to each of the sequences `rows` [n]."""
        slots = self.lengths[rows]
        self.k[rows, :, slots] = k
        self.v[rows, :, slots] = v
        self.positions[rows, slots] = positions
        self.lengths[rows] += 1
        self.span = min(self.span + 1, self.k.shape[2])  # each row grows by at most one


class CachedDecoder:
    """Prefill prompts one by one, then decode all sequences a token at a time."""

    def __init__(self, model, mode: str = "causal-predictor", decide: Optional[Callable] = None):
        if mode not in CAUSAL_MODES:
            raise ValueError(f"decoding needs a causal routing mode ({', '.join(CAUSAL_MODES)}), got {mode!r}")
        self.model, self.mode = model, mode
        self.layers = list(model.decoder.layers)
        self.decide_override = decide  # decide(layer, x, logits) -> bool; benchmarks force a fraction
        self.caches: list[LayerCache] = []
        self.routed = [0] * len(self.layers)  # tokens routed into each layer (prefill + decode)
        self.seen = 0  # tokens processed
        self.use_rope = getattr(model, "position_embedding_type", None) == "rope"

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def start(self, batch: int, capacity: int) -> None:
        """Empty caches for `batch` sequences of up to `capacity` tokens each."""
        p = next(self.model.parameters())
        self.caches = []
        for layer in self.layers:
            attn = layer.self_attention
            self.caches.append(LayerCache(batch, attn.num_query_groups_per_partition,
                                          attn.hidden_size_per_attention_head, capacity, p.dtype, p.device))
        self.freqs = self.model.rotary_pos_emb(capacity) if self.use_rope else None  # [L, 1, 1, d]
        self.routed = [0] * len(self.layers)
        self.seen = 0

    # ------------------------------------------------------------------ the layer
    def _decide(self, layer, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.decide_override is not None:
            return self.decide_override(layer, x, logits)
        if self.mode == "causal-router":
            return logits > 0
        if layer.predictor is None:
            raise ValueError("routing mode causal-predictor needs a model trained with mod.predictor=true")
        return layer.predictor(x) > 0

    @staticmethod
    def _block(layer, x: torch.Tensor, freqs, attend: Callable) -> torch.Tensor:
        """TransformerLayer's math on x [s, b, H]: attention (through `attend`) and MLP with residuals."""
        attn = layer.self_attention
        q, k, v = attn.get_query_key_value_tensors(layer.input_layernorm(x))
        if freqs is not None:
            q = apply_rotary_pos_emb(q, freqs, config=attn.config)
            k = apply_rotary_pos_emb(k, freqs, config=attn.config)
        out, bias = attn.linear_proj(attend(q, k, v))
        y = x + (out if bias is None else out + bias)
        out, bias = layer.mlp(layer.pre_mlp_layernorm(y))
        return y + (out if bias is None else out + bias)

    @staticmethod
    def _sdpa(layer, q, k, v, mask=None, causal=False) -> torch.Tensor:
        """q [n, heads, s, d], k/v [n, G, L, d] -> context [s, n, heads*d]."""
        scale = getattr(layer.self_attention.core_attention, "softmax_scale", None)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        n, heads, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, n, heads * d)

    def _route(self, i: int, layer, x: torch.Tensor):
        """(mask of routed tokens, router weights) for x [s, b, H]; dense layers route everything."""
        if not isinstance(layer, MoDTransformerLayer):
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), None
        logits = layer.router(x)  # [s, b] fp32
        return self._decide(layer, x, logits), router_weight(logits, layer.router_weight_kind)

    # ------------------------------------------------------------------ prefill and step
    @torch.no_grad()
    def prefill(self, row: int, tokens: torch.Tensor) -> torch.Tensor:
        """Run one prompt [L] (cache row `row` must be empty); return its logits [L, V]."""
        n = tokens.shape[0]
        positions = torch.arange(n, device=tokens.device)
        h = self.model.embedding(input_ids=tokens.view(1, n), position_ids=positions.view(1, n))  # [L, 1, H]
        for i, layer in enumerate(self.layers):
            routed, weight = self._route(i, layer, h)
            idx = routed[:, 0].nonzero().squeeze(1)  # routed positions, in order
            self.routed[i] += idx.numel()
            if idx.numel() == 0:
                continue
            x = h[idx]  # [m, 1, H]
            cache = self.caches[i]

            def attend(q, k, v, cache=cache, pos=positions[idx], layer=layer):
                cache.extend(row, k[:, 0], v[:, 0], pos)
                return self._sdpa(layer, *(t.permute(1, 2, 0, 3) for t in (q, k, v)), causal=True)

            y = self._block(layer, x, self.freqs[idx] if self.use_rope else None, attend)
            if weight is None:
                h = y
            else:
                h = h.clone()
                h[idx] = x + weight[idx].unsqueeze(-1).to(y.dtype) * (y - x)
        self.seen += n
        return self._logits(h)[:, 0]

    @torch.no_grad()
    def step(self, rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token for each sequence in `rows` [n] at `positions` [n]; return logits [n, V]."""
        n = rows.shape[0]
        h = self.model.embedding(input_ids=tokens.view(n, 1), position_ids=positions.view(n, 1))  # [1, n, H]
        for i, layer in enumerate(self.layers):
            cache = self.caches[i]
            if isinstance(layer, MoDTransformerLayer):
                routed, weight = self._route(i, layer, h)
                sel = routed[0].nonzero().squeeze(1)  # the sequences whose token this layer computes
                if sel.numel() == 0:
                    continue
                x, sub_rows, sub_pos, weight = h[:, sel], rows[sel], positions[sel], weight[:, sel]
            else:  # dense: every token, no data-dependent shapes (no host sync)
                sel, x, sub_rows, sub_pos, weight = None, h, rows, positions, None
            self.routed[i] += x.shape[1]

            def attend(q, k, v, cache=cache, sub_rows=sub_rows, sub_pos=sub_pos, layer=layer):
                cache.append(sub_rows, k[0], v[0], sub_pos)
                keys, values = cache.k[sub_rows, :, :cache.span], cache.v[sub_rows, :, :cache.span]
                mask = torch.arange(cache.span, device=keys.device) < cache.lengths[sub_rows].unsqueeze(1)
                return self._sdpa(layer, q.permute(1, 2, 0, 3), keys, values, mask=mask.view(-1, 1, 1, cache.span))

            freqs = self.freqs[sub_pos].view(1, -1, 1, self.freqs.shape[-1]) if self.use_rope else None
            y = self._block(layer, x, freqs, attend)
            if weight is None:
                h = y
            else:
                h = h.clone()
                h[:, sel] = x + weight.unsqueeze(-1).to(y.dtype) * (y - x)
        self.seen += n
        return self._logits(h)[0]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.decoder.final_layernorm(h)
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(h, weight=weight)
        return logits.float()

    def fraction_routed(self) -> list[float]:
        """Share of the processed tokens each layer computed (1.0 for dense layers)."""
        return [r / max(self.seen, 1) for r in self.routed]
