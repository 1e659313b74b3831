"""Where the tokens of a MoE / MoDE layer go: counted one by one.

- Conservation (EP=2, gloo, alltoall dispatcher): every (token, real expert) pick arrives exactly once at
  the rank that owns the expert, no other token arrives there, and no-op picks are never dispatched.
  Tokens carry their id in hidden unit 0 (exact in fp32), so the ids the experts receive are compared
  with the routing maps of all ranks.
- No-op experts: the MoE output of a token whose picks are all no-op experts is exactly zero, and the
  transformer layer's output for it is bit-identical to its residual stream after attention.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.distributed.spawn import run_layout

NOOP = ["--mod.enabled=false", "--moe.num_experts=4", "--moe.topk=2", "--moe.noop_experts=2",
        "--moe.noop_target=0.5", "--moe.ffn_hidden_size=64"]
MODEL = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
         "--model.seq_length=16", "--model.vocab_size=128", "--train.precision=fp32",
         "--train.micro_batch_size=1", "--train.global_batch_size=2"]
S, B = 16, 4


def _dispatch_ids(cfg, layout) -> dict:
    """One MoELayer forward + backward on this rank's tokens; what each local expert received."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mod_megatron.model.gpt import transformer_config
    from mod_megatron.moe.spec import moe_mlp_spec

    layer = MoELayer(config=transformer_config(cfg), submodules=moe_mlp_spec(cfg).submodules, layer_number=1)
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0  # the id in unit 0 must not steer the routing
    g = torch.Generator().manual_seed(100 + layout.rank)
    x = torch.randn(S, B, cfg.model.hidden_size, generator=g)
    ids = layout.rank * 1000 + torch.arange(S * B, dtype=torch.float32)
    x[..., 0] = ids.view(S, B)
    x.requires_grad_(True)
    received = {}

    def record(module, args):
        tokens, tokens_per_expert = args[0], args[1]
        for j, rows in enumerate(torch.split(tokens[:, 0].detach(), [int(c) for c in tokens_per_expert])):
            received[layer.local_expert_indices[j]] = rows.tolist()

    layer.experts.register_forward_pre_hook(record)
    layer.train()
    out, _ = layer(x)
    out.square().sum().backward()  # the backward all-to-all runs too
    r = layer.router
    return {"ids": ids, "assigned": r.last_assigned_map, "kept": r.last_routing_map, "received": received,
            "out": out.detach().reshape(S * B, -1), "grad": x.grad.reshape(S * B, -1)}


@pytest.mark.parametrize("extra", [[], ["--moe.capacity_factor=0.5"]], ids=["dropless", "capacity-0.5"])
def test_every_pick_arrives_exactly_once_across_ep_ranks(extra):
    ranks = run_layout(_dispatch_ids, 2, ep=2, overrides=MODEL + NOOP + extra)
    n, topk = 4, 2
    expected, noop_picks, dropped = {e: Counter() for e in range(n)}, 0, 0
    for r in ranks:
        assigned, kept = np.asarray(r["assigned"]), np.asarray(r["kept"])
        assert assigned.shape == (S * B, n + 2) and kept.shape == (S * B, n)
        assert (assigned.sum(1) == topk).all()  # every token picked topk distinct experts
        assert not (kept & ~assigned[:, :n]).any()  # nothing kept that was not picked (no padding here)
        noop_picks += int(assigned[:, n:].sum())
        dropped += int(assigned[:, :n].sum() - kept.sum())
        for e in range(n):
            expected[e].update(r["ids"][kept[:, e]].tolist())
    received = {e: Counter(ids) for r in ranks for e, ids in r["received"].items()}
    assert sorted(received) == list(range(n))  # each expert lives on exactly one rank
    for e in range(n):
        assert received[e] == expected[e], f"expert {e}: tokens lost or duplicated"
    total_received = sum(sum(c.values()) for c in received.values())
    assert total_received + noop_picks + dropped == 2 * S * B * topk  # every pick accounted for
    assert noop_picks > 0  # no-op picks exist and were not dispatched (not in `received`)
    cross = sum(1 for e, c in received.items() for i in c if int(i) // 1000 != e // 2)
    assert cross > 0  # tokens really travelled between the EP ranks
    if extra:
        assert dropped > 0
    else:
        assert dropped == 0
    for r in ranks:  # tokens with no kept real pick: MoE output exactly zero (their input gradient
        skip = ~np.asarray(r["kept"]).any(1)  # is not: the router's aux and z losses still reach them)
        assert skip.any()
        assert np.all(r["out"][skip] == 0.0)
        assert np.all(np.abs(r["out"][~skip]).sum(1) > 0)
        assert np.isfinite(r["grad"]).all() and np.abs(r["grad"]).sum() > 0


def test_noop_tokens_keep_their_residual_bit_identical(build_gpt):
    cfg, model = build_gpt(*NOOP, "--model.num_layers=2", seed=3)
    from mod_megatron.moe.stats import moe_routers

    captured = []
    for layer in model.decoder.layers:
        hooks = {}
        layer.pre_mlp_layernorm.register_forward_pre_hook(lambda m, a, h=hooks: h.__setitem__("residual", a[0]))
        layer.register_forward_hook(lambda m, a, out, h=hooks: h.__setitem__("out", out[0]))
        captured.append(hooks)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, cfg.model.seq_length), generator=torch.Generator().manual_seed(5))
    position_ids = torch.arange(cfg.model.seq_length).expand(B, -1)
    model.train()
    model(tokens, position_ids, None, labels=tokens).sum().backward()
    skipped_total = 0
    for hooks, router in zip(captured, moe_routers([model])):
        residual = hooks["residual"].reshape(-1, cfg.model.hidden_size)
        out = hooks["out"].reshape(-1, cfg.model.hidden_size)
        skip = ~router.last_routing_map.any(1)  # both picks were no-op experts
        assert torch.equal(skip, router.last_assigned_map[:, 4:].all(1))
        assert torch.equal(out[skip], residual[skip])  # bit-identical: the MLP added exactly 0
        assert (out[~skip] != residual[~skip]).any(1).all()  # the others did change
        skipped_total += int(skip.sum())
    assert skipped_total > 0
