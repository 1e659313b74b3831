"""Triton routing kernels (kernels/routing_triton.py) against the PyTorch reference: outputs and gradients.

They need a CUDA GPU with triton and are skipped elsewhere (CI). For debugging kernels without a GPU,
`TRITON_INTERPRET=1` runs the kernel-level tests on the CPU through Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_block import rotary
from mod_megatron.kernels import routing as R
from tests.conftest import triton_kernel_env

CUDA, INTERPRET, DEVICE, pytestmark = triton_kernel_env()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with triton")

# (S, B, H, k): odd sizes, k = 1 and k = S, H not a power of two, H over one 2048 block.
SHAPES = [(37, 3, 96, 5), (37, 3, 96, 37), (1, 1, 8, 1), (130, 2, 1000, 17), (64, 2, 2304, 9), (512, 4, 1024, 64)]
DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)


def _case(S, B, H, k, dtype, seed=0):
    """x [S,B,H], sorted distinct top-k positions [k,B], y [k,B,H], weight [k,B] fp32, cotangent [S,B,H]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, H, generator=g)
    index = torch.sort(torch.rand(S, B, generator=g).topk(k, dim=0).indices, dim=0).values
    y = torch.randn(k, B, H, generator=g)
    weight = torch.rand(k, B, generator=g)
    cot = torch.randn(S, B, H, generator=g)
    to = dict(device=DEVICE)
    return x.to(dtype=dtype, **to), index.to(**to), y.to(dtype=dtype, **to), weight.to(**to), cot.to(dtype=dtype, **to)


def _run(fused, x, index, y, weight, cot, upcast=False):
    """Gather, then combine with y; output and grads of sum(out * cot) w.r.t. x, y, weight."""
    if upcast:
        x, y, cot = x.float(), y.float(), cot.float()
    x, y, weight = (t.detach().clone().requires_grad_(True) for t in (x, y, weight))
    rows = R.gather_tokens(x, index, fused)
    out = R.combine_tokens(x, y, weight, index, fused, x_rows=rows)
    grads = torch.autograd.grad((out.float() * cot.float()).sum(), (x, y, weight))
    return (out, *grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,H,k", SHAPES)
def test_gather_is_an_exact_copy_and_its_grad_an_exact_scatter(S, B, H, k, dtype):
    x, index, _, _, _ = _case(S, B, H, k, dtype)
    x.requires_grad_(True)
    fused = R.gather_tokens(x, index, fused=True)
    ref = R.gather_tokens(x, index, fused=False)
    assert fused.shape == (k, B, H) and fused.dtype == dtype and torch.equal(fused, ref)
    g = torch.randn(k, B, H, device=DEVICE).to(dtype)
    (gx_fused,) = torch.autograd.grad(fused, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx_fused, gx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,H,k", SHAPES)
def test_combine_matches_reference_outputs_and_grads(S, B, H, k, dtype):
    case = _case(S, B, H, k, dtype, seed=S + k)
    fused = _run(True, *case)
    truth = _run(False, *case, upcast=True)  # fp32 maths on the same inputs
    for name, a, b in zip(("out", "grad x", "grad y", "grad weight"), fused, truth):
        assert a.dtype == (torch.float32 if name == "grad weight" else dtype), name
        torch.testing.assert_close(a.float(), b.float(), **_tol(dtype), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_leaves_skipped_rows_bit_identical(dtype):
    x, index, y, weight, _ = _case(37, 3, 96, 5, dtype)
    out = R.combine_tokens(x, y, weight, index, fused=True)
    kept = torch.zeros(37, 3, dtype=torch.bool, device=DEVICE).scatter(0, index, True)
    assert torch.equal(out[~kept], x[~kept])
    assert not torch.equal(out[kept], x[kept])


# ------------------------------------------------------------------ the MoD layer on a GPU




def _mod_layer(fused: str, dtype, hidden=256, capacity=0.125):
    from megatron.core.transformer.spec_utils import build_module

    from mod_megatron.config import load_config
    from mod_megatron.model.gpt import transformer_config
    from mod_megatron.model.spec import mod_layer_spec

    cfg = load_config(None, [f"--model.hidden_size={hidden}", "--model.num_attention_heads=4", "--model.num_layers=1",
                             "--mod.first_routed=0", f"--mod.capacity={capacity}", f"--mod.fused_routing={fused}",
                             "--mod.router_init_std=0.5"])
    torch.manual_seed(0)
    layer = build_module(mod_layer_spec(cfg), config=transformer_config(cfg, dtype), layer_number=1)
    return layer.to(device="cuda", dtype=dtype)



def _fwd_bwd(layer, x, rope, cot):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    (out.float() * cot).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_mod_layer_fused_equals_pytorch_routing(gpu_process, dtype):
    from mod_megatron.model.predictor import set_aux_loss_scale

    set_aux_loss_scale(torch.ones(1, device="cuda"))
    S, B, H = 203, 3, 256
    on = _mod_layer("on", dtype)
    off = _mod_layer("off", dtype)
    off.load_state_dict(on.state_dict())
    x = torch.randn(S, B, H, device="cuda", dtype=dtype)
    cot = torch.randn(S, B, H, device="cuda")
    rope = rotary(S, H // 4, "cuda")
    a, b = _fwd_bwd(on, x, rope, cot), _fwd_bwd(off, x, rope, cot)
    assert torch.equal(on.last_routing.index, off.last_routing.index)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(a[0].float(), b[0].float(), **tol)
    torch.testing.assert_close(a[1].float(), b[1].float(), **tol)
    for name in a[2]:
        ga, gb = a[2][name], b[2][name]
        scale = max(1.0, float(gb.float().abs().max()))
        torch.testing.assert_close(ga.float() / scale, gb.float() / scale, **tol, msg=lambda m: f"{name}: {m}")


@needs_cuda
def test_mod_layer_forward_backward_never_syncs_with_the_host(gpu_process):
    from mod_megatron.model.predictor import set_aux_loss_scale

    set_aux_loss_scale(torch.ones(1, device="cuda"))
    layer = _mod_layer("on", torch.bfloat16)
    x = torch.randn(256, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rope = rotary(256, 64, "cuda")
    _fwd_bwd(layer, x, rope, torch.ones(256, 2, 256, device="cuda"))  # warm-up: lazy inits may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = layer.last_aux  # the diagnostics (read at log steps) may sync; they still work afterwards
    assert set(stats) == {"router_bce", "router_confusion", "predictor_bce", "predictor_confusion"}
