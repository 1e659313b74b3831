"""Run a function compiled by `torch.compile` on CUDA tensors, eagerly elsewhere or after a failure.

Shared by the fused fast paths (`model.fused_layer`, `model.fused_rope`): a function is compiled once per
`dynamic` setting; if compiling or running the compiled function raises, `auto` warns once and runs that
function eagerly from then on (e.g. no working compiler toolchain), while `on` raises.
"""
from __future__ import annotations

import functools
import warnings

import torch

_failed: set = set()  # functions whose compilation failed once: they run eagerly from then on


@functools.lru_cache(maxsize=None)
def compiled(fn, dynamic=False):
    """torch.compile(fn); with dynamic=False each distinct shape compiles once (e.g. dense S and routed k)."""
    dynamo = torch._dynamo.config
    # Dense and routed shapes, train and eval, several batch sizes: more than dynamo's default 8 variants.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64))
    return torch.compile(fn, dynamic=dynamic)


def run(fn, mode: str, x: torch.Tensor, *args, option: str, dynamic=False):
    """fn(x, *args) compiled on CUDA tensors, eagerly elsewhere (or after a failed compilation in auto).

    mode: the config option's value (auto | on); option: its name, for the warning.
    """
    if not x.is_cuda or fn in _failed:
        return fn(x, *args)
    try:
        return compiled(fn, dynamic)(x, *args)
    except Exception as e:  # e.g. no working compiler toolchain: keep training, unfused
        if mode == "on":
            raise
        _failed.add(fn)
        warnings.warn(f"{option}: torch.compile failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); running {fn.__name__} eagerly")
        return fn(x, *args)
