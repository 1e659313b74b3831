"""A fused fast path for megatron-core's TransformerLayer (`model.fused_layer`).

megatron-core's local (Transformer-Engine-free) layer runs every norm, residual add, activation,
rotary embedding and layout change as its own eager kernel, forward and backward; on an H100/H200
that elementwise work took about half of a 368M training step (docs/benchmarks.md). Here the same
layer is one function of its input and its parameters,

    h = x + proj(attention(rope(qkv(norm1(x)))))        pre-LN, causal SDPA, no biases
    y = h + fc2(act(fc1(norm2(h))))                    act: GeLU, or SwiGLU (gated)

which `torch.compile` turns into a few fused kernels around the matmuls and flash attention, forward
and backward; the residual adds are the output GEMMs' own (addmm with the residual as C), and each
norm's backward adds the residual's gradient in the same pass (model/fused_norm.py). The
parameters stay megatron's own modules' (`linear_qkv.weight`, ...): checkpoints, DDP, the optimizer
and the spec are unchanged, and the MoD layer (model/mod_layer.py) runs its whole routed forward
(router, top-k, gather, this layer, combine, aux losses) as one compiled function too.

`fused_reason(layer)` says why a layer can't take this path (tensor or sequence parallelism, MoE,
dropout, biases, other attention cores or norms, ...); such a layer, and any call with arguments the
path does not model (KV-cache inference, packed sequences), runs megatron's forward. Modes:
`auto` fuses CUDA tensors (compiled) and leaves CPU runs on megatron's path; `on` fuses everywhere
(eagerly on a CPU: that is how the tests check it against megatron's forward); `off` never.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_layer import TransformerLayer

from mod_megatron.model.compiled import run
from mod_megatron.model.fused_norm import norm_kernel_usable, norm_residual
from mod_megatron.model.rope import rotate_cos_sin
from mod_megatron.model.wgrad import claimable, main_grad_of, wgrad_of_weight

FUSED_LAYER_MODES = ("auto", "on", "off")
# Arguments of TransformerLayer.forward the fused path does not model: any of them set -> megatron's path.
PLAIN_IF_SET = ("context", "context_mask", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin",
                 "attention_bias", "inference_context", "packed_seq_params", "sequence_len_offset",
                 "padding_mask", "inference_params")


class _Linear(torch.autograd.Function):
    """x @ w.T with megatron's weight gradient layout: dW = dY^T X, [out, in] like the weight.

    Differentiating F.linear inside a compiled graph yields dW as the transpose of an [in, out] matmul,
    a strided view; parameters then receive transposed gradients, and megatron's DDP adds each one into
    its fp32 main_grad with a strided read (~20x slower than a contiguous add, measured on an H200).
    """

    @staticmethod
    def forward(ctx, x, w, fused):
        ctx.save_for_backward(x, w)
        ctx.fused = fused
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        return *_linear_grads(grad, *ctx.saved_tensors, ctx.fused), None


def _linear_grads(grad, x, w, fused=False):
    """(grad of x, grad of w) of x @ w.T, dW = dY^T X in the weight's [out, in] layout; fused (model/wgrad.py):
    dW is added into w's main_grad by the GEMM and w's gradient is a placeholder DDP drops."""
    if fused:
        return grad.matmul(w), wgrad_of_weight(w, grad, x)
    return grad.matmul(w), grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))


def _linear(x, w, fused=False):
    return _Linear.apply(x, w, fused)


class _LinearResidual(torch.autograd.Function):
    """res + x @ w.T as one GEMM, the residual as its C operand (cuBLAS's beta = 1), rounded once.

    PyTorch's addmm copies res into the output first (a memcpy), then the GEMM adds into it: about the
    bytes of the GEMM writing x @ w.T and a compiled add reading both back, yet the dense 368M model
    trained 0.7-1.0% faster this way on an H100 (docs/benchmarks.md, ninth session). The residual's
    gradient is the output's; x's and w's are _Linear's."""

    @staticmethod
    def forward(ctx, res, x, w, fused):
        ctx.save_for_backward(x, w)
        ctx.fused = fused
        n = w.shape[0]
        return torch.addmm(res.reshape(-1, n), x.reshape(-1, x.shape[-1]), w.t()).view(res.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, *_linear_grads(grad, *ctx.saved_tensors, ctx.fused), None


def _residual_linear(res, x, w, fused=False):
    """res + x @ w.T (the residual added inside the GEMM)."""
    return _LinearResidual.apply(res, x, w, fused)


def block(x, params, rope, meta: tuple, residual_gemm: bool = True, fused_wgrads=None):
    """The layer's output for input x [s, b, H] (megatron's TransformerLayer forward, no dropout/bias).

    params: (norm1 weight, norm1 bias, qkv weight, proj weight, norm2 weight, norm2 bias, fc1 weight,
    fc2 weight), biases None for RMSNorm; rope: (q_cos, q_sin, k_cos, k_sin) [s, 1|b, 1, rot] in x's
    dtype (`rope_tables`), or None; meta: (norm kind, eps, query groups, query heads per group, head dim,
    softmax scale, activation, Triton norm backward?); each norm's input reaches its residual through
    the norm (model/fused_norm.py), so one backward pass adds both gradients; residual_gemm: add the
    residuals inside the output GEMMs (_LinearResidual),
    or as adds the compiler fuses (the routed layers: there, on gathered rows, inductor warned once per
    compiled shape on a GPU, "Constructing input/output tensor meta failed for Extern Choice");
    fused_wgrads: for (qkv, proj, fc1, fc2), whether that weight's GEMM adds its gradient into its fp32
    main_grad (`layer_fused_wgrads`, model/wgrad.py), or None for autograd's way for all four.
    """
    add = _residual_linear if residual_gemm else (lambda res, a, w, fused: res + _linear(a, w, fused))
    n1w, n1b, qkv_w, proj_w, n2w, n2b, fc1_w, fc2_w = params
    qkv_f, proj_f, fc1_f, fc2_f = fused_wgrads or (False,) * 4
    norm, eps, groups, per_group, head_dim, scale, act, norm_kernel = meta
    s, b, _ = x.shape
    x, normed = norm_residual(x, n1w, n1b, eps, norm, norm_kernel)
    # megatron's grouped QKV layout: per query group, its query heads, then one key and one value head
    qkv = _linear(normed, qkv_w, qkv_f).view(s, b, groups, per_group + 2, head_dim)
    q = qkv[:, :, :, :per_group].reshape(s, b, groups * per_group, head_dim)
    k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
    if rope is not None:
        q, k = rotate_cos_sin(q, rope[0], rope[1]), rotate_cos_sin(k, rope[2], rope[3])
    o = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                       is_causal=s > 1, scale=scale, enable_gqa=groups != groups * per_group)
    h = add(x, o.permute(2, 0, 1, 3).reshape(s, b, -1), proj_w, proj_f)  # [b, heads, s, d] -> [s, b, H]
    h, normed = norm_residual(h, n2w, n2b, eps, norm, norm_kernel)
    f = _linear(normed, fc1_w, fc1_f)
    if act == "swiglu":
        gate, lin = torch.chunk(f, 2, dim=-1)
        f = F.silu(gate) * lin
    else:
        f = F.gelu(f)
    return add(h, f, fc2_w, fc2_f)


def rope_tables(rotary_pos_emb, dtype: torch.dtype):
    """(q_cos, q_sin, k_cos, k_sin) in `dtype` from megatron's rotary_pos_emb (a tensor, a pair, or None),
    computed once per layer call, outside the fused function, so its kernels load them."""
    if rotary_pos_emb is None:
        return None
    q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
    q = (torch.cos(q_freqs).to(dtype), torch.sin(q_freqs).to(dtype))
    k = q if k_freqs is q_freqs else (torch.cos(k_freqs).to(dtype), torch.sin(k_freqs).to(dtype))
    return (*q, *k)


def fused_reason(layer: TransformerLayer) -> Optional[str]:
    """Why this layer cannot take the fused path (None if it can)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    from mod_megatron.model.attention import SDPAttention

    c = layer.config
    if c.tensor_model_parallel_size > 1 or c.sequence_parallel or c.context_parallel_size > 1:
        return "tensor, sequence or context parallelism"
    if getattr(c, "fp8", None) or c.recompute_granularity is not None:
        return "fp8 or activation recomputation"
    attn, mlp = layer.self_attention, layer.mlp
    if type(mlp) is not MLP:
        return "not a dense MLP (MoE)"
    if not isinstance(attn, SelfAttention) or not isinstance(attn.core_attention, SDPAttention):
        return "not SDPA self-attention"
    if any(not isinstance(getattr(attn, n, None), (type(None), IdentityOp)) for n in ("q_layernorm", "k_layernorm")):
        return "query/key norms"
    if c.add_bias_linear or c.apply_residual_connection_post_layernorm or c.fp32_residual_connection:
        return "linear biases or a non-standard residual"
    if c.activation_func_clamp_value is not None or c.glu_linear_offset != 0:
        return "a clamped or offset GLU"
    gelu, swiglu = c.activation_func is F.gelu and not c.gated_linear_unit, c.activation_func is F.silu and c.gated_linear_unit
    if not (gelu or swiglu):
        return "an activation other than GeLU or SwiGLU"
    for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
        if type(norm) not in (torch.nn.LayerNorm, torch.nn.RMSNorm):
            return "norms other than torch's LayerNorm/RMSNorm"
    if layer.hidden_dropout > 0 or attn.core_attention.dropout_p > 0:
        return "dropout"
    if getattr(attn, "output_gate", False) or getattr(c, "attention_output_gate", False):
        return "an attention output gate"
    return None


def layer_params(layer: TransformerLayer) -> tuple:
    attn, mlp = layer.self_attention, layer.mlp
    n1, n2 = layer.input_layernorm, layer.pre_mlp_layernorm
    return (n1.weight, getattr(n1, "bias", None), attn.linear_qkv.weight, attn.linear_proj.weight,
            n2.weight, getattr(n2, "bias", None), mlp.linear_fc1.weight, mlp.linear_fc2.weight)


def _linear_weights(layer: TransformerLayer) -> tuple:
    attn, mlp = layer.self_attention, layer.mlp
    return attn.linear_qkv.weight, attn.linear_proj.weight, mlp.linear_fc1.weight, mlp.linear_fc2.weight


def layer_fused_wgrads(layer: TransformerLayer, enabled: bool) -> Optional[tuple]:
    """For the (qkv, proj, fc1, fc2) weights, whether their GEMMs add into their main_grad (model/wgrad.py,
    which claims them here), or None for none: flags, not tensors, go into the compiled function."""
    fused = tuple(main_grad_of(w, enabled) is not None for w in _linear_weights(layer))
    return fused if any(fused) else None


def fused_wgrad_weights(layer) -> tuple:
    """The weights whose gradients this layer's GEMMs will take into main_grad on its fused path in training
    (what `layer_fused_wgrads` claims), found without claiming them; () for other layers."""
    if not isinstance(layer, FusedTransformerLayer) or layer.fused_why_not is not None or not layer.fused_wgrad:
        return ()
    return tuple(w for w in _linear_weights(layer) if claimable(w, True))


def layer_meta(layer: TransformerLayer) -> tuple:
    c, attn = layer.config, layer.self_attention
    groups = attn.num_query_groups_per_partition
    norm = "RMSNorm" if type(layer.input_layernorm) is torch.nn.RMSNorm else "LayerNorm"
    eps = layer.input_layernorm.eps
    return (norm, float(eps if eps is not None else 1e-5), groups,
            attn.num_attention_heads_per_partition // groups, attn.hidden_size_per_attention_head,
            attn.core_attention.softmax_scale, "swiglu" if c.gated_linear_unit else "gelu",
            norm_kernel_usable(layer.input_layernorm.weight))


class FusedTransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer whose forward takes the fused path where it applies."""

    def __init__(self, *args, fused_layer: str = "auto", fused_wgrad: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_wgrad = fused_wgrad  # weight gradients added into DDP's main_grad by their GEMMs
        if fused_layer not in FUSED_LAYER_MODES:
            raise ValueError(f"unknown fused_layer mode {fused_layer!r}; choose from {', '.join(FUSED_LAYER_MODES)}")
        self.fused_layer = fused_layer
        self.fused_why_not = fused_reason(self) if fused_layer != "off" else "model.fused_layer=off"
        if fused_layer == "on" and self.fused_why_not is not None:
            raise ValueError(f"model.fused_layer=on cannot fuse this layer ({self.fused_why_not}); "
                             "use --model.fused_layer=auto")

    def use_fused(self, hidden_states: torch.Tensor, kwargs: dict) -> bool:
        """Take the fused path for this call? (mode, layer support, and arguments it models)"""
        if self.fused_why_not is not None or any(kwargs.get(name) is not None for name in PLAIN_IF_SET):
            return False
        return self.fused_layer == "on" or hidden_states.is_cuda

    def forward(self, hidden_states: torch.Tensor, *args, rotary_pos_emb=None, **kwargs):
        if args or not self.use_fused(hidden_states, kwargs):
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        out = run(block, self.fused_layer, hidden_states, layer_params(self),
                  rope_tables(rotary_pos_emb, hidden_states.dtype), layer_meta(self), True,
                  layer_fused_wgrads(self, self.fused_wgrad), option="model.fused_layer")
        return out, None
