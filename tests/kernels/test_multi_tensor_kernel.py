"""The multi-tensor copy/accumulate kernel (kernels/multi_tensor_triton.py) against PyTorch, bit for bit:
fp32 += bf16 (the gradient accumulation), fp32 -> bf16 (the optimizer's parameter copy) and back, with
NaN, infinities, rounding ties and huge/tiny values; tensors the kernel cannot take are left to the
caller; and megatron-core's parameter copy routed through it equals megatron's own loop.

They need a CUDA GPU with triton and are skipped elsewhere (CI); `TRITON_INTERPRET=1` runs them on a
CPU through Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import triton_kernel_env

CUDA, INTERPRET, DEVICE, pytestmark = triton_kernel_env()


def _values(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random values over many magnitudes, with the special cases at the front."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.pow(10.0, torch.randint(-30, 30, (n,), generator=g).float())
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
                            -(1.0 + 2 ** -8), 3.0e38, 1.0e-40])
    x[:len(special)] = special
    return x.to(DEVICE, dtype)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (its payload may differ), -0.0 vs +0.0 told apart."""
    nan = want.isnan()
    if not torch.equal(got.isnan(), nan):
        return False
    g, w = got.masked_fill(nan, 0), want.masked_fill(nan, 0)
    return torch.equal(g, w) and torch.equal(torch.signbit(g), torch.signbit(w))


@pytest.mark.parametrize("dst_dtype,src_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)], ids=str)
def test_accumulate_equals_torch_add(dst_dtype, src_dtype):
    from mod_megatron.kernels.multi_tensor_triton import BLOCK, MultiTensor

    sizes = [3 * BLOCK, BLOCK, 2 * BLOCK + 5, 13]  # the last two do not fit the kernel
    dsts = [_values(n, i, dst_dtype) for i, n in enumerate(sizes)]
    srcs = [_values(n, 10 + i, src_dtype).flip(0) for i, n in enumerate(sizes)]
    want = [d.clone().add_(s) for d, s in zip(dsts, srcs)]
    op = MultiTensor(dsts, srcs, accumulate=True)
    assert [d.numel() for d, _ in op.pairs] == sizes[:2] and [d.numel() for d, _ in op.rest] == sizes[2:]
    op()
    assert all(_same(d, w) for d, w in zip(dsts[:2], want[:2]))
    assert all(_same(d, _values(n, i, dst_dtype)) for i, (d, n) in enumerate(zip(dsts[2:], sizes[2:]), 2))
    op.run_all()  # the rest by torch; the kernel's tensors accumulate a second time
    assert all(_same(d, w) for d, w in zip(dsts[2:], want[2:]))
    assert all(_same(d, w.add_(s)) for d, w, s in zip(dsts[:2], want[:2], srcs[:2]))


@pytest.mark.parametrize("dst_dtype,src_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
def test_copy_equals_torch_copy(dst_dtype, src_dtype):
    """fp32 -> bf16 rounds to nearest, ties to even, as Tensor.copy_ does; bf16 -> fp32 is exact."""
    from mod_megatron.kernels.multi_tensor_triton import BLOCK, MultiTensor

    srcs = [_values(4 * BLOCK, 1, src_dtype), _values(BLOCK, 2, src_dtype)]
    dsts = [torch.full(s.shape, 7.0, device=DEVICE, dtype=dst_dtype) for s in srcs]
    MultiTensor(dsts, srcs, accumulate=False).run_all()
    assert all(_same(d, s.to(dst_dtype)) for d, s in zip(dsts, srcs))
    if dst_dtype == torch.bfloat16:  # the two ties: to the even neighbour
        assert dsts[0][5].item() == 1.0 and dsts[0][6].item() == 1.0 + 2 ** -6


def test_what_the_kernel_cannot_take_is_left_to_the_caller():
    from mod_megatron.kernels.multi_tensor_triton import BLOCK, MultiTensor, fits

    base = torch.zeros(2 * BLOCK + 4, device=DEVICE)
    unaligned, strided = base[1:BLOCK + 1], torch.zeros(BLOCK, 2, device=DEVICE)[:, 0]
    assert fits(base[:BLOCK]) and not fits(unaligned) and not fits(strided) and not fits(base[:0])
    src = torch.ones(BLOCK, device=DEVICE)
    op = MultiTensor([unaligned, strided], [src, src], accumulate=True)
    assert op.pairs == [] and len(op.rest) == 2 and op.groups == []
    op.run_all()
    assert float(unaligned.sum()) == BLOCK and float(strided.sum()) == BLOCK and float(base[0]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        MultiTensor([base[:BLOCK]], [torch.zeros(BLOCK, 1, device=DEVICE)], accumulate=False)


@pytest.mark.skipif(not CUDA, reason="megatron-core's copy is routed through the kernel on CUDA tensors only")
def test_megatrons_parameter_copy_goes_through_the_kernel_unchanged(monkeypatch):
    from megatron.core.optimizer import optimizer

    from mod_megatron.training import multi_tensor

    megatrons = multi_tensor.megatrons_copy()
    monkeypatch.setattr(optimizer, "_multi_tensor_copy_this_to_that", megatrons)
    multi_tensor.install()
    assert optimizer._multi_tensor_copy_this_to_that is multi_tensor.copy_this_to_that
    main = [_values(n, n) for n in (4096 * 1024, 1024, 13, 128 * 1024)]  # fp32 main params (one does not fit)
    want, got = ([torch.empty_like(m, dtype=torch.bfloat16) for m in main] for _ in range(2))
    megatrons(main, want, None)
    multi_tensor.copy_this_to_that(main, got, None)
    op = multi_tensor.copy_op(main, got)
    multi_tensor.copy_this_to_that(main, got, None)  # the second call reuses the tables
    assert multi_tensor.copy_op(main, got) is op
    assert all(_same(g, w) for g, w in zip(got, want))


def test_copy_tables_are_made_once_per_list_pair_and_only_a_few_kept(monkeypatch):
    """A ChainedOptimizer's parts copy their own lists in turn: each pair's tables are made once, not on
    every call; beyond the few most recent pairs, the oldest is let go (with the tensors it held)."""
    from mod_megatron.kernels import multi_tensor_triton
    from mod_megatron.training import multi_tensor

    made = []
    monkeypatch.setattr(multi_tensor, "_copies", {})
    real = multi_tensor_triton.MultiTensor
    monkeypatch.setattr(multi_tensor_triton, "MultiTensor", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    parts = [([_values(1024, i)], [torch.empty(1024, device=DEVICE, dtype=torch.bfloat16)]) for i in range(6)]
    for _ in range(3):  # two parts taking turns
        for this, that in parts[:2]:
            multi_tensor.copy_op(this, that).run_all()
            assert _same(that[0], this[0].to(torch.bfloat16))
    assert len(made) == 2 and len(multi_tensor._copies) == 2
    for this, that in parts:  # six pairs: the two oldest are dropped
        multi_tensor.copy_op(this, that)
    assert len(made) == 6 and len(multi_tensor._copies) == multi_tensor._MAX_COPIES
    assert multi_tensor.copy_op(*parts[5]) is made[-1] and len(made) == 6
    multi_tensor.copy_op(*parts[0])  # dropped before: made again
    assert len(made) == 7
