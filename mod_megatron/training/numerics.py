"""Non-finite (NaN/Inf) losses and gradients: caught every step, never applied, never saved.

After the backward pass and before `optimizer.step()` each rank checks its loss (last stage) and its
gradient buffers; one all-reduce makes every rank agree. A non-finite step is not applied (megatron's
optimizer could not undo it: Adam moments and clipping would spread the NaN into every parameter).
`train.nan_policy=skip` drops the update and goes on with the next batch (the bad batch counts as
consumed), stopping after `train.max_skipped_steps` in a row; `stop` stops at once. Either way the
step's micro-batches are re-run forward with hooks on the embedding, every decoder layer and the
output layer to name where the first non-finite value appeared.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import torch.distributed as dist

# Test hook (tests/reliability): "ITER[,ITER...]@LAYER" multiplies decoder layer LAYER's output (megatron's
# 1-based layer_number) by NaN in those iterations, so a NaN appears deterministically.
TEST_INJECT_NAN_ENV = "MOD_TEST_INJECT_NAN"


class NumericalError(RuntimeError):
    """Training stopped on non-finite values; the message is one line."""


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def local_grads_finite(chunks) -> torch.Tensor:
    """Whether this rank's gradients (megatron DDP's contiguous grad buffers) are all finite, as a 0-dim
    bool tensor on their device: one max-abs pass per buffer (NaN and Inf propagate through it), no host
    synchronisation here."""
    maxes = []
    for chunk in chunks:
        buffers = getattr(chunk, "buffers", None)  # megatron DDP's list (a plain nn.Module's is a method)
        if isinstance(buffers, (list, tuple)):
            grads = [b.grad_data for b in list(buffers) + list(getattr(chunk, "expert_parallel_buffers", []))]
        else:
            grads = [p.grad for p in chunk.parameters() if p.grad is not None]
        maxes += [torch.linalg.vector_norm(g, ord=float("inf")).float() for g in grads if g.numel()]
    if not maxes:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(maxes)).all()


def any_rank_flag(ok, device: torch.device) -> torch.Tensor:
    """[1.0] if `ok` (a bool or a bool tensor) is False on some rank, else [0.0]: a float tensor on
    `device` after one all-reduce, with no host synchronisation (read it when the GPU has caught up)."""
    flag = (~torch.as_tensor(ok, device=device)).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


class Recorder:
    """Wraps a micro-batch iterator and keeps the batches it handed out (for the re-run)."""

    def __init__(self, it):
        self.it, self.batches = it, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.batches.append(batch)
        return batch


@torch.no_grad()
def first_nonfinite(chunks, batches, device, pp: int) -> Optional[str]:
    """Re-run `batches` forward with finiteness hooks; where the first NaN/Inf appeared, None if nowhere.

    Called on every rank (TP ranks must run the forward together); needs pp=1 (one stage has all layers)."""
    if pp > 1 or len(chunks) != 1 or not batches:
        return "layer search needs parallel.pp=1"
    model = _unwrap(chunks[0])
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not found and torch.is_tensor(out) and not bool(torch.isfinite(out).all()):
                found.append(name)
        return check

    named = [("embedding", getattr(model, "embedding", None))]
    named += [(f"decoder layer {layer.layer_number} ({type(layer).__name__})", layer) for layer in model.decoder.layers]
    named += [("final layernorm", getattr(model.decoder, "final_layernorm", None)),
              ("output layer", getattr(model, "output_layer", None))]
    handles = [m.register_forward_hook(hook(name)) for name, m in named if m is not None]
    try:
        for i, b in enumerate(batches):
            b = {k: v.to(device) for k, v in b.items()}
            model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            if found:
                return f"first non-finite output at {found[0]}, micro-batch {i}"
    finally:
        for h in handles:
            h.remove()
    return None


def locate(chunks, batches, device, pp: int) -> str:
    """first_nonfinite over all ranks: the first rank that found something, in rank order."""
    where = first_nonfinite(chunks, batches, device, pp)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, where)
        hits = [f"{w} (rank {r})" for r, w in enumerate(every) if w]
        where = hits[0] if hits else None
    return where or "all forward outputs finite: the NaN/Inf arose in the backward pass"


@contextlib.contextmanager
def test_nan_injection(chunks, iteration: int):
    """The TEST_INJECT_NAN_ENV test hook; does nothing unless the variable is set."""
    spec = os.environ.get(TEST_INJECT_NAN_ENV)
    handles = []
    if spec:
        iters, _, layer = spec.partition("@")
        if iteration in {int(x) for x in iters.split(",")}:
            def poison(module, args, output):
                if isinstance(output, tuple):
                    return (output[0] * float("nan"),) + tuple(output[1:])
                return output * float("nan")
            handles = [lay.register_forward_hook(poison) for c in chunks for lay in _unwrap(c).decoder.layers
                       if lay.layer_number == int(layer or 1)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class NanPolicy:
    """Counts skipped steps and decides, per train.nan_policy / max_skipped_steps, when to stop."""

    def __init__(self, policy: str, max_skipped: int):
        self.policy, self.max_skipped = policy, max_skipped
        self.total = self.consecutive = 0

    def update(self, iteration: int, out: dict) -> Optional[str]:
        """None for a good step; else a one-line note. Raises NumericalError when the run must stop."""
        if "nonfinite" not in out:
            self.consecutive = 0
            return None
        self.total += 1
        self.consecutive += 1
        loss = out.get("loss")
        what = "loss" if loss is not None and not math.isfinite(loss) else "gradients"
        head = f"iteration {iteration}: non-finite {what} ({out['nonfinite']})"
        if self.policy == "stop":
            raise NumericalError(f"{head}; stopped before applying the update (train.nan_policy=stop); "
                                 "rerun to resume from the last checkpoint")
        if self.consecutive > self.max_skipped:
            raise NumericalError(f"{head}; {self.consecutive} non-finite steps in a row > train.max_skipped_steps="
                                 f"{self.max_skipped}; stopped, the last checkpoint is kept")
        return f"{head}; update skipped ({self.consecutive} in a row, {self.total} in total)"
