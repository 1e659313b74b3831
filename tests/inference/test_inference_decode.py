"""Causal routing modes and the routed KV cache: no future leakage, cached decoding == full recompute."""
from __future__ import annotations

import pytest
import torch

from mod_megatron.inference.decode import CachedDecoder
from mod_megatron.model.mod_layer import MoDTransformerLayer, set_routing_mode

S, V = 32, 100
MODES = ["causal-router", "causal-predictor"]


def _model(build_gpt, *extra):
    # A large router init makes causal-router decisions mixed (about half the tokens routed).
    _, model = build_gpt("--mod.router_init_std=0.5", *extra, seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # an untrained predictor says "skip" everywhere; make it undecided too
        for layer in model.decoder.layers:
            if isinstance(layer, MoDTransformerLayer):
                layer.predictor.fc1.bias.zero_()
                layer.predictor.fc2.bias.zero_()
                layer.predictor.fc2.weight.copy_(torch.randn(layer.predictor.fc2.weight.shape, generator=g))
    model.eval()
    return model


def _tokens(batch=2, seed=5):
    return torch.randint(0, V, (batch, S), generator=torch.Generator().manual_seed(seed))


def _full_logits(model, tokens, mode):
    set_routing_mode([model], mode)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)  # [B, S, V_padded]


@pytest.mark.parametrize("mode", MODES)
def test_causal_modes_route_a_varying_number_of_tokens(build_gpt, mode):
    model = _model(build_gpt)
    _full_logits(model, _tokens(batch=4), mode)
    for layer in [l for l in model.decoder.layers if isinstance(l, MoDTransformerLayer)]:
        r = layer.last_routing
        counts = r.valid.sum(0)
        assert 0 < int(counts.sum()) < S * 4
        # padded rows only at the end of each column, pointing at the dummy row S
        assert torch.equal(r.valid, torch.arange(r.index.shape[0]).unsqueeze(1) < counts)
        assert (r.index[~r.valid] == S).all() and (r.index[r.valid] < S).all()
    counts = [l.last_routing.valid.sum(0) for l in model.decoder.layers if isinstance(l, MoDTransformerLayer)]
    assert any(len(set(c.tolist())) > 1 for c in counts), "sequences should differ in routed counts"


@pytest.mark.parametrize("mode", MODES)
def test_skipped_tokens_are_bit_identical_in_causal_mode(build_gpt, mode):
    model = _model(build_gpt)
    layer = model.decoder.layers[1]
    layer.routing_mode = mode
    x = torch.randn(S, 2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(S))
    r = layer.last_routing
    routed = torch.zeros(S + 1, 2, dtype=torch.bool).scatter(0, r.index, r.valid)[:S]
    assert torch.equal(routed, layer.causal_decision(x, layer.router(x)))
    assert torch.equal(out[~routed], x[~routed])
    assert (out[routed] != x[routed]).any(dim=-1).all()


@pytest.mark.parametrize("mode", MODES)
def test_causal_modes_do_not_leak_the_future(build_gpt, mode):
    model = _model(build_gpt)
    a = _tokens()
    t = 12
    b = a.clone()
    b[:, t + 1:] = (b[:, t + 1:] + 1 + torch.arange(S - t - 1)) % V
    la, lb = _full_logits(model, a, mode), _full_logits(model, b, mode)
    assert torch.allclose(la[:, :t + 1], lb[:, :t + 1], rtol=0, atol=1e-6)
    assert (la[:, t + 1:] - lb[:, t + 1:]).abs().max() > 1e-3


def test_topk_routing_does_leak_the_future(build_gpt):
    """The reason for the causal modes: with top-k, later tokens change earlier outputs."""
    model = _model(build_gpt)
    a = _tokens()
    b = a.clone()
    b[:, 20:] = (b[:, 20:] + 7) % V
    la, lb = _full_logits(model, a, "topk"), _full_logits(model, b, "topk")
    assert (la[:, :20] - lb[:, :20]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_cached_decoding_equals_full_recompute(build_gpt, mode):
    model = _model(build_gpt)
    tokens = _tokens(batch=3, seed=9)
    full = _full_logits(model, tokens, mode)
    prompt_lens = [5, 11, 1]  # batched prompts of different lengths, per-sequence caches
    dec = CachedDecoder(model, mode)
    dec.start(3, S)
    for b, n in enumerate(prompt_lens):
        torch.testing.assert_close(dec.prefill(b, tokens[b, :n]), full[b, :n], rtol=1e-5, atol=1e-5)
    pos = torch.tensor(prompt_lens)
    rows = torch.arange(3)
    while bool((pos < S).any()):
        active = pos < S
        r, p = rows[active], pos[active]
        logits = dec.step(r, tokens[r, p], p)
        torch.testing.assert_close(logits, full[r, p], rtol=1e-5, atol=1e-5)
        pos = pos + active.long()
    # MoD caches hold only routed tokens, at their original positions; dense caches hold every token.
    for i, layer in enumerate(model.decoder.layers):
        cache = dec.caches[i]
        if isinstance(layer, MoDTransformerLayer):
            set_routing_mode([model], mode)
            _full_logits(model, tokens, mode)
            r = layer.last_routing
            for b in range(3):
                expected = r.index[r.valid[:, b], b]
                assert torch.equal(cache.positions[b, :int(cache.lengths[b])], expected)
            assert int(cache.lengths.sum()) < 3 * S
        else:
            assert cache.lengths.tolist() == [S] * 3
            assert torch.equal(cache.positions[0], torch.arange(S))
