"""A pre-LN norm that also hands its input on to the residual, with one backward for both uses.

In the fused layer (model/fused_layer.py) each norm's input x is used twice: normed, into the next
matmul, and as the residual that the output GEMM adds back. Autograd would compute the norm's
gradient of x and then add the residual's gradient to it in another pass. `norm_residual(x, ...)`
returns (x, norm(x)) from one autograd function instead, so its backward receives both gradients and
adds them while it computes the norm's: on CUDA (meta's norm kernel flag), one Triton kernel that also
sums dw and db (kernels/norm_triton.py); elsewhere PyTorch's own norm backward, then the add (the
CPU path, bit for bit autograd's result for LayerNorm).

Forward: LayerNorm is aten's native_layer_norm (what F.layer_norm calls; the compiler fuses it as
before); RMSNorm is x * rsqrt(mean(x^2) + eps), in fp32, rounded, then times the weight, as
F.rms_norm computes it.
"""
from __future__ import annotations

import torch


def _rms_stats(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)


def _reference_backward(dy, x, dres, weight, bias, mean, rstd, rms: bool):
    """(dres + dx, dw, db) from PyTorch ops: the CPU path and the kernel tests' reference."""
    if not rms:
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, x, (x.shape[-1],), mean, rstd, weight, bias, [True, True, bias is not None])
        return dres + dx, dw, db
    xhat = x.float() * rstd
    wdy = dy.float() * weight.float()
    dx = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)) * rstd
    dw = (dy.float() * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dres + dx.to(x.dtype), dw.to(weight.dtype), None


class _NormResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, rms: bool, kernel: bool):
        if rms:
            rstd = _rms_stats(x, eps)
            mean = rstd  # unused
            out = (x.float() * rstd).to(x.dtype) * weight
        else:
            out, mean, rstd = torch.ops.aten.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.rms, ctx.kernel = rms, kernel
        return x.view_as(x), out

    @staticmethod
    def backward(ctx, dres, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if ctx.kernel:
            dx, dw, db = torch.ops.mod_megatron.norm_residual_backward(dy, x, dres, weight, mean, rstd, ctx.rms)
            db = db if bias is not None else None
        else:
            dx, dw, db = _reference_backward(dy, x, dres, weight, bias, mean, rstd, ctx.rms)
        return dx, dw, db, None, None, None


def norm_residual(x: torch.Tensor, weight, bias, eps: float, kind: str, kernel: bool):
    """(x for the residual, norm(x)); kind "LayerNorm" or "RMSNorm"; kernel: the Triton backward
    (a CUDA tensor, kernels/norm_triton.py imported: see `norm_kernel_usable`)."""
    return _NormResidual.apply(x, weight, bias, eps, kind == "RMSNorm", kernel)


def norm_kernel_usable(weight: torch.Tensor) -> bool:
    """Whether the Triton backward can run for a norm with this weight (on CUDA, triton working, a row
    that fits one program). Imports the kernel, registering its op, before any compiled code calls it."""
    from mod_megatron.kernels.routing import triton_available

    if not (weight.is_cuda and triton_available()):
        return False
    from mod_megatron.kernels.norm_triton import MAX_N

    return weight.shape[-1] <= MAX_N
