"""MoDTransformerLayer: skip/route semantics, router gradient, dense equivalence, RoPE positions, causality."""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

import mod_megatron.model.router as router_mod
from mod_megatron.model.mod_layer import MoDTransformerLayer
from mod_megatron.model.router import Routing

S, B, H = 32, 2, 64


def _setup(build_gpt, capacity=0.25, seed=0):
    """(model, MoD layer 1, input x [S,B,H], rotary freqs [S,1,1,d]) with a larger router init so routing is decisive."""
    _, model = build_gpt(f"--mod.capacity={capacity}", "--mod.router_init_std=0.5", seed=seed)
    layer = model.decoder.layers[1]
    assert isinstance(layer, MoDTransformerLayer)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(S, B, H, generator=g)
    rope = model.rotary_pos_emb(S)
    assert rope.shape == (S, 1, 1, H // 4)
    return model, layer, x, rope


def _dense(layer, x, rope):
    """The plain TransformerLayer forward with the MoD layer's own parameters."""
    return TransformerLayer.forward(layer, hidden_states=x, attention_mask=None, rotary_pos_emb=rope)[0]


def _fix_routing(monkeypatch, layer, index):
    """Make the layer route exactly `index` [k,B] (weights still from its router)."""
    def route(hidden_states):
        logits = layer.router(hidden_states)
        return Routing(index=index, weight=router_mod.router_weight(torch.gather(logits, 0, index), "sigmoid"),
                       logits=logits)
    monkeypatch.setattr(layer, "route", route)


def test_skipped_tokens_are_bit_identical_and_routed_tokens_change(build_gpt):
    _, layer, x, rope = _setup(build_gpt)
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    kept = torch.zeros(S, B, dtype=torch.bool).scatter(0, layer.last_routing.index, True)
    assert int(kept.sum()) == 8 * B
    assert torch.equal(out[~kept], x[~kept])
    assert not torch.isclose(out[kept], x[kept]).all(dim=-1).any()


def test_layer_runs_attention_and_mlp_on_k_tokens_only(build_gpt):
    _, layer, x, rope = _setup(build_gpt)
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
             for m in (layer.self_attention, layer.mlp)]
    layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    for h in hooks:
        h.remove()
    assert shapes == [(8, B, H), (8, B, H)]


def test_routed_tokens_equal_residual_plus_weighted_branch(build_gpt):
    _, layer, x, rope = _setup(build_gpt)
    with torch.no_grad():
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        logits = torch.einsum("sbh,h->sb", x, layer.router.weight)
        for b in range(B):
            idx = torch.sort(torch.topk(logits[:, b], 8).indices).values  # independent of the layer's routing
            assert torch.equal(idx, layer.last_routing.index[:, b])
            x_r = x[idx, b:b + 1]  # [k,1,H]
            r = torch.sigmoid(logits[idx, b]).view(-1, 1, 1)
            expected = x_r + r * (_dense(layer, x_r, rope[idx]) - x_r)  # original rotary positions
            torch.testing.assert_close(out[idx, b:b + 1], expected, rtol=1e-5, atol=1e-5)


def test_router_gets_gradient_from_lm_loss(build_gpt):
    cfg, model = build_gpt()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 100, (2, S), generator=g)
    pos = torch.arange(S).unsqueeze(0).expand(2, S)
    model(tokens, pos, None, labels=tokens).mean().backward()
    routers = [layer.router.weight for layer in model.decoder.layers if isinstance(layer, MoDTransformerLayer)]
    assert len(routers) == 2
    for w in routers:
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_capacity_one_is_dense_layer_scaled_by_router_weight(build_gpt):
    _, layer, x, rope = _setup(build_gpt, capacity=1.0)
    with torch.no_grad():
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        dense = _dense(layer, x, rope)
        r = torch.sigmoid(torch.einsum("sbh,h->sb", x, layer.router.weight)).unsqueeze(-1)
    torch.testing.assert_close(out, x + r * (dense - x), rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-2  # r < 1 really scales the branch


def test_capacity_one_with_unit_router_weight_is_exactly_dense(build_gpt, monkeypatch):
    _, layer, x, rope = _setup(build_gpt, capacity=1.0)
    monkeypatch.setattr(router_mod, "router_weight", lambda logits, kind: torch.ones_like(logits))
    with torch.no_grad():
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        assert torch.equal(layer.last_routing.weight, torch.ones(S, B))
        assert torch.allclose(out, _dense(layer, x, rope), rtol=0, atol=1e-6)


# Non-uniform gaps between routed positions, different per sequence, so relative distances matter.
FIXED = torch.tensor([[2, 0], [3, 5], [9, 6], [10, 7], [17, 20], [25, 21], [26, 22], [31, 30]])


def test_routed_tokens_keep_their_original_rotary_positions(build_gpt, monkeypatch):
    _, layer, x, rope = _setup(build_gpt)
    _fix_routing(monkeypatch, layer, FIXED)
    with torch.no_grad():
        layer.self_attention.linear_qkv.weight.mul_(10.0)  # sharp attention, so positions matter
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        r = torch.sigmoid(torch.einsum("sbh,h->sb", x, layer.router.weight))
        k = FIXED.shape[0]
        for b in range(B):
            idx = FIXED[:, b]
            x_r = x[idx, b:b + 1]
            w = r[idx, b].view(-1, 1, 1)
            original = x_r + w * (_dense(layer, x_r, rope[idx]) - x_r)
            compacted = x_r + w * (_dense(layer, x_r, rope[:k]) - x_r)  # positions 0..k-1: wrong
            torch.testing.assert_close(out[idx, b:b + 1], original, rtol=1e-5, atol=1e-5)
            assert (out[idx[1:], b] - compacted[1:, 0]).abs().max() > 1e-2
            # Each routed token sees exactly the earlier routed tokens as context, at their real positions.
            for j in (0, 3, k - 1):
                pre = idx[:j + 1]
                y = x[pre, b:b + 1]
                last = y[-1] + w[j] * (_dense(layer, y, rope[pre])[-1] - y[-1])
                torch.testing.assert_close(out[idx[j], b:b + 1], last, rtol=1e-5, atol=1e-5)


def test_routed_outputs_are_causal_given_the_routing(build_gpt, monkeypatch):
    _, layer, x, rope = _setup(build_gpt)
    _fix_routing(monkeypatch, layer, FIXED)
    t = 15
    x2 = x.clone()
    x2[t + 1:] += torch.randn(S - t - 1, B, H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out1, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        out2, _ = layer(hidden_states=x2, attention_mask=None, rotary_pos_emb=rope)
    assert torch.allclose(out1[:t + 1], out2[:t + 1], rtol=0, atol=1e-6)
    later = FIXED[FIXED[:, 0] > t, 0]
    assert (out1[later, 0] - out2[later, 0]).abs().max() > 1e-3  # later routed tokens do change
