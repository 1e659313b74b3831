"""Balancing towards the no-op target share (integrated MoDE), and the logged imbalance metrics.

A tiny integrated-MoDE GPT (2 layers, 4 real + 2 no-op experts, top-2) trains 30 steps on random tokens
(one rank, forked). At init about 1/3 of the routing slots pick a no-op expert. Without balancing the
share stays there; the target-weighted aux loss and the aux-loss-free expert bias each move it to the
target (0.6 up, 0.2 down), measured as the mean share over the last 10 steps.
"""
from __future__ import annotations


import pytest
import torch

from tests.distributed.spawn import run_layout

STEPS = 30
BASE = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--model.seq_length=32", "--model.vocab_size=128", "--model.make_vocab_size_divisible_by=64",
        "--train.precision=fp32", f"--train.iters={STEPS}", "--train.warmup_iters=0", "--train.lr=1e-3",
        "--train.micro_batch_size=4", "--train.global_batch_size=4",
        "--mod.enabled=false", "--moe.num_experts=4", "--moe.topk=2", "--moe.noop_experts=2",
        "--moe.ffn_hidden_size=64", "--moe.z_loss_coeff=0"]
AUX = ["--moe.aux_loss_coeff=0.1"]
BIAS = ["--moe.aux_loss_coeff=0", "--moe.score_function=sigmoid", "--moe.expert_bias=true",
        "--moe.bias_update_rate=0.05"]
NONE = ["--moe.aux_loss_coeff=0"]


def _train(cfg, layout) -> dict:
    """Per-step no-op share (all MoE layers) and, after the run, the trainer-side metrics."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mod_megatron.moe.stats import moe_routers, moe_stats
    from mod_megatron.training.builder import build_model_chunks, build_optimizer, param_dtype
    from tests.distributed import equivalence as eq

    chunks, _ = build_model_chunks(cfg, layout.device)
    optimizer, scheduler = build_optimizer(cfg, chunks, param_dtype(cfg, layout.device))
    forward_backward = get_forward_backward_func()
    routers = moe_routers(chunks)
    n, s, b = routers[0].num_real_experts, cfg.model.seq_length, cfg.train.micro_batch_size
    g = torch.Generator().manual_seed(0)
    shares = []
    for step in range(STEPS):
        seq = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        batch = {"tokens": seq[:, :-1], "labels": seq[:, 1:], "loss_mask": torch.ones(b, s),
                 "position_ids": torch.arange(s).expand(b, -1)}
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=eq._forward_step, data_iterator=iter([batch]), model=chunks,
                         num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
        picks = torch.stack([r.last_assigned_map.float().sum(0) for r in routers])
        shares.append((picks[:, n:].sum() / picks.sum()).item())
        if step == STEPS - 2:
            for r in routers:
                r.reset_stats()  # the metrics below then cover exactly the last step
    metrics = moe_stats(chunks)
    last = torch.stack([r.last_assigned_map.float().sum(0) for r in routers])
    return {"shares": shares, "metrics": metrics, "last_picks": last}


def _run(target: float, balancing: list[str]) -> dict:
    (res,) = run_layout(_train, 1, overrides=BASE + [f"--moe.noop_target={target}"] + balancing)
    return res


def _late(shares) -> float:
    return sum(shares[-10:]) / 10


@pytest.mark.parametrize("target,balancing", [(0.6, AUX), (0.6, BIAS), (0.2, AUX)], ids=["aux-up", "bias-up", "aux-down"])
def test_balancing_moves_noop_share_to_target(target, balancing):
    res = _run(target, balancing)
    start, end = sum(res["shares"][:3]) / 3, _late(res["shares"])
    assert abs(end - target) < 0.08, (start, end)
    assert abs(end - target) < 0.5 * abs(0.34 - target)  # at least half-way from the ~1/3 at init


def test_without_balancing_share_stays_put_and_metrics_are_logged():
    res = _run(0.6, NONE)
    assert abs(_late(res["shares"]) - 1 / 3) < 0.1  # nothing steers it: stays near its init value
    m, picks = res["metrics"], res["last_picks"]
    for layer in (1, 2):
        kept = picks[layer - 1, :4]
        assert m[f"moe/layer{layer:02d}/noop_share"] == pytest.approx(picks[layer - 1, 4:].sum() / picks[layer - 1].sum())
        assert m[f"moe/layer{layer:02d}/expert_max_over_mean"] == pytest.approx(kept.max() / kept.mean())
        assert m[f"moe/layer{layer:02d}/expert_min_over_mean"] == pytest.approx(kept.min() / kept.mean())
        assert m[f"moe/layer{layer:02d}/ep_rank_max_over_mean"] == 1.0  # one EP rank holds every expert
