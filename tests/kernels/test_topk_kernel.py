"""The Triton top-k-in-order kernel (kernels/topk_triton.py) against PyTorch: the same positions for
distinct scores (odd sizes, k = 1 and k = S, strided and bf16 scores), the documented rule for ties,
NaN, infinities and signed zeros, and inside a compiled function (what the fused MoD layer does).

They need a CUDA GPU with triton and are skipped elsewhere (CI); `TRITON_INTERPRET=1` runs the eager
ones on a CPU through Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

from mod_megatron.kernels import routing as R
from tests.conftest import triton_kernel_env

CUDA, INTERPRET, DEVICE, pytestmark = triton_kernel_env()

SHAPES = [(37, 3, 5), (1, 1, 1), (130, 2, 17), (128, 2, 128), (4096, 2, 512), (2048, 16, 256), (300, 4, 1),
          (5000, 3, 625), (16384, 1, 2048)]


def stable_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's definition: k highest (NaN lowest, -0.0 == +0.0), ties to the earlier position."""
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s) + 0.0
    order = torch.sort(s, dim=0, descending=True, stable=True).indices[:k]
    return torch.sort(order, dim=0).values


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_positions_as_torch_topk(shape):
    from mod_megatron.kernels.topk_triton import topk_in_order

    S, B, k = shape
    g = torch.Generator().manual_seed(S * 7 + B)
    scores = torch.randn(S, B, generator=g).to(DEVICE)  # distinct: no ties to break
    got = topk_in_order(scores, k)
    assert got.dtype == torch.int64 and got.shape == (k, B)
    assert torch.equal(got, R.topk_positions(scores, k, fused=False))
    assert torch.equal(R.topk_positions(scores, k, fused=True), got)
    strided = torch.randn(B, S, generator=g).to(DEVICE).t()  # a column-major view
    assert torch.equal(topk_in_order(strided, k), R.topk_positions(strided, k))


def test_bf16_scores_and_ties_go_to_the_earlier_position():
    from mod_megatron.kernels.topk_triton import topk_in_order

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (257, 5), generator=g).to(torch.bfloat16).to(DEVICE)  # many ties
    for k in (1, 2, 40, 128, 256, 257):
        assert torch.equal(topk_in_order(scores, k), stable_reference(scores, k)), k


def test_nan_infinities_and_signed_zeros():
    from mod_megatron.kernels.topk_triton import topk_in_order

    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[0.0, 1.0], [0.0, nan], [-0.0, 1.0], [-inf, 1.0], [0.0, inf], [nan, -1.0]], device=DEVICE)
    for k in range(1, 7):
        got = topk_in_order(scores, k)
        assert torch.equal(got, stable_reference(scores, k)), k
    assert topk_in_order(scores, 3).t().tolist() == [[0, 1, 2], [0, 2, 4]]
    all_nan = torch.full((9, 2), nan, device=DEVICE)  # still exactly k distinct positions
    assert topk_in_order(all_nan, 4).t().tolist() == [[0, 1, 2, 3]] * 2


def test_extreme_magnitudes_keep_their_order():
    from mod_megatron.kernels.topk_triton import topk_in_order

    big, tiny = torch.finfo(torch.float32).max, 1e-45  # the largest float and the smallest subnormal
    values = torch.tensor([big, -big, tiny, -tiny, float("inf"), float("-inf"), 1.0, -1.0, 0.0, 3e38, -3e38])
    g = torch.Generator().manual_seed(2)
    scores = torch.stack([values[torch.randperm(len(values), generator=g)] for _ in range(3)], 1).to(DEVICE)
    for k in range(1, len(values) + 1):
        assert torch.equal(topk_in_order(scores, k), stable_reference(scores, k)), k


@pytest.mark.skipif(not CUDA, reason="torch.compile of the op needs a CUDA GPU")
def test_inside_a_compiled_function():
    def route(x, w, k: int):
        logits = (x.float() * w.float()).sum(-1)
        index = R.topk_positions(logits, k, fused=True)
        return index, torch.sigmoid(torch.gather(logits, 0, index))

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1024, 4, 64, generator=g).to(DEVICE), torch.randn(64, generator=g).to(DEVICE)
    compiled = torch.compile(route)
    for k in (128, 1024):
        (i1, r1), (i2, r2) = compiled(x, w, k), route(x, w, k)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(r1, r2)
