"""Weight gradients added straight into megatron-core DDP's fp32 `main_grad` by the GEMM (`model.fused_wgrad`).

Megatron-core's DDP keeps an fp32 `main_grad` buffer per parameter. Unfused, each weight gradient is a
bf16 GEMM output, which DDP's backward hook (or, with `train.cuda_graphs`, one multi-tensor kernel) then
adds into `main_grad`: per parameter and micro-batch 2 bytes written, then 2 + 4 read and 4 written again.
Here the weight-gradient GEMM itself accumulates, `main_grad += dY^T X` in fp32 (cuBLAS's beta = 1, fp32
C and D, bf16 A and B: `torch.addmm(..., out_dtype=torch.float32)`), which is what megatron-core's
`gradient_accumulation_fusion` does with apex's `fused_weight_gradient_mlp_cuda`, without apex.

For a routed MoD layer the weight-gradient traffic does not shrink with the capacity while its matmuls
do: at d=2048 and 1,024 routed tokens the multi-tensor add took 168 us of a 1.08 ms layer step on an H100.
With this, that graphed layer stepped in 0.98 instead of 1.03 ms. It is on by default since the fourteenth
session (docs/benchmarks.md), when two things that had made whole MoD models slower with it were fixed;
same-card A/Bs on an H100 then gave 368M MoD +1.5%, dense +0.8%; 1.3B MoD +0.9%, dense -0.1%:

- The compiled layer no longer sees a main_grad tensor. Handed in as graph inputs (views of DDP's one
  flat buffer, written in the backward), they made AOTAutograd functionalise the op (`copy_` back into
  the inputs in its graphs), and the GPU profile of the 368M MoD model showed 6 device copies per dense
  layer and step in the forward graphs, 1.7 ms a step. Now the layer passes only which of its weights
  are fused, and `wgrad_of_weight(weight, grad, x)` finds the weight's main_grad by the weight's address
  (`main_grad_of` records it on every forward that claims the weight) and returns the placeholder
  gradient: the compiler sees a pure op whose output is used, and keeps it.
- DDP's buffer had main_grads 4 or 8 bytes off 16-byte alignment (after the MoD predictor's 1-element
  bias), and cuBLAS ran the accumulating GEMMs into them on slow sm80 kernels; training/builder.py's
  `odd_sized_params_last` now lays the buffer out aligned.

On a step's first micro-batch the GEMM writes instead of adding (beta = 0): main_grad was zeroed by DDP's
`zero_grad_buffer`, so `main_grad = dY^T X` is the same sum without reading the fp32 buffer (4 of its 8
bytes per parameter). First means: DDP's `grad_added_to_main_grad` was still False when the forward
claimed the weight (`zero_grad_buffer` resets it; this module's forward sets it), and only that
forward's backward writes. CUDA graphs bake the choice in at capture (`main_grad_mode`): at one
micro-batch per step the graphs' chain writes on every step, else it adds (training/cuda_graphs.py).
Measured in the fifteenth session (docs/benchmarks.md): a MoD layer at d=2048, 16k tokens, 1.54 -> 1.46 ms.

The contract with megatron-core DDP is the one its own fused linear layers use: the layer sets
`param.grad_added_to_main_grad = True` in the forward (DDP resets it to False every step), and hands
autograd an uninitialised gradient of the weight's shape, so that DDP's hook still fires (it marks the
bucket ready for the overlapped reduction) but skips its add and drops that gradient. The CUDA-graph
chain (training/graph_chain.py) leaves parameters marked `FUSED` out of its own adds.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

FUSED = "mod_wgrad_into_main_grad"  # attribute set on a parameter whose main_grad the layer's GEMM adds into
# weight.data_ptr() -> [weight shape, weak reference to its main_grad, write instead of add?]: set by
# main_grad_of, read by wgrad_of_weight; weak, so that a discarded model's gradient buffers are not kept
# alive by this table
_MAIN_GRADS: dict = {}
WRITE, ADD = "write", "add"  # what a weight-gradient GEMM does to main_grad (`main_grad_mode`; the graph chains')
MODES = (WRITE, ADD)
_MODE: Optional[str] = None  # WRITE or ADD forces the choice (`main_grad_mode`); None: the forward's


@torch.library.custom_op("mod_megatron::wgrad_into_main_grad", mutates_args=("main_grad",))
def wgrad_into_main_grad(main_grad: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, write: bool = False) -> None:
    """main_grad [out, in] += grad^T x, for grad [..., out] and x [..., in], accumulated in main_grad's dtype
    (write: main_grad = grad^T x, the GEMM's beta = 0)."""
    g, a = grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1])
    if main_grad.dtype == grad.dtype:
        torch.mm(g, a, out=main_grad) if write else torch.addmm(main_grad, g, a, out=main_grad)
    elif main_grad.is_cuda:  # bf16 inputs, fp32 accumulator: one cuBLAS GEMM with beta = 1 (or 0)
        if write:
            torch.mm(g, a, out_dtype=main_grad.dtype, out=main_grad)
        else:
            torch.addmm(main_grad, g, a, out_dtype=main_grad.dtype, out=main_grad)
    elif write:  # mixed dtypes off CUDA (out_dtype is CUDA-only): a GEMM, then the copy or the add
        main_grad.copy_(g.mm(a))
    else:
        main_grad.add_(g.mm(a))


@torch.library.custom_op("mod_megatron::wgrad_of_weight", mutates_args=())
def wgrad_of_weight(weight: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight's main_grad += grad^T x (`wgrad_into_main_grad`); returns the placeholder gradient for weight.

    The main_grad is the one `main_grad_of(weight, True)` claimed in this forward, found by the weight's
    address; the add is hidden from the compiler on purpose (see the module's docstring). It writes
    instead where that forward was the step's first (once: a second backward adds), or as `main_grad_mode`
    says."""
    entry = _MAIN_GRADS.get(weight.data_ptr())
    main_grad = entry[1]() if entry is not None and entry[0] == tuple(weight.shape) else None
    if main_grad is None:
        raise RuntimeError("model.fused_wgrad: no main_grad was claimed for this weight in its forward "
                           "(main_grad_of); run with --model.fused_wgrad=false")
    write = entry[2] if _MODE is None else _MODE == WRITE
    entry[2] = False
    wgrad_into_main_grad(main_grad, grad, x, write)
    return torch.empty_like(weight)


@wgrad_of_weight.register_fake
def _(weight, grad, x):
    return torch.empty_like(weight)


def main_grad_of(weight: torch.Tensor, enabled: bool) -> Optional[torch.Tensor]:
    """The buffer this weight's gradient should be added into by its GEMM, or None (autograd's way).

    Only for a weight of megatron-core DDP (fp32 `main_grad` of its shape, `grad_added_to_main_grad`)
    that gets a gradient in this forward. Marks it for DDP's hook and for the CUDA-graph chain.
    """
    if not torch.is_grad_enabled() or not claimable(weight, enabled):
        return None
    main_grad = weight.main_grad
    first = not weight.grad_added_to_main_grad  # nothing added since DDP zeroed main_grad
    weight.grad_added_to_main_grad = True  # DDP's hook: the gradient is in main_grad already
    setattr(weight, FUSED, True)
    _MAIN_GRADS[weight.data_ptr()] = [tuple(weight.shape), weakref.ref(main_grad), first]  # for wgrad_of_weight
    return main_grad


def claimable(weight: torch.Tensor, enabled: bool) -> bool:
    """Would `main_grad_of` claim this weight in a forward with grad on? (no side effects)"""
    main_grad = getattr(weight, "main_grad", None)
    return (enabled and weight.requires_grad and hasattr(weight, "grad_added_to_main_grad")
            and isinstance(main_grad, torch.Tensor) and main_grad.dtype == torch.float32
            and main_grad.shape == weight.shape and main_grad.device == weight.device and main_grad.is_contiguous())


@contextlib.contextmanager
def main_grad_mode(mode: str):
    """Within: every fused weight gradient writes ("write") or adds ("add") whatever its forward saw; for
    captures, whose choice every replay repeats."""
    global _MODE
    if mode not in MODES:
        raise ValueError(f"main_grad_mode: {mode!r} is not one of {MODES}")
    before, _MODE = _MODE, mode
    try:
        yield
    finally:
        _MODE = before


def fused_into_main_grad(param: torch.Tensor) -> bool:
    """Did a fused layer claim this parameter (its GEMM adds the gradient into main_grad itself)?"""
    return getattr(param, FUSED, False)
