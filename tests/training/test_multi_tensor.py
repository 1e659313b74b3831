"""training/multi_tensor.py: the foreach grad norm and scale/copy equal megatron-core's local fallbacks,
and install() swaps in exactly those fallbacks."""
from __future__ import annotations

import pytest
import torch

from mod_megatron.training import multi_tensor


def _tensors(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in [(7, 3), (128,), (33, 5, 2), (1,)]]


def test_l2_norm_equals_megatrons_fallback(megatron_single_rank):
    from megatron.core.utils import local_multi_tensor_l2_norm

    tensors = _tensors()
    flag = torch.zeros(1, dtype=torch.int)
    want, _ = local_multi_tensor_l2_norm(2048 * 32, flag, [tensors], False)
    got, _ = multi_tensor.l2_norm(2048 * 32, flag, [tensors], False)
    assert got.shape == (1,)
    torch.testing.assert_close(got, want.to(got.device), rtol=1e-6, atol=0)
    torch.testing.assert_close(got[0], torch.cat([t.reshape(-1) for t in tensors]).norm(), rtol=1e-6, atol=0)
    assert float(multi_tensor.l2_norm(1, flag, [[]], False)[0]) == 0.0


@pytest.mark.parametrize("factor", [1.0, 0.25])
@pytest.mark.parametrize("in_place", [False, True])
def test_scale_equals_megatrons_fallback(factor, in_place):
    from megatron.core.utils import local_multi_tensor_scale

    src = _tensors()
    results = []
    for impl in (local_multi_tensor_scale, multi_tensor.scale):
        s = [t.clone() for t in src]
        d = s if in_place else [torch.empty_like(t, dtype=torch.bfloat16) for t in s]  # fp32 main -> bf16 model
        impl(2048 * 32, torch.zeros(1, dtype=torch.int), [s, d], factor)
        results.append(d)
    for want, got in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_install_replaces_only_megatrons_fallbacks(monkeypatch):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    sentinel = object()  # as if apex/TE had provided the kernel
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", sentinel)
    monkeypatch.setattr(optimizer, "_multi_tensor_copy_this_to_that", multi_tensor.megatrons_copy())
    multi_tensor.install()
    assert clip_grads.l2_norm_impl is multi_tensor.l2_norm
    assert clip_grads.multi_tensor_scale_impl is multi_tensor.scale
    assert optimizer.multi_tensor_scale_impl is sentinel


def test_the_parameter_copy_is_replaced_on_a_gpu_only(monkeypatch):
    """On CUDA install() routes megatron's bf16 parameter copy through the multi-tensor kernel (its equality
    with megatron's loop: tests/kernels/test_multi_tensor_kernel.py); without CUDA it stays megatron's."""
    from megatron.core.optimizer import optimizer

    megatrons = multi_tensor.megatrons_copy()
    monkeypatch.setattr(optimizer, "_multi_tensor_copy_this_to_that", megatrons)
    multi_tensor.install()
    multi_tensor.install()  # twice: still one wrapper around megatron's function
    if torch.cuda.is_available():
        assert optimizer._multi_tensor_copy_this_to_that is multi_tensor.copy_this_to_that
        assert multi_tensor._megatron_copy is megatrons
    else:
        assert optimizer._multi_tensor_copy_this_to_that is megatrons
