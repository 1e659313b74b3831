"""The language-model loss from bf16 logits in two passes over them (fused cross entropy, tensor parallel size 1).

megatron-core's fused cross entropy (`cross_entropy_fusion_impl="native"`) keeps exp(logits) in fp32 for
its backward: at the 368M model's shape ([2048 x 16] tokens x 8192 vocabulary) it wrote 1 GiB in the
forward and read it back in the backward, about 2 ms of a 165 ms training step on an H100
(docs/benchmarks.md, tenth session). Here the forward reads the logits once for each token's
logsumexp and its target's logit, and keeps only the logits (already in memory) and that logsumexp;
the backward reads the logits once more and writes the gradient, softmax - onehot, in their dtype:

    loss = logsumexp(z) - z[target]          d loss / d z = exp(z - logsumexp(z)) - onehot(target)

all in fp32 from the bf16 logits, as megatron computes it. `torch.compile` makes each pass one kernel on
CUDA tensors (model/compiled.py); elsewhere it runs eagerly (the CPU tests compare it with megatron's loss).
"""
from __future__ import annotations

import torch

from mod_megatron.model.compiled import run


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, target, lse)
        return lse - z.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, target, lse = ctx.saved_tensors
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        onehot = (vocab == target.unsqueeze(-1)).float()
        dz = (torch.exp(logits.float() - lse.unsqueeze(-1)) - onehot) * grad.unsqueeze(-1)
        return dz.to(logits.dtype), None


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _CrossEntropy.apply(logits, target)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss [...] in fp32 of logits [..., V] (the whole vocabulary) for int64 targets [...]."""
    return run(_loss, "auto", logits, target, option="fused cross entropy")
