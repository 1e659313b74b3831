"""Rotary position embedding for query and key, in one fused kernel each way on a GPU (`model.fused_rope`).

megatron-core's RoPE without Transformer Engine (`apply_rotary_pos_emb`) runs about six elementwise
kernels per tensor each way (chunk/neg/cat for the rotated half, two products, a sum, a final cat),
several of them on the strided query/key views of the fused QKV projection. Measured on an H100/H200
that was ~8% of a 368M dense training step (docs/benchmarks.md). Here the same formula,

    rope(t) = t * cos(f) + rotate_half(t) * sin(f),   rotate_half([x1, x2]) = [-x2, x1]

(non-interleaved, the rotary part being the first freqs.shape[-1] channels of each head), is one
function of (query, key, freqs) that `torch.compile` fuses on CUDA, forward and backward. Elsewhere
(CPU, or if compilation fails) the same PyTorch code runs eagerly, so outputs equal megatron's.
"""
from __future__ import annotations

import torch

from mod_megatron.model.compiled import run

FUSED_ROPE_MODES = ("auto", "on", "off")


def rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron-core's `_apply_rotary_pos_emb_bshd` (rotary_interleaved=False, mscale=1): t [s,b,h,d]."""
    return rotate_cos_sin(t, torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype))


def rotate_cos_sin(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` with cos(freqs) and sin(freqs) given (in t's dtype): a fused kernel then loads them
    instead of evaluating two transcendentals per element of every query and key."""
    rot = cos.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    out = t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, t_pass), dim=-1) if t_pass.shape[-1] else out


def rotate_pair(query, key, q_freqs, k_freqs):
    return rotate(query, q_freqs), rotate(key, k_freqs)


def apply_rope(query: torch.Tensor, key: torch.Tensor, q_freqs, k_freqs, mode: str = "auto"):
    """Rotate query and key ([s,b,heads,d]) by their frequencies ([s,1|b,1,rot]); either freqs may be None."""
    if mode not in FUSED_ROPE_MODES:
        raise ValueError(f"unknown fused_rope mode {mode!r}; choose from {', '.join(FUSED_ROPE_MODES)}")
    if q_freqs is None or k_freqs is None:  # one side only: nothing to fuse
        return (query if q_freqs is None else rotate(query, q_freqs)), (key if k_freqs is None else rotate(key, k_freqs))
    if mode == "on" and not query.is_cuda:
        raise RuntimeError("model.fused_rope=on needs CUDA tensors; use --model.fused_rope=auto or off")
    if mode == "off":
        return rotate_pair(query, key, q_freqs, k_freqs)
    # dynamic=None: torch.compile's default (shapes become dynamic after a recompile)
    return run(rotate_pair, mode, query, key, q_freqs, k_freqs, option="model.fused_rope", dynamic=None)
