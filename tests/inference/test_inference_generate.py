"""Generation: stops at EOS / max tokens / seq_length, batched prompts, sampling filters, bad prompts."""
from __future__ import annotations

import pytest
import torch

from mod_megatron.inference.decode import CachedDecoder
from mod_megatron.inference.generate import InputError, check_prompts, generate, sample

PROMPTS = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16]]


def _model(build_gpt):
    _, model = build_gpt("--mod.router_init_std=0.5", seed=2)
    return model.eval()


def test_stops_after_max_new_tokens(build_gpt):
    model = _model(build_gpt)
    out, dec = generate(model, PROMPTS, 7, eos_id=None, max_len=32, mode="causal-router", greedy=True)
    assert [len(o) for o in out] == [7, 7, 7]
    assert dec.seen == sum(len(p) for p in PROMPTS) + 3 * 6  # the last sampled token is never fed


def test_stops_at_eos_per_sequence(build_gpt):
    model = _model(build_gpt)
    free, _ = generate(model, PROMPTS, 6, eos_id=None, max_len=32, mode="causal-router", greedy=True)
    eos = free[0][0]  # make prompt 1's first greedy token the end-of-document token
    out, _ = generate(model, PROMPTS, 6, eos_id=eos, max_len=32, mode="causal-router", greedy=True)
    for o, f in zip(out, free):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert o == f[:cut]  # identical up to and including the first EOS, nothing after
    assert out[0] == [eos]
    assert any(len(o) > 1 for o in out), free  # the other sequences went on without it


def test_batched_generation_equals_one_prompt_at_a_time(build_gpt):
    model = _model(build_gpt)
    batched, _ = generate(model, PROMPTS, 5, eos_id=None, max_len=32, mode="causal-router", greedy=True)
    for p, o in zip(PROMPTS, batched):
        single, _ = generate(model, [p], 5, eos_id=None, max_len=32, mode="causal-router", greedy=True)
        assert single[0] == o


def test_generation_stops_at_seq_length(build_gpt):
    model = _model(build_gpt)
    out, _ = generate(model, [[1] * 30], 10, eos_id=None, max_len=32, mode="causal-router", greedy=True)
    assert len(out[0]) == 2


def test_prompt_checks():
    with pytest.raises(InputError, match="prompt 2 is empty"):
        check_prompts([[1], []], 8)
    with pytest.raises(InputError, match="9 tokens, more than model.seq_length=8"):
        check_prompts([[1] * 9], 8)
    check_prompts([[1] * 8], 8)


def test_decoding_needs_a_causal_mode(build_gpt):
    with pytest.raises(ValueError, match="causal routing mode"):
        CachedDecoder(_model(build_gpt), "topk")


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert sample(logits, greedy=True).tolist() == [3] * 500
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {2, 3}
    # softmax([0,1,2,3]) = [.03, .09, .24, .64]: top-p 0.5 keeps only the top token, 0.8 the top two
    assert set(sample(logits, top_p=0.5, generator=g).tolist()) == {3}
    assert set(sample(logits, top_p=0.8, generator=g).tolist()) == {2, 3}
    assert len(set(sample(logits, temperature=5.0, generator=g).tolist())) == 4
