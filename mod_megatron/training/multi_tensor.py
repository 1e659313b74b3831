"""Multi-tensor grad-norm and scale/copy for megatron-core's optimizer when neither apex nor TE is installed.

megatron-core's optimizer computes the gradient norm for clipping and copies the fp32 main params back
into the bf16 model params through apex's or Transformer Engine's multi-tensor kernels. Without
them it falls back to `megatron.core.utils.local_multi_tensor_l2_norm` (one `torch.norm` per tensor,
then `torch.tensor()` over the list of device scalars: a device-to-host copy per parameter) and
`local_multi_tensor_scale` (a multiply and a copy per parameter). With a few hundred parameters that
is a thousand small kernels and hundreds of host synchronisations per step.

`install()` swaps those two fallbacks, where megatron-core chose them, for the same operations on
`torch._foreach_*` kernels (one launch per group of tensors, no host synchronisation). Nothing changes
when apex or TE provided the kernels. Results match the fallbacks (tests/training/test_multi_tensor.py).

For bf16 (apex or not), megatron-core copies the fp32 main parameters into the model's bf16 ones after
each step with one `copy_` per parameter (`_multi_tensor_copy_this_to_that` without an overflow
buffer), on PyTorch's non-vectorised mixed-dtype path: ~1 ms per step at 368M on an H200. On a GPU,
`install()` routes that copy through one multi-tensor Triton launch (kernels/multi_tensor_triton.py),
bit for bit the same values.
"""
from __future__ import annotations

import torch


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm: ([total L2 norm], None) over tensor_lists[0]."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, device=noop_flag.device), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """Drop-in for amp_C.multi_tensor_scale: tensor_lists[1][i] = tensor_lists[0][i] * factor."""
    src, dst = tensor_lists
    if not src:
        return
    if factor == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, factor)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


_copies: dict = {}  # (addresses of this, addresses of that) -> MultiTensor; it keeps those tensors alive
_MAX_COPIES = 4  # lists kept: a ChainedOptimizer's parts take turns, each its own; older ones are let go


def copy_op(this, that):
    """The MultiTensor copying `this` into `that`, made once per pair of lists (the most recent few kept)."""
    from mod_megatron.kernels.multi_tensor_triton import MultiTensor

    key = (tuple(t.data_ptr() for t in this), tuple(t.data_ptr() for t in that))
    op = _copies.pop(key, None)
    if op is None:
        op = MultiTensor(list(that), list(this), accumulate=False)
    _copies[key] = op  # the most recently used last
    while len(_copies) > _MAX_COPIES:  # e.g. the parameters were replaced (another model)
        _copies.pop(next(iter(_copies)))
    return op


def copy_this_to_that(this, that, overflow_buf=None):
    """Drop-in for megatron-core's `_multi_tensor_copy_this_to_that`: `that[i] = this[i]`, on CUDA
    tensors as one Triton launch per dtype pair (PyTorch's `copy_` for tensors the kernel does not take)."""
    if overflow_buf is not None or not this or not this[0].is_cuda:
        return _megatron_copy(this, that, overflow_buf)
    copy_op(this, that).run_all()


_megatron_copy = None  # megatron-core's own function, once install() replaced it


def megatrons_copy():
    """megatron-core's own `_multi_tensor_copy_this_to_that`, whether or not install() replaced it."""
    from megatron.core.optimizer import optimizer

    current = optimizer._multi_tensor_copy_this_to_that
    return _megatron_copy if current is copy_this_to_that else current


def install() -> None:
    """Use these in megatron-core's clip_grads and optimizer modules where they bound the local fallbacks."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    for module in (clip_grads, optimizer):
        if getattr(module, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
            module.l2_norm_impl = l2_norm
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
    global _megatron_copy
    if torch.cuda.is_available() and optimizer._multi_tensor_copy_this_to_that is not copy_this_to_that:
        try:
            import triton  # noqa: F401  (CUDA builds of torch ship it)
        except ImportError:
            return
        _megatron_copy = optimizer._multi_tensor_copy_this_to_that
        optimizer._multi_tensor_copy_this_to_that = copy_this_to_that
