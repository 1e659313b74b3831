"""Weight gradients added straight into megatron-core DDP's fp32 `main_grad` by the GEMM (`model.fused_wgrad`).

Megatron-core's DDP keeps an fp32 `main_grad` buffer per parameter. Unfused, each weight gradient is a
bf16 GEMM output, which DDP's backward hook (or, with `train.cuda_graphs`, one multi-tensor kernel) then
adds into `main_grad`: per parameter and micro-batch 2 bytes written, then 2 + 4 read and 4 written again.
Here the weight-gradient GEMM itself accumulates, `main_grad += dY^T X` in fp32 (cuBLAS's beta = 1, fp32
C and D, bf16 A and B: `torch.addmm(..., out_dtype=torch.float32)`), which is what megatron-core's
`gradient_accumulation_fusion` does with apex's `fused_weight_gradient_mlp_cuda`, without apex.

For a routed MoD layer the weight-gradient traffic does not shrink with the capacity while its matmuls
do: at d=2048 and 1,024 routed tokens the multi-tensor add took 168 us of a 1.08 ms layer step on an H100.
With this, that graphed layer stepped in 0.98 instead of 1.03 ms; but whole MoD models trained 0.6% (368M)
and 1.1% (1.3B) slower on an H100, so it is off by default (`model.fused_wgrad`; docs/benchmarks.md,
eleventh session). In a profile of the 368M MoD model the backward graphs did take 1.1 ms less per step,
but the step gained three device-to-device copies per layer, under the forward replays in the profile
(about 0.7 ms a step; source not yet found, not in the compiled layer, whose kernels were unchanged
when run alone) and the optimizer step measured 0.8 ms longer.

The contract with megatron-core DDP is the one its own fused linear layers use: the layer sets
`param.grad_added_to_main_grad = True` in the forward (DDP resets it to False every step), and hands
autograd an uninitialised gradient of the weight's shape, so that DDP's hook still fires (it marks the
bucket ready for the overlapped reduction) but skips its add and drops that gradient. The CUDA-graph
chain (training/graph_chain.py) leaves parameters marked `FUSED` out of its own adds.
"""
from __future__ import annotations

from typing import Optional

import torch

FUSED = "mod_wgrad_into_main_grad"  # attribute set on a parameter whose main_grad the layer's GEMM adds into


@torch.library.custom_op("mod_megatron::wgrad_into_main_grad", mutates_args=("main_grad",))
def wgrad_into_main_grad(main_grad: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad [out, in] += grad^T x, for grad [..., out] and x [..., in], accumulated in main_grad's dtype."""
    g, a = grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1])
    if main_grad.dtype == grad.dtype:
        torch.addmm(main_grad, g, a, out=main_grad)
    elif main_grad.is_cuda:  # bf16 inputs, fp32 accumulator: one cuBLAS GEMM with beta = 1
        torch.addmm(main_grad, g, a, out_dtype=main_grad.dtype, out=main_grad)
    else:  # mixed dtypes off CUDA (out_dtype is CUDA-only): a GEMM, then the add
        main_grad.add_(g.mm(a))


def main_grad_of(weight: torch.Tensor, enabled: bool) -> Optional[torch.Tensor]:
    """The buffer this weight's gradient should be added into by its GEMM, or None (autograd's way).

    Only for a weight of megatron-core DDP (fp32 `main_grad` of its shape, `grad_added_to_main_grad`)
    that gets a gradient in this forward. Marks it for DDP's hook and for the CUDA-graph chain.
    """
    main_grad = getattr(weight, "main_grad", None)
    if (not enabled or not torch.is_grad_enabled() or not weight.requires_grad
            or not hasattr(weight, "grad_added_to_main_grad") or not isinstance(main_grad, torch.Tensor)
            or main_grad.dtype != torch.float32 or main_grad.shape != weight.shape
            or main_grad.device != weight.device or not main_grad.is_contiguous()):
        return None
    weight.grad_added_to_main_grad = True  # DDP's hook: the gradient is in main_grad already
    setattr(weight, FUSED, True)
    return main_grad


def fused_into_main_grad(param: torch.Tensor) -> bool:
    """Did a fused layer claim this parameter (its GEMM adds the gradient into main_grad itself)?"""
    return getattr(param, FUSED, False)
