"""Router maths: capacity -> k, expert-choice top-k per sequence, router weights."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from mod_megatron.model.router import Router, capacity_tokens, router_weight, topk_route


@pytest.mark.parametrize("seq_len", [1, 2, 7, 10, 32, 100, 128, 4096])
@pytest.mark.parametrize("capacity", [0.01, 0.1, 0.125, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_capacity_tokens_is_ceil_of_exact_product(seq_len, capacity):
    exact = math.ceil(Fraction(repr(capacity)) * seq_len)  # ceil(c*S) without float noise
    assert capacity_tokens(seq_len, capacity) == max(1, exact)


def test_capacity_tokens_bounds():
    assert capacity_tokens(10, 0.3) == 3  # 0.3 * 10 == 3.0000000000000004 in floats
    assert capacity_tokens(30, 0.25) == 8  # 7.5 rounds up
    assert capacity_tokens(16, 1e-6) == 1  # never zero tokens
    assert capacity_tokens(16, 1.0) == 16
    assert capacity_tokens(16, 1.5) == 16  # never more than the sequence
    assert capacity_tokens(1, 0.125) == 1


def _random_logits(seq_len, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(seq_len, batch, generator=g)


@pytest.mark.parametrize("seq_len,batch,capacity", [(32, 3, 0.125), (33, 2, 0.25), (16, 4, 0.5), (9, 1, 0.9)])
def test_topk_route_keeps_exactly_the_topk_in_original_order(seq_len, batch, capacity):
    logits = _random_logits(seq_len, batch)
    k = capacity_tokens(seq_len, capacity)
    routing = topk_route(logits, capacity, "sigmoid")
    assert routing.index.shape == (k, batch)
    assert routing.weight.shape == (k, batch)
    assert routing.logits is logits
    for b in range(batch):
        idx = routing.index[:, b]
        assert bool((idx[1:] > idx[:-1]).all()), f"indices not strictly increasing: {idx.tolist()}"
        expected = set(torch.topk(logits[:, b], k).indices.tolist())
        assert set(idx.tolist()) == expected
        kept = torch.zeros(seq_len, dtype=torch.bool)
        kept[idx] = True
        if k < seq_len:
            assert logits[kept, b].min() > logits[~kept, b].max()
    torch.testing.assert_close(routing.weight, torch.sigmoid(torch.gather(logits, 0, routing.index)),
                               rtol=0, atol=0)


def test_topk_route_ties_still_give_k_distinct_sorted_positions():
    logits = torch.zeros(20, 2)
    routing = topk_route(logits, 0.25, "sigmoid")
    for b in range(2):
        idx = routing.index[:, b].tolist()
        assert len(idx) == 5 and idx == sorted(set(idx))


def test_topk_route_capacity_one_keeps_every_token_in_order():
    logits = _random_logits(12, 3)
    routing = topk_route(logits, 1.0, "linear")
    assert torch.equal(routing.index, torch.arange(12).unsqueeze(1).expand(12, 3))
    assert torch.equal(routing.weight, logits)


def test_topk_route_gradient_reaches_only_kept_logits():
    logits = _random_logits(16, 2).requires_grad_(True)
    routing = topk_route(logits, 0.25, "sigmoid")
    routing.weight.sum().backward()
    kept = torch.zeros(16, 2, dtype=torch.bool).scatter(0, routing.index, True)
    assert bool((logits.grad[kept] > 0).all())  # sigmoid' > 0
    assert bool((logits.grad[~kept] == 0).all())


def test_router_weight_kinds():
    logits = torch.tensor([-30.0, -1.0, 0.0, 2.0, 30.0])
    s = router_weight(logits, "sigmoid")
    torch.testing.assert_close(s, torch.sigmoid(logits))
    assert bool(((s >= 0) & (s <= 1)).all()) and s[2] == 0.5
    assert torch.equal(router_weight(logits, "linear"), logits)
    with pytest.raises(ValueError, match="relu"):
        router_weight(logits, "relu")


def test_router_scores_tokens_in_fp32():
    torch.manual_seed(0)
    router = Router(8, init_std=0.5)
    x = torch.randn(5, 3, 8)
    logits = router(x)
    assert logits.shape == (5, 3) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.einsum("sbh,h->sb", x, router.weight.detach()))
    assert router(x.bfloat16()).dtype == torch.float32
    assert abs(float(Router(4096, init_std=0.02).weight.detach().std()) - 0.02) < 0.002
