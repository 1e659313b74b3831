"""torch's fused AdamW kernel inside megatron-core's optimizer (`train.fused_optimizer`).

Without apex or Transformer Engine, megatron-core builds a plain `torch.optim.AdamW`, which steps with
torch's foreach kernels: a dozen passes over the fp32 main params and both moments. torch's own
`fused=True` kernel does the update in one pass (on an H200, at 368M parameters: 6.7 instead of
10.8 ms for the optimizer step). megatron-core has no switch for it, so `apply()` sets the flag on the
param groups of the torch optimizers that megatron's wrappers hold.

    auto  fused where every parameter of the optimizer is on a GPU (the default)
    on    fused on any device (torch has a CPU kernel too; CPU tests use it)
    off   torch's default (foreach)

The two kernels keep the per-parameter `step` counter in different places: fused on the parameter's
device, foreach on the CPU. megatron-core's checkpoint code restores `step` as a CPU tensor, and torch
moves it only where the saved param group says fused. `apply()` therefore also runs after every
checkpoint load and puts `step` where the chosen kernel needs it, so a checkpoint written with one
kernel resumes with the other. It also gives each parameter its own `step` tensor: megatron-core's
distributed optimizer restores a single tensor shared by all parameters of a rank, and torch's kernels
advance a step once per parameter that holds it (a resumed run's bias correction was then wrong).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def torch_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's wrappers (ChainedOptimizer, mixed-precision, distributed)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
        return
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:  # its `.optimizer` property asserts there is only one
        for inner in chained:
            yield from torch_optimizers(inner)
        return
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        yield inner


def adam_optimizers(optimizer) -> Iterator[torch.optim.Adam]:
    """The torch Adam/AdamW optimizers among them (torch's AdamW is an Adam; SGD etc. are left alone)."""
    return (opt for opt in torch_optimizers(optimizer) if isinstance(opt, torch.optim.Adam))


def kernel(optimizer) -> Optional[str]:
    """The kernel its torch AdamW steps with, "fused" or "foreach"; None if it holds no torch AdamW."""
    groups = [g for opt in adam_optimizers(optimizer) for g in opt.param_groups]
    return ("fused" if any(g.get("fused") for g in groups) else "foreach") if groups else None


def apply(optimizer, mode: str) -> bool:
    """Choose fused or foreach AdamW per `mode` (auto|on|off); True if any optimizer is fused."""
    any_fused = False
    for opt in adam_optimizers(optimizer):
        params = [p for g in opt.param_groups for p in g["params"]]
        fused = bool(params) and (mode == "on" or (mode == "auto" and all(p.is_cuda for p in params)))
        for group in opt.param_groups:
            group["fused"] = fused
            group["foreach"] = False if fused else None  # None: torch's default choice
        for p in params:
            state = opt.state.get(p)
            if state and "step" in state:
                step = state["step"] if torch.is_tensor(state["step"]) else torch.tensor(float(state["step"]))
                # A tensor of its own per parameter: megatron's distributed optimizer restores one `step`
                # tensor shared by all of them, which both kernels would then advance once per parameter.
                state["step"] = step.to(device=p.device if fused else "cpu", dtype=torch.float32, copy=True)
        any_fused |= fused
    return any_fused


def ensure_state(optimizer) -> None:
    """Give every parameter without AdamW state the state a first step would create (step 0, zero moments).

    megatron-core's distributed optimizer reads `step` from its state when it builds the template a
    checkpoint is loaded into, and fails on a fresh optimizer that has not stepped yet; a resume needs it.
    """
    for opt in adam_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if "step" not in state:
                    device = p.device if group.get("fused") or group.get("capturable") else "cpu"
                    state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                for key in ("exp_avg", "exp_avg_sq"):
                    if key not in state:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
