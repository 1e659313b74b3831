"""model.fused_rope (model/rope.py): the same rotation as megatron-core's, moved into SDPA attention.

On a CPU the eager formula runs, so a model with it on must equal the model with it off bit for bit;
on a GPU (skipped in CI) the torch.compile'd kernel must equal the formula within bf16 rounding.
"""
from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.transformer.attention import SelfAttention

from mod_megatron.model.attention import FusedRopeSelfAttention
from mod_megatron.model.rope import apply_rope, rotate

CUDA = torch.cuda.is_available()


def _qk(s=13, b=3, heads=4, d=16, dtype=torch.float32, device="cpu", seed=0):
    """Query and key as megatron makes them: strided views of one fused QKV projection."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(s, b, heads, 3 * d, generator=g, device=device, dtype=dtype)
    return qkv[..., :d], qkv[..., d:2 * d]


def _freqs(s, rot, batch=None, device="cpu"):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    pos = torch.arange(s, dtype=torch.float32, device=device)
    if batch is not None:  # a MoD layer's routed tokens: each (row, sequence) its own position
        pos = torch.randperm(4 * s, generator=torch.Generator().manual_seed(1))[:s * batch].float().to(device)
    f = torch.outer(pos, inv)
    f = torch.cat([f, f], dim=-1)
    return f.view(s, 1, 1, rot) if batch is None else f.view(s, batch, 1, rot)


@pytest.mark.parametrize("rot,per_token", [(16, False), (16, True), (8, False)], ids=["full", "mod-rows", "partial"])
def test_rotation_is_megatrons_bit_for_bit(rot, per_token):
    q, k = _qk()
    f = _freqs(q.shape[0], rot, batch=q.shape[1] if per_token else None)
    assert torch.equal(rotate(q, f), _apply_rotary_pos_emb_bshd(q, f))
    rq, rk = apply_rope(q, k, f, f)  # CPU tensors: the eager formula
    assert torch.equal(rq, _apply_rotary_pos_emb_bshd(q, f)) and torch.equal(rk, _apply_rotary_pos_emb_bshd(k, f))


def test_modes_are_checked():
    q, k = _qk()
    f = _freqs(q.shape[0], 16)
    with pytest.raises(ValueError, match="fused_rope"):
        apply_rope(q, k, f, f, mode="fast")
    if not CUDA:
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            apply_rope(q, k, f, f, mode="on")


@pytest.mark.skipif(CUDA, reason="CPU: the eager formula, bit for bit; the GPU test below covers the fused kernel")
@pytest.mark.parametrize("extra", [[], ["--mod.enabled=false"], ["--model.num_query_groups=2"]],
                         ids=["mod", "dense", "gqa"])
def test_model_with_fused_rope_equals_model_without(build_gpt, extra):
    tokens = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("off", "auto"):
        _, model = build_gpt(f"--model.fused_rope={mode}", *extra, seed=0)
        attn = model.decoder.layers[0].self_attention
        assert isinstance(attn, FusedRopeSelfAttention) == (mode == "auto") and isinstance(attn, SelfAttention)
        loss = model(tokens[:, :-1], torch.arange(32).expand(2, 32), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        out[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(out["off"][0], out["auto"][0])
    assert all(torch.equal(out["off"][1][n], out["auto"][1][n]) for n in out["off"][1])


def test_other_position_embeddings_keep_megatrons_attention(build_gpt):
    _, model = build_gpt("--model.position_embedding=learned_absolute")
    assert type(model.decoder.layers[0].self_attention) is SelfAttention


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.compile with triton)")
@pytest.mark.parametrize("per_token", [False, True], ids=["dense", "mod-rows"])
def test_compiled_rope_equals_the_formula_on_a_gpu(per_token):
    q, k = _qk(s=256, b=4, heads=8, d=64, dtype=torch.bfloat16, device="cuda")
    f = _freqs(256, 64, batch=4 if per_token else None, device="cuda")
    results = {}
    for mode in ("fp32", "off", "on"):  # fp32: the formula on upcast inputs, the reference for both
        qq, kk = (t.detach().clone().float() if mode == "fp32" else t.detach().clone() for t in (q, k))
        qq.requires_grad_(True)
        kk.requires_grad_(True)
        rq, rk = apply_rope(qq, kk, f, f, mode="off" if mode == "fp32" else mode)
        ((rq.float() * 1.5).sum() + (rk.float() ** 2).sum()).backward()
        results[mode] = (rq, rk, qq.grad, kk.grad)
    # The compiled kernel rounds to bf16 once, the eager formula after every op: both are within bf16
    # rounding of the fp32 result, the compiled one at least as close.
    for got, eager, want in zip(results["on"], results["off"], results["fp32"]):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
        assert (got.float() - want).abs().max() <= (eager.float() - want).abs().max() + 1e-2
