"""training/optimizer_step.py: prepare() + finish() update the model exactly as megatron-core's own
optimizer.step() does (fp32 and bf16 mixed-precision optimizers, a ChainedOptimizer with expert
parameters, the distributed optimizer; clipping on, active, and off), and MicroBatches.prefetch()
hands out the same micro-batches in the same order."""
from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY, seed_all

from mod_megatron.training import optimizer_step

VARIANTS = {
    "fp32": [],
    "bf16 (GPU)": ["--train.precision=bf16"],  # megatron's bf16 optimizer wants CUDA tensors
    "moe (chained)": ["--moe.num_experts=4", "--moe.topk=2", "--moe.ffn_hidden_size=64"],
    "distributed optimizer": ["--train.distributed_optimizer=true"],
}


def _build(overrides, device):
    from mod_megatron.config import load_config
    from mod_megatron.training.builder import build_model_chunks, build_optimizer, param_dtype

    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    cfg = load_config(None, TINY + ["--train.weight_decay=0.1"] + overrides)
    get_moe_layer_wise_logging_tracker().clear()  # megatron's process-wide MoE loss log, sized by an earlier model
    seed_all(0)
    chunks, _ = build_model_chunks(cfg, device)
    optimizer, _ = build_optimizer(cfg, chunks, param_dtype(cfg, device))
    for group in optimizer.param_groups:
        group["lr"] = 1e-2  # the scheduler would start at 0
    return cfg, chunks, optimizer


def _backward(cfg, chunks, step: int, device):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g).to(device)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    model = chunks[0]
    positions = torch.arange(cfg.model.seq_length, device=device).expand(2, -1)
    losses = model(tokens, positions, None, labels=tokens.roll(-1, 1))
    losses.float().sum().backward()


@pytest.fixture
def one_rank(request):
    """One process: NCCL on a GPU machine (as the benchmarks start it), else gloo with the CPU shims."""
    request.getfixturevalue("gpu_process" if torch.cuda.is_available() else "megatron_single_rank")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("clip", [1e-3, 1e4, 0.0], ids=["clipping", "norm-below-clip", "no-clip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prepare_and_finish_equal_megatrons_step(one_rank, variant, clip):
    import torch.distributed as dist

    # On a GPU machine every variant runs on the GPU (megatron-core's optimizer assumes CUDA there).
    device = one_rank
    if "GPU" in variant and device.type != "cuda":
        pytest.skip("needs a GPU (run on the device)")
    if variant == "distributed optimizer" and device.type == "cuda" and dist.get_backend() != "nccl":
        pytest.skip("an earlier test started gloo, which cannot run these collectives on CUDA tensors")
    runs = []
    for split in (False, True):
        cfg, chunks, optimizer = _build(VARIANTS[variant] + [f"--train.clip_grad={clip}"], device)
        initial = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
        norms = []
        for step in range(3):
            optimizer.zero_grad()
            _backward(cfg, chunks, step, device)
            if split:
                prepared = optimizer_step.prepare(optimizer)
                assert prepared.found_inf is False
                assert optimizer_step.finish(optimizer, prepared) is True
                norm = prepared.grad_norm
            else:
                ok, norm, _ = optimizer.step()
                assert ok
            norms.append(norm)
        runs.append((norms, {n: p.detach().clone() for n, p in chunks[0].named_parameters()}))
    (want_norms, want), (got_norms, got) = runs
    chained = hasattr(optimizer, "chained_optimizers")
    if clip > 0 or chained:
        assert got_norms == pytest.approx(want_norms, rel=0, abs=0) and all(n > 0 for n in got_norms)
    else:  # megatron reports 0.0 (mixed precision) or None (fp32) without clipping: no norm is computed
        assert got_norms == [None] * 3
    if clip == 1e-3:
        assert all(n > clip for n in got_norms)  # the clipping branch ran
    for name, p in got.items():
        assert torch.equal(p, want[name]), name  # bit for bit
    assert sum(not torch.equal(p, initial[name]) for name, p in got.items()) > len(got) // 2  # the steps moved them
    parts = optimizer_step._parts(optimizer)
    assert (len(parts) > 1) == (variant == "moe (chained)"), [type(p).__name__ for p in parts]


def test_prefetch_keeps_the_order():
    from mod_megatron.training.trainer import MicroBatches

    class Data:
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            t = torch.full((4,), i)
            return {"tokens": t, "labels": t + 1, "loss_mask": torch.ones(4), "position_ids": torch.arange(4)}

    plain = MicroBatches(Data(), 8, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp=2)
    eager = [next(plain)["tokens"][:, 0].tolist() for _ in range(5)]
    ahead = MicroBatches(Data(), 8, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp=2)
    got = []
    ahead.prefetch(2)
    assert len(ahead._ready) == 2
    got.append(next(ahead)["tokens"][:, 0].tolist())
    ahead.prefetch(2)  # tops up to 2, no more
    assert len(ahead._ready) == 2
    got += [next(ahead)["tokens"][:, 0].tolist() for _ in range(4)]
    assert got == eager == [[12, 13], [14, 15], [20, 21], [22, 23], [28, 29]]
