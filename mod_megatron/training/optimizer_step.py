"""megatron-core's optimizer step, split at its one host synchronisation (the gradient norm).

`optimizer.step()` of megatron-core (MixedPrecisionOptimizer, FP32Optimizer, ChainedOptimizer) is

    prepare_grads()  ->  gradient norm  ->  clip  ->  (count zeros)  ->  step_with_ready_grads()

and its gradient norm ends in `.item()`, which waits for the whole backward pass. The trainer also
reads the loss and checks that loss and gradients are finite before any update (numerics.py). Each of
those reads was a host synchronisation of its own, and after each one the GPU sat idle while the host
ran the next stretch of Python (megatron's per-parameter loops): 14 of the 169 ms of a 368M training
step in a profiler trace on one H200 (docs/benchmarks.md, "fifth session"). Here the same steps, in
the same order, are two calls:

    prepare(optimizer) -> Prepared   all host work up to and including the one wait (found_inf, grad norm,
                                     and the gradient lists that clipping will scale)
    finish(optimizer, prepared)      clip and update; nothing waits for the GPU; True if applied

so the trainer launches its loss reduction and finiteness flags before `prepare` and reads them after
it, when the GPU has caught up and the read costs nothing. Clipping is megatron's
`clip_grad_by_total_norm_fp32` (coefficient max_norm / (norm + 1e-6), applied when below 1) as one
`torch._foreach_mul_` over the gradients, without that function's per-parameter type checks; the
precision-aware optimizer's decoupled gradients still go through megatron's function. The zero count
(`log_num_zeros_in_grad`) is not computed: the trainer never reported it. The result equals
`optimizer.step()` bit for bit (tests/training/test_optimizer_step.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Prepared:
    """What `prepare` found: megatron's overflow flag, the gradient norm (None: nothing clips), and per
    clipping optimizer (max norm, its parameters, their main gradients; None instead of the gradients
    where megatron's own clip function must run: the precision-aware optimizer's decoupled gradients)."""

    found_inf: bool
    grad_norm: Optional[float] = None
    clip_lists: list = field(default_factory=list)


def _parts(optimizer) -> list:
    """The optimizers that hold parameters: a ChainedOptimizer's members, or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


@torch.no_grad()
def prepare(optimizer) -> Prepared:
    """megatron's prepare_grads() and the gradient norm (the one wait); the lists to clip are gathered
    before the wait, while the GPU still runs the backward.

    found_inf is megatron's own overflow check (fp16 with a loss scaler); the norm is a collective over
    the gradient-statistics group, so every rank calls this."""
    if optimizer.prepare_grads():
        return Prepared(found_inf=True)
    clip_lists = []
    for part in _parts(optimizer):
        if getattr(part, "is_stub_optimizer", False) or part.config.clip_grad <= 0.0:
            continue
        params = part.get_parameters()
        if not params:
            continue
        if part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:  # gradients in .decoupled_grad
            clip_lists.append((part.config.clip_grad, params, None))
        else:
            clip_lists.append((part.config.clip_grad, params, [p.grad.detach() for p in params if p.grad is not None]))
    if hasattr(optimizer, "chained_optimizers") or clip_lists:  # ChainedOptimizer.step() always computes it
        return Prepared(False, optimizer.get_grad_norm(), clip_lists)
    return Prepared(False)


def clip(max_norm: float, total_norm: float, params: list, grads: Optional[list]) -> None:
    """Scale the main gradients by max_norm / (total_norm + 1e-6) when that is below 1 (grads None:
    the precision-aware optimizer's decoupled gradients, through megatron's own function)."""
    if grads is None:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        clip_grad_by_total_norm_fp32(params, max_norm, total_norm, True)
        return
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


@torch.no_grad()
def finish(optimizer, prepared: Prepared) -> bool:
    """Clip with the norm from `prepare`, then megatron's step_with_ready_grads(); True if applied."""
    if prepared.found_inf:
        return False
    if prepared.grad_norm is not None:
        for max_norm, params, grads in prepared.clip_lists:
            clip(max_norm, prepared.grad_norm, params, grads)
    return optimizer.step_with_ready_grads()
