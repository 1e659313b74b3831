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
`optimizer.step()` bit for bit (tests/training/test_optimizer_step.py), with one exception: where
torch's fused AdamW steps the clipped gradients (the default on a GPU), the coefficient goes to the
kernel as its `grad_scale` (each gradient divided by 1/coefficient as it is read, which saves a read
and a write of every fp32 gradient), equal to the separate multiply up to rounding.

With torch's fused AdamW in every part (`deferrable`; the default on a GPU) even that wait can go:
`prepare(wait=False)` leaves the squared norm on the device, and `finish(..., skip=flag)` hands the
kernels the clip as `grad_scale` (computed on the device from that norm) and the trainer's non-finite
flag as `found_inf`, on which they leave parameters, moments and step counts untouched. The host then
queues the whole update while the GPU still runs the backward, and reads loss, flag and norm once,
after it; a trace showed the GPU idle ~1.6 ms per 368M MoD step between the norm's `.item()` and the
AdamW kernel (torch's per-parameter Python), which this removes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from mod_megatron.training import fused_adam


@dataclass
class Prepared:
    """What `prepare` found: megatron's overflow flag, the gradient norm (None: nothing clips), and per
    clipping optimizer (that optimizer, (max norm, its parameters, their main gradients)); None instead
    of the gradients where megatron's own clip function must run: the precision-aware optimizer's
    decoupled gradients."""

    found_inf: bool
    grad_norm: Optional[float] = None
    clip_lists: list = field(default_factory=list)
    norm_sq: Optional[torch.Tensor] = None  # prepare(wait=False): the squared gradient norm, on the device
    deferred: bool = False  # made by prepare(wait=False), which checked `deferrable`


def _parts(optimizer) -> list:
    """The optimizers that hold parameters: a ChainedOptimizer's members, or the optimizer itself."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def deferrable(optimizer) -> bool:
    """Can the whole update be queued without the host waiting (`prepare(wait=False)`)? Yes where every
    part steps with torch's fused AdamW, which takes the clip as `grad_scale` and the decision to skip
    as `found_inf` (device tensors), and nothing needs the host first: no fp16 loss scaler (its overflow
    check reads the GPU), no precision-aware optimizer (its decoupled gradients clip through megatron)."""
    for part in _parts(optimizer):
        if getattr(part, "grad_scaler", None) is not None or part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return False
        if not fused_adams_stepping(part, part.get_parameters()):  # also refuses parts without parameters
            return False
    return True


def _norm_sq(grads: list, group, device) -> torch.Tensor:
    """megatron's get_grad_norm_fp32 (L2) up to its `.item()`: the squared norm, summed over `group`."""
    from megatron.core.optimizer import clip_grads

    if grads:
        overflow = torch.zeros(1, dtype=torch.int, device=device)
        norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, overflow, [grads], False)
        sq = norm ** 2.0
    else:
        sq = torch.zeros(1, dtype=torch.float, device=device)
    torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM, group=group)
    return sq


def _device_norm_sq(optimizer, device) -> torch.Tensor:
    """The square of megatron's `optimizer.get_grad_norm()` (a ChainedOptimizer's too), left on the device."""
    parts = _parts(optimizer)
    if len(parts) == 1:
        return _norm_sq(parts[0].get_main_grads_for_grad_norm(), parts[0].get_grad_stats_parallel_group(), device)
    if optimizer.grads_states_parallel_group_is_shared():
        grads = [g for part in parts for g in part.get_main_grads_for_grad_norm()]
        return _norm_sq(grads, optimizer.get_grad_stats_parallel_group(), device)
    return sum(_norm_sq(p.get_main_grads_for_grad_norm(), p.get_grad_stats_parallel_group(), device) for p in parts)


@torch.no_grad()
def prepare(optimizer, wait: Optional[bool] = True) -> Prepared:
    """megatron's prepare_grads() and the gradient norm (the one wait); the lists to clip are gathered
    before the wait, while the GPU still runs the backward. With wait=False (only where `deferrable`)
    the norm stays on the device (`norm_sq`) and nothing waits: `finish` queues the update behind it.
    wait=None: wait=False where `deferrable`, else True (`Prepared.deferred` says which).

    found_inf is megatron's own overflow check (fp16 with a loss scaler); the norm is a collective over
    the gradient-statistics group, so every rank calls this."""
    if wait is None:
        wait = not deferrable(optimizer)
    elif not wait and not deferrable(optimizer):
        raise ValueError("prepare(wait=False) needs torch's fused AdamW in every part (optimizer_step.deferrable)")
    if optimizer.prepare_grads():
        return Prepared(found_inf=True, deferred=not wait)
    clip_lists = []
    for part in _parts(optimizer):
        if getattr(part, "is_stub_optimizer", False) or part.config.clip_grad <= 0.0:
            continue
        params = part.get_parameters()
        if not params:
            continue
        if part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:  # gradients in .decoupled_grad
            clip_lists.append((part, (part.config.clip_grad, params, None)))
        else:
            grads = [p.grad.detach() for p in params if p.grad is not None]
            clip_lists.append((part, (part.config.clip_grad, params, grads)))
    if not (hasattr(optimizer, "chained_optimizers") or clip_lists):  # ChainedOptimizer.step() always has one
        return Prepared(False, deferred=not wait)
    if not wait:
        device = next(p.device for part in _parts(optimizer) for p in part.get_parameters())
        return Prepared(False, None, clip_lists, _device_norm_sq(optimizer, device), deferred=True)
    return Prepared(False, optimizer.get_grad_norm(), clip_lists)


def fused_adams_stepping(part, params: list) -> list:
    """The torch AdamW optimizers of `part` if they are all fused and step exactly `params`, else []."""
    inner = list(fused_adam.torch_optimizers(part))
    if not inner or not all(isinstance(o, torch.optim.Adam) and all(g.get("fused") for g in o.param_groups)
                            for o in inner):
        return []
    stepped = {id(p) for o in inner for g in o.param_groups for p in g["params"]}
    return inner if stepped == {id(p) for p in params} else []


def clip(max_norm: float, total_norm: float, params: list, grads: Optional[list], part=None) -> list:
    """Scale the main gradients by max_norm / (total_norm + 1e-6) when that is below 1 (grads None:
    the precision-aware optimizer's decoupled gradients, through megatron's own function).

    Where `part`'s fused AdamW kernels step exactly these gradients, the scale goes to them as their
    `grad_scale` (each gradient is divided by 1/coefficient as it is read, the way torch's GradScaler
    unscales): no separate pass over the gradients. Returns the optimizers so armed (`finish` disarms
    them after the step)."""
    if grads is None:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        clip_grad_by_total_norm_fp32(params, max_norm, total_norm, True)
        return []
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0 or not grads:
        return []
    armed = fused_adams_stepping(part, params) if part is not None else []
    if not armed:
        torch._foreach_mul_(grads, coeff)
        return []
    scale = torch.full((), 1.0 / coeff, dtype=torch.float32, device=grads[0].device)
    for opt in armed:
        opt.grad_scale = scale
    return armed


def _arm_deferred(optimizer, prepared: Prepared, skip: Optional[torch.Tensor]) -> list:
    """Give every fused AdamW its clip (grad_scale) and skip flag (found_inf), both device tensors."""
    found_inf = None if skip is None else (skip > 0).float().reshape(())  # the kernel skips on exactly 1.0
    scales = {}
    if prepared.norm_sq is not None:
        norm = prepared.norm_sq.sqrt().reshape(())
        for part, (max_norm, _, _) in prepared.clip_lists:
            # 1 / (max_norm / (norm + 1e-6)) where that coefficient is below 1, else 1 (gradients unchanged)
            scales[id(part)] = torch.clamp((norm + 1.0e-6) / max_norm, min=1.0)
    armed = []
    for part in _parts(optimizer):
        for opt in fused_adam.torch_optimizers(part):
            if id(part) in scales:
                opt.grad_scale = scales[id(part)]
            if found_inf is not None:
                opt.found_inf = found_inf
            armed.append(opt)
    return armed


@torch.no_grad()
def finish(optimizer, prepared: Prepared, skip: Optional[torch.Tensor] = None) -> bool:
    """Clip with the norm from `prepare`, then megatron's step_with_ready_grads(); True if applied.

    After `prepare(wait=False)` the clip comes from the norm on the device, and `skip` (a device flag,
    nonzero: do not update) makes the AdamW kernels leave parameters, moments and step counts as they
    were; nothing waits, and True means only that the update was queued."""
    if prepared.found_inf:
        return False
    if skip is not None and not (prepared.deferred or deferrable(optimizer)):  # prepare checked it already
        raise ValueError("finish(skip=...) needs torch's fused AdamW in every part (optimizer_step.deferrable)")
    armed = []
    try:
        if prepared.norm_sq is not None or skip is not None:
            armed = _arm_deferred(optimizer, prepared, skip)
        elif prepared.grad_norm is not None:
            for part, (max_norm, params, grads) in prepared.clip_lists:
                armed += clip(max_norm, prepared.grad_norm, params, grads, part)
        return optimizer.step_with_ready_grads()
    finally:
        for opt in armed:
            for name in ("grad_scale", "found_inf"):
                if hasattr(opt, name):
                    delattr(opt, name)
