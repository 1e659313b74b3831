"""megatron-core's optimizer step, split at its one host synchronisation (the gradient norm).

`optimizer.step()` of megatron-core (MixedPrecisionOptimizer, FP32Optimizer, ChainedOptimizer) is

    prepare_grads()  ->  gradient norm  ->  clip  ->  (count zeros)  ->  step_with_ready_grads()

and its gradient norm ends in `.item()`, which waits for the whole backward pass. The trainer also
reads the loss and checks that loss and gradients are finite before any update (numerics.py). Each of
those reads was a host synchronisation of its own, and after each one the GPU sat idle while the host
ran the next stretch of Python (megatron's per-parameter loops): on one H200, 14 of the 169 ms of a
368M training step (docs/benchmarks.md, "fifth session"). Here the same steps, in the same order, are
two calls:

    prepare(optimizer) -> (found_inf, grad norm)   all host work up to and including the one wait
    finish(optimizer, grad norm) -> applied?       clip and update; nothing waits for the GPU

so the trainer launches its loss reduction and finiteness flags before `prepare` and reads them after
it, when the GPU has caught up and the read costs nothing. Clipping is megatron's
`clip_grad_by_total_norm_fp32` (coefficient max_norm / (norm + 1e-6), applied when below 1) as one
`torch._foreach_mul_` over the gradients, without that function's per-parameter type checks; the
precision-aware optimizer's decoupled gradients still go through megatron's function. The zero count
(`log_num_zeros_in_grad`) is not computed: the trainer never reported it. The result equals
`optimizer.step()` bit for bit (tests/training/test_optimizer_step.py).
"""
from __future__ import annotations

from typing import Optional

import torch


def _parts(optimizer) -> list:
    """The optimizers that hold parameters: a ChainedOptimizer's members, or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


@torch.no_grad()
def prepare(optimizer) -> tuple[bool, Optional[float]]:
    """megatron's prepare_grads() and the gradient norm: (found_inf, norm or None when nothing clips).

    found_inf is megatron's own overflow check (fp16 with a loss scaler); a collective over the
    gradient-statistics group when the norm is computed, so every rank calls this."""
    if optimizer.prepare_grads():
        return True, None
    chained = hasattr(optimizer, "chained_optimizers")
    if chained or any(part.config.clip_grad > 0.0 for part in _parts(optimizer)):
        return False, optimizer.get_grad_norm()  # ChainedOptimizer.step() always computes it
    return False, None


def clip(part, max_norm: float, total_norm: float) -> None:
    """Scale `part`'s main gradients by max_norm / (total_norm + 1e-6) when that is below 1."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    params = part.get_parameters()
    if not params:
        return
    if part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:  # gradients in .decoupled_grad
        clip_grad_by_total_norm_fp32(params, max_norm, total_norm, True)
        return
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coeff)


@torch.no_grad()
def finish(optimizer, grad_norm: Optional[float]) -> bool:
    """Clip with the norm from `prepare`, then megatron's step_with_ready_grads(); True if applied."""
    if grad_norm is not None:
        for part in _parts(optimizer):
            if not getattr(part, "is_stub_optimizer", False) and part.config.clip_grad > 0.0:
                clip(part, part.config.clip_grad, grad_norm)
    return optimizer.step_with_ready_grads()
