"""Train a tiny MoD GPT for a few steps in a parallel layout and compare it with the single-rank run.

The reference is one rank (TP=PP=DP=1). It builds the model from the seed, and its full parameters
(named globally: `decoder.layers.<global index>...`) are loaded into every layout, each rank slicing
its tensor-parallel shard, so all layouts start from bit-identical weights (megatron's own init is not
enough: a pipeline stage draws its layers from a different point of the RNG stream). Then every
layout runs the real training path: `build_model_chunks` + `build_optimizer` (megatron DDP, optimizer,
grad clipping, LR schedule) and megatron's forward/backward schedule for the layout, like
`Trainer.train_step`. Per step it records the global-batch loss and every parameter's gradient after
megatron's grad finalisation (DP all-reduce or reduce-scatter, PP embedding sync, SP norm/router
all-reduce), gathered to the full tensor; after the last step, the parameters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed.param_and_grad_buffer import shard_buffer
from megatron.core.pipeline_parallel import get_forward_backward_func

from mod_megatron.config import load_config
from mod_megatron.training import optimizer_step
from mod_megatron.training.builder import build_model_chunks, build_optimizer, gather_params, param_dtype
from tests.distributed.spawn import run_layout

STEPS = 3
GLOBAL_BATCH = 4

# 4 layers (dense, MoD, dense, MoD), hidden 64, 4 heads, seq 32, vocab 128 (padded to 128 also at TP=2),
# capacity 0.25, fp32, no dropout, constant-ish LR from step 1 (no warmup), grad clipping on.
MODEL = ["--model.num_layers=4", "--model.hidden_size=64", "--model.num_attention_heads=4",
         "--model.seq_length=32", "--model.vocab_size=128", "--model.make_vocab_size_divisible_by=64",
         "--model.dropout=0.0", "--mod.capacity=0.25", "--train.precision=fp32", "--train.iters=3",
         "--train.warmup_iters=0", "--train.lr=1e-3", "--train.min_lr=1e-4", "--train.clip_grad=1.0",
         f"--train.global_batch_size={GLOBAL_BATCH}", "--train.micro_batch_size=1", "--train.seed=1234"]

# Model variants (extra overrides on MODEL). "mod_every_layer" routes layers 1-3, which makes the
# cost-aware pipeline split uneven (1 dense layer | 3 MoD layers at PP=2).
# "odd_capacity" keeps k = 5 of 32 tokens, not a multiple of tp=2: sequence parallelism pads it to 6.
VARIANTS = {"base": [], "mod_every_layer": ["--mod.every=1"], "odd_capacity": ["--mod.capacity=0.15625"]}


FUSED = "--train.fused_optimizer=on"
SMALL_BUCKETS = "--parallel.bucket_size=8192"  # the tiny model's ~100k parameters in ~12 buckets
PARAM_GATHER = "--parallel.overlap_param_gather=true"


@dataclass(frozen=True)
class Layout:
    name: str
    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    dp_opt: bool = False
    variant: str = "base"
    cost_aware: bool = False  # pipeline split from mod_megatron.parallel.stages instead of an even one
    extra: tuple = field(default_factory=tuple)


LAYOUTS = [
    Layout("TP=2", 2, tp=2),
    Layout("DP=2", 2),
    Layout("DP=2 distributed optimizer", 2, dp_opt=True),
    Layout("PP=2", 2, pp=2),
    Layout("PP=2 VPP=2", 2, pp=2, vpp=2),
    Layout("TP=2 x PP=2", 4, tp=2, pp=2),
    Layout("TP=2 + SP", 2, tp=2, sp=True),
    Layout("TP=2 + SP, k=5 padded to 6", 2, tp=2, sp=True, variant="odd_capacity"),
    Layout("TP=2 + SP x PP=2", 4, tp=2, pp=2, sp=True),
    Layout("PP=2 cost-aware split", 2, pp=2, variant="mod_every_layer", cost_aware=True),
    # torch's fused AdamW, stepped as the trainer does then: the norm's collectives, the clip and the
    # skip flag stay on the device (training/optimizer_step.py, prepare(wait=False))
    Layout("TP=2, fused AdamW queued", 2, tp=2, extra=(FUSED,)),
    Layout("PP=2, fused AdamW queued", 2, pp=2, extra=(FUSED,)),
    Layout("DP=2 distributed optimizer, fused AdamW queued", 2, dp_opt=True, extra=(FUSED,)),
    # the DP gradient reduction: overlapped by default, bucket by bucket; here also after the backward,
    # and in small buckets (each launched from the backward hooks while later layers' grads still come)
    Layout("DP=2, reduction after the backward", 2, extra=("--parallel.overlap_grad_reduce=false",)),
    Layout("DP=2, 8k-parameter buckets", 2, extra=(SMALL_BUCKETS,)),
    Layout("DP=2 distributed optimizer, 8k-parameter buckets", 2, dp_opt=True, extra=(SMALL_BUCKETS,)),
    Layout("PP=2 x DP=2, 8k-parameter buckets", 4, pp=2, extra=(SMALL_BUCKETS,)),
    # the distributed optimizer's parameter all-gather left to the next forward, bucket by bucket
    Layout("DP=2 distributed optimizer, overlapped param gather", 2, dp_opt=True, extra=(SMALL_BUCKETS, PARAM_GATHER)),
    Layout("PP=2 x DP=2 distributed optimizer, overlapped param gather, fused AdamW queued", 4, pp=2, dp_opt=True,
           extra=(SMALL_BUCKETS, PARAM_GATHER, FUSED)),
]
BY_NAME = {layout.name: layout for layout in LAYOUTS}


def make_batch(cfg) -> dict:
    """The fixed global batch: random tokens from a seeded generator, next-token labels, full loss mask."""
    m = cfg.model
    g = torch.Generator().manual_seed(4321)
    seq = torch.randint(0, m.vocab_size, (GLOBAL_BATCH, m.seq_length + 1), generator=g)
    return {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
            "loss_mask": torch.ones(GLOBAL_BATCH, m.seq_length),
            "position_ids": torch.arange(m.seq_length).unsqueeze(0).expand(GLOBAL_BATCH, -1).contiguous()}


def micro_batches(batch: dict, mbs: int, dp_rank: int, dp: int) -> list[dict]:
    """This DP rank's contiguous slice of the global batch, cut into micro-batches."""
    per_rank = GLOBAL_BATCH // dp
    first = dp_rank * per_rank
    return [{k: v[i:i + mbs] for k, v in batch.items()} for i in range(first, first + per_rank, mbs)]


def _loss_func(loss_mask, output_tensor):
    mask = loss_mask.float()
    loss_sum = torch.sum(output_tensor.float() * mask)
    return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    output = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    return output, partial(_loss_func, b["loss_mask"])


# ----------------------------------------------------------------------------- global parameter names

def global_names(chunk) -> dict[str, str]:
    """Local parameter name -> name in the single-rank model (global layer index, tied LM head folded)."""
    module = getattr(chunk, "module", chunk)
    local_to_global = {}
    layer_ids = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(module.decoder.layers)}
    tied = module.share_embeddings_and_output_weights
    for name, _ in module.named_parameters():
        gname = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layer_ids[m.group(1)]}.", name)
        if tied and gname == "output_layer.weight":
            gname = "embedding.word_embeddings.weight"
        local_to_global[name] = gname
    return local_to_global


def _named_params(chunk):
    module = getattr(chunk, "module", chunk)
    names = global_names(chunk)
    return [(names[n], p) for n, p in module.named_parameters()]


def tp_split(param, full: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    assert getattr(param, "partition_stride", 1) == 1, "strided TP partitions are not handled"
    tp = ps.get_tensor_model_parallel_world_size()
    return torch.chunk(full, tp, dim=param.partition_dim)[ps.get_tensor_model_parallel_rank()]


def tp_gather(param, local: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def load_full_state(chunks, full_state: dict) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for gname, p in _named_params(chunk):
                p.copy_(tp_split(p, torch.as_tensor(full_state[gname])))


def full_params(chunks) -> dict:
    return {g: tp_gather(p, p.data) for chunk in chunks for g, p in _named_params(chunk)}


def full_grads(chunks, distributed_optimizer: bool) -> dict:
    """Every local parameter's finalised gradient as a full (TP-gathered) tensor."""
    if distributed_optimizer:
        _unshard_grad_buffers(chunks)
    return {g: tp_gather(p, p.main_grad) for chunk in chunks for g, p in _named_params(chunk)}


def _unshard_grad_buffers(chunks) -> None:
    """With the distributed optimizer each DP rank holds only its reduce-scattered shard of every grad
    bucket; all-gather the shards so each param's main_grad is the full reduced gradient again."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for chunk in chunks:
        for buffer in chunk.buffers:
            for bucket in buffer.buckets:
                shards = shard_buffer(bucket.grad_data, size)
                mine = shards[rank].clone()
                dist.all_gather(shards, mine, group=group)


# ----------------------------------------------------------------------------- one layout's run

def train_steps(cfg, layout, full_state: Optional[dict] = None, pipeline_layout: Optional[str] = None) -> dict:
    """Run STEPS training steps on this rank; return losses, grads per step and final params."""
    device = layout.device
    chunks, tcfg = build_model_chunks(cfg, device, pipeline_layout=pipeline_layout)
    if full_state is not None:
        load_full_state(chunks, full_state)
    initial = full_params(chunks) if full_state is None else None
    optimizer, scheduler = build_optimizer(cfg, chunks, param_dtype(cfg, device))
    forward_backward = get_forward_backward_func()
    deferred = optimizer_step.deferrable(optimizer)
    t = cfg.train
    mbs = micro_batches(make_batch(cfg), t.micro_batch_size, layout.dp_rank, layout.dp)
    losses, grads = [], []
    groups = [g for c in chunks for g in c.bucket_groups + c.expert_parallel_bucket_groups]
    in_flight = _count_in_flight(groups)
    gathered = []
    for _ in range(STEPS):
        for chunk in chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        in_flight.append(0)
        iters = [iter(mbs) for _ in chunks]
        reduced = forward_backward(
            forward_step_func=_forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks, num_microbatches=len(mbs), seq_length=cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=False)
        grads.append(full_grads(chunks, t.distributed_optimizer))
        if deferred:  # the trainer's path with torch's fused AdamW: norm, clip and skip flag on the device
            prepared = optimizer_step.prepare(optimizer, wait=False)
            assert optimizer_step.finish(optimizer, prepared, skip=torch.zeros(1, device=device))
        else:
            ok, _, _ = optimizer.step()
            assert ok, "optimizer step skipped"
        gathered.append(any(g.param_gather_dispatched for g in groups))  # did the step all-gather parameters?
        scheduler.step(increment=1)
        losses.append(_global_loss(reduced, layout))
    layers = sorted(layer.layer_number - 1 for c in chunks for layer in getattr(c, "module", c).decoder.layers)
    gather_params(chunks)  # what the trainer does before a checkpoint: the last step's parameters
    return {"losses": losses, "grads": grads, "params": full_params(chunks), "initial": initial, "gathered": gathered,
            "layers": layers, "batch_p2p_comm": tcfg.batch_p2p_comm, "deferred": deferred,
            "overlap": chunks[0].ddp_config.overlap_grad_reduce, "bucket_groups": len(groups), "in_flight": in_flight}


def _count_in_flight(groups) -> list:
    """Per step, how many bucket groups' reductions the backward had launched before megatron's
    finish_grad_sync came to wait for them (overlapped), counted in the list this returns."""
    counts: list = []

    def watch(group):
        finish = group.finish_grad_sync

        def counted(*args, **kwargs):
            counts[-1] += group.grad_reduce_handle is not None
            return finish(*args, **kwargs)
        group.finish_grad_sync = counted

    for group in groups:
        watch(group)
    return counts


def _global_loss(reduced: list, layout) -> Optional[float]:
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([r["lm loss"] for r in reduced]).sum(0).float()
    if layout.dp > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------- comparison

@lru_cache(maxsize=None)
def reference(variant: str = "base") -> dict:
    """The single-rank run (its initial params become every layout's starting point)."""
    (result,) = run_layout(train_steps, 1, overrides=MODEL + VARIANTS[variant])
    return result


def pipeline_layout_for(layout: Layout) -> Optional[str]:
    if not layout.cost_aware:
        return None
    from mod_megatron.parallel.stages import cost_aware_layout

    cfg = load_config(None, MODEL + VARIANTS[layout.variant] + [f"--parallel.pp={layout.pp}"])
    return cost_aware_layout(cfg, layout.pp)


def run(layout: Layout) -> list[dict]:
    ref = reference(layout.variant)
    fn = partial(train_steps, full_state=ref["initial"], pipeline_layout=pipeline_layout_for(layout))
    return run_layout(fn, layout.world_size, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, sp=layout.sp,
                      dp_opt=layout.dp_opt, overrides=MODEL + VARIANTS[layout.variant] + list(layout.extra))


def compare(layout: Layout, ranks: Optional[list[dict]] = None) -> dict:
    """max |Δloss|, |Δgrad| (every param, every step; and the first step's alone) and |Δparam| (after
    the last step) vs the reference."""
    ref = reference(layout.variant)
    ranks = run(layout) if ranks is None else ranks
    d_loss = d_grad = d_first = d_param = 0.0
    seen = [set() for _ in range(STEPS)]
    for res in ranks:
        for step in range(STEPS):
            if res["losses"][step] is not None:
                d_loss = max(d_loss, abs(res["losses"][step] - ref["losses"][step]))
            for name, g in res["grads"][step].items():
                d = _max_abs_diff(g, ref["grads"][step][name])
                d_grad = max(d_grad, d)
                d_first = max(d_first, d) if step == 0 else d_first
                seen[step].add(name)
        for name, p in res["params"].items():
            d_param = max(d_param, _max_abs_diff(p, ref["params"][name]))
    missing = set(ref["grads"][0]) - seen[0]
    assert not missing, f"{layout.name}: no rank reported grads for {sorted(missing)}"
    assert any(res["losses"][0] is not None for res in ranks), f"{layout.name}: no rank reported a loss"
    return {"layout": layout.name, "loss": d_loss, "grad": d_grad, "grad_first": d_first, "param": d_param,
            "ref_losses": ref["losses"]}


def _max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0
