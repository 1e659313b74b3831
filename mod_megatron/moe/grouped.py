"""Grouped-GEMM experts (`moe.grouped_gemm`): all of a layer's experts in two grouped matmuls.

megatron-core's SequentialMLP (moe/experts.py) runs its experts one after another: per expert, a
split of the token rows, linear fc1, the activation, the router-probability scale and linear fc2,
each an eager kernel, forward and backward; with 8 experts that is ~100 small launches per MoE
layer and step, and megatron's grouped alternatives need Transformer Engine or the `grouped_gemm`
package. Here the rows of every expert go through torch's own grouped GEMM (`torch._grouped_mm`,
CUTLASS kernels on sm90) at once:

    h = x @ W1[e].T   for the rows of expert e      [T, ffn]     one grouped GEMM
    h = act(h) * prob                                             elementwise, eager
    y = h @ W2[e].T                                   [T, hidden]  one grouped GEMM

with the same math as megatron's MLP (no biases; GeLU, or SwiGLU gated; the probability applied
after the activation, rounded to the input's dtype). The parameters stay SequentialMLP's own
(`local_experts.<i>.linear_fc1.weight`, ...), so checkpoints, DDP, the optimizer, expert
parallelism and the spec are unchanged: each forward stacks them into [E, out, in] (one copy of
the expert weights), and the backward computes each expert's weight gradient in that [out, in]
layout (dW_e = dY_e^T X_e, one grouped GEMM), so every expert receives a contiguous gradient.
The elementwise part stays megatron's three passes (the activation, an fp32 product, its rounding);
compiling it was measured and dropped (docs/benchmarks.md, sixteenth session).

Modes: `auto` takes this path for bf16 CUDA tensors on sm90+ (where the grouped kernels are
CUTLASS's), `on` everywhere torch runs `_grouped_mm` (its CPU version is how the tests compare the
two paths), `off` never; a layer whose config the path does not model (biases, fp8, other
activations, probabilities on the input) always runs megatron's loop.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mod_megatron.moe.experts import SequentialExperts

GROUPED_GEMM_MODES = ("auto", "on", "off")


def unsupported_reason(config) -> Optional[str]:
    """Why a TransformerConfig's experts can't take the grouped path (None: they can)."""
    c = config
    if c.add_bias_linear:
        return "expert biases"
    if c.fp8 or getattr(c, "fp4", None):
        return "fp8/fp4"
    if c.moe_apply_probs_on_input:
        return "moe_apply_probs_on_input"
    if c.use_te_activation_func or c.bias_activation_fusion:
        return "fused/TE activations"
    if c.activation_func_clamp_value is not None or c.glu_linear_offset != 0:
        return "clamped or offset GLU"
    gelu = c.activation_func is F.gelu and not c.gated_linear_unit
    swiglu = c.activation_func is F.silu and c.gated_linear_unit
    if not (gelu or swiglu):
        return "activations other than GeLU and SwiGLU"
    if c.hidden_size % 8 or c.moe_ffn_hidden_size % 8:  # the CUDA kernels' 16-byte alignment of each group
        return "widths not a multiple of 8"
    return None


class _GroupedLinear(torch.autograd.Function):
    """y = x @ w[e].T on the rows of each group e: x [T, in], w [E, out, in], offs [E] int32 (group ends).
    The weight's gradient is dY_e^T X_e per group, in w's own [E, out, in] layout."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch._grouped_mm(grad, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(grad.t(), x, offs=offs)
        return dx, dw, None


def grouped_mlp(x, w1, w2, offs, probs, gated: bool):
    """The experts' MLP on x [T, H] sorted by expert; w1 [E, ffn(*2 gated), H], w2 [E, H, ffn]."""
    h = _GroupedLinear.apply(x, w1, offs)
    if gated:
        a, b = torch.chunk(h, 2, dim=-1)
        h = F.silu(a) * b
    else:
        h = F.gelu(h)
    h = (h * probs.unsqueeze(-1)).to(x.dtype)  # megatron's MLP: per-token scale after the activation
    return _GroupedLinear.apply(h, w2, offs)


class GroupedExperts(SequentialExperts):
    """SequentialExperts (same parameters, same gradient reduction) whose forward is two grouped GEMMs."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, mode: str = "auto"):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if mode not in GROUPED_GEMM_MODES:
            raise ValueError(f"moe.grouped_gemm must be one of {GROUPED_GEMM_MODES}, got {mode!r}")
        reason = unsupported_reason(self.config)
        if mode == "on" and reason is not None:
            raise ValueError(f"moe.grouped_gemm=on can't model {reason}; set moe.grouped_gemm=auto or off")
        self.mode = "off" if reason is not None else mode

    def uses_grouped(self, x: torch.Tensor) -> bool:
        if self.mode == "off" or self.num_local_experts == 1:
            return False
        if self.mode == "on":
            return True
        return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        if not self.uses_grouped(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        offs = torch.cumsum(tokens_per_expert, 0).to(device=x.device, dtype=torch.int32, non_blocking=True)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        return grouped_mlp(x, w1, w2, offs, permuted_probs, self.config.gated_linear_unit), None
