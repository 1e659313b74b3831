"""The norm + residual backward kernel (kernels/norm_triton.py) against PyTorch's norm backward plus the
residual's gradient: LayerNorm (with and without bias) and RMSNorm, fp32 and bf16, odd row counts and
widths (not powers of two, fewer rows than programs, more rows than programs), and inside a compiled
function with the fused layer's autograd function (model/fused_norm.py).

They need a CUDA GPU with triton and are skipped elsewhere (CI); `TRITON_INTERPRET=1` runs the eager
ones on a CPU through Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mod_megatron.model.fused_norm import norm_residual
from tests.conftest import triton_kernel_env

CUDA, INTERPRET, DEVICE, pytestmark = triton_kernel_env()
if CUDA or INTERPRET:
    import mod_megatron.kernels.norm_triton  # noqa: F401  (registers the op the kernel path calls)

# [s, b, H]: 1 to 10500 rows (the last: bands of two 8-row tiles, the last band short), widths not powers of 2
SHAPES = [(1, 1, 8), (37, 3, 100), (5, 2, 1000), (600, 2, 257), (2100, 5, 64)]
CASES = [("LayerNorm", True), ("LayerNorm", False), ("RMSNorm", False)]  # (kind, bias)


def autograd_reference(x, dres, dy, weight, bias, kind):
    """Gradients of x, weight and bias of sum(dres * x) + sum(dy * norm(x)) by autograd, in fp64."""
    x, weight = x.double().requires_grad_(), weight.double().requires_grad_()
    bias = bias.double().requires_grad_() if bias is not None else None
    if kind == "RMSNorm":
        out = F.rms_norm(x, (x.shape[-1],), weight, 1e-5)
    else:
        out = F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)
    inputs = [x, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad((dres.double() * x).sum() + (dy.double() * out).sum(), inputs)
    return list(grads) + ([None] if bias is None else [])


def inputs(shape, dtype, bias: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(DEVICE, dtype)
    dres, dy = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(DEVICE, dtype)
    b = (torch.randn(shape[-1], generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    return x, dres, dy, weight, b


@pytest.mark.parametrize("kind,bias", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_equals_the_norms_backward_plus_the_residual(shape, dtype, kind, bias):
    x, dres, dy, weight, b = inputs(shape, dtype, bias)
    expected = autograd_reference(x, dres, dy, weight, b, kind)
    xs = x.clone().requires_grad_()
    ws, bs = weight.clone().requires_grad_(), b.clone().requires_grad_() if b is not None else None
    res, out = norm_residual(xs, ws, bs, 1e-5, kind, kernel=True)
    got = torch.autograd.grad((dres * res).sum() + (dy * out).sum(), [xs, ws] + ([bs] if bs is not None else []))
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # relative to each gradient's largest entry
    for name, g, e in zip(("x", "weight", "bias"), got, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * e.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    # the forward is the norm's: F.layer_norm / F.rms_norm, bit for bit for LayerNorm
    plain = (F.rms_norm(x, (x.shape[-1],), weight, 1e-5) if kind == "RMSNorm"
             else F.layer_norm(x, (x.shape[-1],), weight, b, 1e-5))
    torch.testing.assert_close(out, plain, **({} if kind == "RMSNorm" else dict(rtol=0, atol=0)))
    assert torch.equal(res, x)


@pytest.mark.skipif(not CUDA, reason="torch.compile of the op needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_inside_a_compiled_function(kind):
    """As in the fused layer: the norm's input goes on as the residual of a GEMM's output."""
    def layer(x, w, b, proj):
        res, normed = norm_residual(x, w, b, 1e-5, kind, kernel=True)
        return res + normed @ proj.t()

    x, _, dy, weight, b = inputs((512, 4, 256), torch.bfloat16, kind == "LayerNorm", seed=5)
    proj = torch.randn(256, 256, device=DEVICE, dtype=torch.bfloat16) / 16
    results = []
    for fn in (layer, torch.compile(layer)):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, b, proj)]
        out = fn(*leaves)
        results.append([out] + list(torch.autograd.grad((dy * out).sum(), [t for t in leaves if t is not None])))
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
