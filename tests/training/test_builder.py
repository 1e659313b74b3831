"""training/builder.py: megatron-core DDP's gradient buffer keeps every main_grad aligned.

DDP packs all gradients of a dtype into one flat buffer without padding (outside the distributed
optimizer); the MoD predictor's 1-element output bias used to shift every main_grad after it off
16-byte alignment, which cost cuBLAS its fast kernels and the multi-tensor add its vector path on a GPU."""
from __future__ import annotations

import pytest
import torch

from mod_megatron.config import load_config
from mod_megatron.training.builder import ALIGN, build_model_chunks
from tests.conftest import TINY, seed_all


def _misaligned(ddp) -> list:
    """Names of parameters of an ALIGN-multiple size whose main_grad does not start on ALIGN elements."""
    out = []
    for name, p in ddp.module.named_parameters():
        grad = p.main_grad
        if p.numel() % ALIGN == 0 and grad.data_ptr() % (ALIGN * grad.element_size()):
            out.append(name)
    return out


@pytest.mark.parametrize("extra", [[], ["--parallel.bucket_size=4096"], ["--mod.enabled=false"],
                                   ["--train.distributed_optimizer=true"]],
                         ids=["mod", "mod-small-buckets", "dense", "distributed-optimizer"])
def test_main_grads_of_aligned_sizes_start_aligned(megatron_single_rank, extra):
    cfg = load_config(None, TINY + list(extra))
    seed_all(0)
    (ddp,), _ = build_model_chunks(cfg, torch.device("cpu"))
    odd = [n for n, p in ddp.module.named_parameters() if p.numel() % ALIGN]
    if cfg.mod.enabled:
        assert any(n.endswith("predictor.fc2.bias") for n in odd)  # the case this guards against
    assert not _misaligned(ddp)
    assert "named_parameters" not in vars(ddp.module)  # the reordering ended with DDP's construction
    # every parameter still has its own main_grad, in one buffer, each element in exactly one of them
    grads = [p.main_grad for p in ddp.module.parameters()]
    assert sum(g.numel() for g in grads) <= sum(b.grad_data.numel() for b in ddp.buffers)
    starts = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()) for g in grads)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(starts, starts[1:]))


def test_without_the_reordering_the_predictor_bias_misaligns_the_rest(megatron_single_rank, monkeypatch):
    """The test above can fail: with megatron's own order, main_grads after the odd bias are misaligned."""
    import contextlib

    from mod_megatron.training import builder

    monkeypatch.setattr(builder, "odd_sized_params_last", lambda module: contextlib.nullcontext())
    seed_all(0)
    (ddp,), _ = build_model_chunks(load_config(None, TINY), torch.device("cpu"))
    assert _misaligned(ddp)
