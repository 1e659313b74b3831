"""The Triton predictor kernel (kernels/predictor_triton.py) against the F.linear predictor of
model/predictor.py: the same logits and the same weight gradients (bf16 tolerance) on odd sizes, through
`predictor_logits(..., fused=True)` eagerly and inside a compiled function; and with the router's score
from the same kernel (`RouterAndPredictor`, what the compiled routed layer runs) against both references.

They need a CUDA GPU with triton and are skipped elsewhere (CI); `TRITON_INTERPRET=1` runs them on a CPU
through Triton's interpreter in fp32 (the compiled one excepted).
"""
from __future__ import annotations

import pytest
import torch

from mod_megatron.model.predictor import Predictor, predictor_logits
from tests.conftest import triton_kernel_env

CUDA, INTERPRET, DEVICE, pytestmark = triton_kernel_env()

# (S, B, H): H/8 hidden units; odd token counts and widths that are no multiple of the blocks (193 units:
# one block of 256 (FWD_WIDE), partly masked; 257 units: two such blocks, the last nearly empty; 512 units:
# wider than predictor_logits gives the kernel, see below)
SHAPES = [(37, 3, 200), (1, 1, 64), (130, 2, 1024), (257, 1, 136), (2048, 4, 1024), (70, 3, 1544), (65, 3, 2056),
          (40, 2, 4096)]


# Triton's interpreter computes bf16 dots wrongly (garbage seen with triton 3.9): fp32 there, bf16 on a GPU
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _case(shape, dtype=DTYPE, seed=0):
    s, b, h = shape
    torch.manual_seed(seed)
    pred = Predictor(h).to(DEVICE, dtype)
    x = torch.randn(s, b, h, device=DEVICE, dtype=dtype)
    target = (torch.rand(s, b, device=DEVICE) < 0.125).float()
    return pred, x, target


def _through_kernels(x, w1, b1, w2, b2, fused=True):
    """predictor_logits' fused path; under the interpreter (CPU tensors) the kernels' autograd function
    itself, which predictor_logits keeps for CUDA tensors."""
    if CUDA:
        return predictor_logits(x, w1, b1, w2, b2, fused=True)
    from mod_megatron.kernels.predictor_triton import RouterAndPredictor

    return RouterAndPredictor.apply(x.detach().reshape(-1, x.shape[-1]), None, w1, b1, w2, b2)[1].view(x.shape[:-1])


def _run(pred, x, target, fused, fn=None):
    for p in pred.parameters():
        p.grad = None
    fn = fn or (_through_kernels if fused else predictor_logits)
    logits = fn(x, *pred.weights(), fused=fused)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / target.numel()
    loss.backward()
    return logits.detach(), [p.grad.float() for p in pred.weights()]


def _close(got, want, what, floor=1e-6):
    """Max error within 2% of the reference's largest value (or of `floor`: a logit is a sum of terms of
    about 0.1 whose bf16 rounding errors stay when they cancel; one token's logit can be near 0)."""
    scale = want.abs().max().clamp(min=floor)
    err = (got.float() - want.float()).abs().max() / scale
    assert err < 2e-2, f"{what}: max error {err:.3g} of the reference's max {scale:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_logits_and_weight_gradients_match_the_reference(shape):
    pred, x, target = _case(shape)
    x.requires_grad_(True)
    ref_logits, ref_grads = _run(pred, x, target, fused=False)
    logits, grads = _run(pred, x, target, fused=True)
    assert logits.dtype == torch.float32 and logits.shape == shape[:2]
    _close(logits, ref_logits, "logits", floor=0.1)
    for name, got, want in zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), grads, ref_grads):
        assert got.shape == want.shape, name
        _close(got, want, name)
    assert x.grad is None  # the predictor's input is detached either way


def test_same_bits_every_run():
    pred, x, target = _case((300, 2, 256), seed=1)
    first = _run(pred, x, target, fused=True)
    again = _run(pred, x, target, fused=True)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_fused_dispatch_takes_the_kernels_for_bf16_cuda_tensors_only(monkeypatch):
    from mod_megatron.kernels import predictor_triton

    calls = []
    apply = predictor_triton.RouterAndPredictor.apply
    monkeypatch.setattr(predictor_triton.RouterAndPredictor, "apply", lambda *a: calls.append(1) or apply(*a))
    pred, x, target = _case((33, 2, 128))
    predictor_logits(x, *pred.weights(), fused=True)
    assert len(calls) == (1 if CUDA else 0)  # CPU tensors (the interpreter's) take the reference
    for shape, dtype in (((33, 2, 128), torch.float32), ((33, 2, 4096), DTYPE)):
        # fp32 (no bf16 tensor cores) and H = 4096 (MAX_UNITS): the reference, bit for bit
        pred, x, target = _case(shape, dtype=dtype)
        assert torch.equal(predictor_logits(x, *pred.weights(), fused=True), predictor_logits(x, *pred.weights()))
        assert len(calls) == (1 if CUDA else 0)


@pytest.mark.skipif(not CUDA, reason="torch.compile of the op needs a CUDA GPU")
def test_inside_a_compiled_function():
    pred, x, target = _case((1024, 2, 512), seed=2)
    ref_logits, ref_grads = _run(pred, x, target, fused=False)
    logits, grads = _run(pred, x, target, fused=True, fn=torch.compile(predictor_logits, fullgraph=True))
    _close(logits, ref_logits, "compiled logits", floor=0.1)
    for got, want in zip(grads, ref_grads):
        _close(got, want, "compiled grads")


@pytest.mark.parametrize("shape", [(37, 3, 200), (130, 2, 1024), (70, 3, 1544), (65, 3, 2056)], ids=str)
def test_router_and_predictor_from_one_read_match_the_two_references(shape):
    """The routed layer's fused scores: router logits x . wr (with x's gradient) and the predictor's
    (detached input), the forward in one kernel, both weight gradients from one GEMM."""
    from mod_megatron.kernels.predictor_triton import RouterAndPredictor

    pred, x, target = _case(shape, seed=3)
    s, b, h = shape
    wr = torch.randn(h, generator=torch.Generator().manual_seed(4)).mul(0.05).to(DEVICE, DTYPE).requires_grad_(True)
    mix = torch.randn(s, b, generator=torch.Generator().manual_seed(5)).to(DEVICE)  # the router logits' gradient

    def run(fused):
        xx = x.clone().requires_grad_(True)
        wr.grad = None
        for p in pred.parameters():
            p.grad = None
        if fused:
            r, p = RouterAndPredictor.apply(xx.reshape(s * b, h), wr, *pred.weights())
            r, p = r.view(s, b), p.view(s, b)
        else:
            r, p = (xx.float() * wr.float()).sum(-1), predictor_logits(xx, *pred.weights())
        loss = (r * mix).sum() + torch.nn.functional.binary_cross_entropy_with_logits(p, target, reduction="sum")
        loss.backward()
        return [r.detach(), p.detach(), xx.grad, wr.grad] + [q.grad for q in pred.weights()]

    names = ["router logits", "predictor logits", "x grad", "router weight grad", "fc1.weight", "fc1.bias",
             "fc2.weight", "fc2.bias"]
    for name, got, want in zip(names, run(True), run(False)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        _close(got, want, name, floor=0.1 if "logits" in name else 1e-6)
