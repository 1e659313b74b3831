"""CUDA graphs for a chain of layers, each layer's input the previous layer's output, in place.

`torch.cuda.make_graphed_callables` gives every graphed callable its own static input and its own
output-gradient buffer. A stack of graphed layers then copies, per layer and micro-batch, its input
into its graph and the gradient of its output into the backward graph: two passes over [S, B, H]
that compute nothing (about 1.5 ms of a 368M-model step on an H200, docs/benchmarks.md). Here:

- layer i+1's static input *is* layer i's static output (the same memory), and layer i's
  output-gradient buffer *is* layer i+1's input gradient, so a stack replayed in order copies only
  at its two ends (a call whose input lives elsewhere still gets it copied, so any order is correct);
- a parameter that carries megatron-core DDP's fp32 `main_grad` gets its gradient added to that
  buffer inside the backward graph by its own GEMM where the fused layer does that (model/wgrad.py),
  else by a graph replayed right after the layer's backward graph: one multi-tensor Triton launch
  for the layer's parameters (kernels/multi_tensor_triton.py), torch's `add_` for any that do not fit
  it. That is what DDP's backward hook does (`main_grad.add_(grad)`, then `grad = None`), but there
  each parameter's add is launched from Python after autograd hands the gradient over, on PyTorch's
  non-vectorised mixed-dtype path. Parameters without `main_grad` get their gradients through
  autograd, as with make_graphed_callables.

Where the fused layer's GEMMs take weight gradients into main_grad (model/wgrad.py), a chain is captured
for one `variant`: WRITE (beta = 0: for a step's first micro-batch, whose main_grad DDP has just zeroed;
it skips reading 4 bytes per parameter) or ADD (later micro-batches). ChunkGraphs captures each variant
the first time a micro-batch needs it, into one memory pool: the chains' activations share memory, as
one chain's forward and backward have run before the other's forward starts.

Like make_graphed_callables, all graphs share one memory pool and are captured in the order they
replay (forwards first to last, backwards last to first), so a step must replay them in that order:
a forward of the whole chain, then its backward. Only tensors are graphed; every call must see the
shapes of the capture (ChunkGraphs checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from mod_megatron.model.wgrad import ADD, fused_into_main_grad, main_grad_mode


@dataclass
class Link:
    """One captured layer: its graphs and the static tensors they read and write."""

    fwd: torch.cuda.CUDAGraph
    static_in: torch.Tensor  # for layers after the first, an alias of the previous layer's `out`
    static_args: tuple  # further inputs without gradient (the rotary table), shared by all layers
    out: torch.Tensor
    returned: tuple  # parameters whose gradients go back through autograd
    accumulated: tuple  # parameters whose gradients the backward graphs add to `main_grad`
    main_grads: tuple  # those main_grad tensors at capture (the graph writes to their memory)
    bwd: Optional[torch.cuda.CUDAGraph] = None
    acc: Optional[torch.cuda.CUDAGraph] = None  # adds the accumulated parameters' gradients to main_grad
    adder: object = None  # the MultiTensor that graph launches (it keeps the gradients' memory alive)
    added: tuple = ()  # the accumulated parameters given a gradient (by their GEMMs or by `acc`)
    grads_ready: Optional[Callable] = None  # called with `added` after the adds: DDP's bucket bookkeeping
    grad_out: Optional[torch.Tensor] = None  # for layers before the last, an alias of the next's grad_in
    grad_in: Optional[torch.Tensor] = None
    returned_grads: tuple = ()
    copies: list = field(default_factory=lambda: [0])  # copies made at replay (shared by the chain)
    in_gemm: tuple = ()  # accumulated parameters whose GEMMs take their gradients into main_grad themselves
    pool: object = None  # the graph memory pool of the chain


class _Replay(torch.autograd.Function):
    """Replay one link: copy inputs that live elsewhere into the graph, replay, hand out its outputs."""

    @staticmethod
    def forward(ctx, link: Link, x, *rest):
        args = rest[:len(link.static_args)]
        for static, given in ((link.static_in, x), *zip(link.static_args, args)):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
                link.copies[0] += 1
        for p, grad in zip(link.accumulated, link.main_grads):
            if getattr(p, "main_grad", None) is not grad:
                raise RuntimeError("train.cuda_graphs: a parameter's main_grad buffer was replaced after capture; "
                                   "the graph still adds into the old one")
        link.fwd.replay()
        ctx.link = link
        ctx.num_args = len(args)
        return link.out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        link = ctx.link
        if link.grad_out.data_ptr() != grad.data_ptr():
            link.grad_out.copy_(grad)
            link.copies[0] += 1
        link.bwd.replay()
        if link.acc is not None:
            link.acc.replay()
        if link.grads_ready is not None and link.added:  # as DDP's hook would: a full bucket starts its reduction
            link.grads_ready(link.added)
        grads = tuple(None if g is None else g.detach() for g in link.returned_grads)
        return (None, link.grad_in.detach(), *([None] * ctx.num_args), *grads)


def _replayer(link: Link):
    def call(x, *args):
        return _Replay.apply(link, x, *args, *link.returned)
    return call


def _grad_params(call) -> list:
    return [p for p in call.parameters() if p.requires_grad]


def _has_main_grad(p) -> bool:
    grad = getattr(p, "main_grad", None)
    return isinstance(grad, torch.Tensor) and grad.shape == p.shape and grad.device == p.device


def _adder(dsts: list, srcs: list):
    from mod_megatron.kernels.multi_tensor_triton import MultiTensor

    return MultiTensor(dsts, srcs, accumulate=True)


def _block() -> int:
    from mod_megatron.kernels.multi_tensor_triton import BLOCK

    return BLOCK


def capture_chain(calls, sample: torch.Tensor, args: tuple = (), num_warmup_iters: int = 3, variant: str = ADD,
                  pool=None, copies: Optional[list] = None) -> tuple[list, list]:
    """Graph modules `calls` (each `call(x, *args) -> y` shaped like x) as one chain.

    sample: an input like the first call's (requires grad); args: tensors without gradient that every
    call gets (kept as the graphs' static inputs: a later call passing the same tensors copies nothing);
    variant: WRITE or ADD, what the backward graphs' weight-gradient GEMMs do to main_grad (model/wgrad.py);
    pool: a graph memory pool to capture into (a new one if None); copies: the counter the replays share.
    Returns (one function per call, fn(x, *args) -> y, differentiable in x; the Links).
    """
    params = [_grad_params(call) for call in calls]
    args = tuple(a.detach() for a in args)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # lazy initialisation (cuDNN plans, compilation) stays out of the graphs; the warm-up backwards add
    # (zeros) into main_grad whatever DDP's flags say, as main_grad may hold this step's gradients already
    with torch.cuda.stream(side), main_grad_mode(ADD):
        for call, ps in zip(calls, params):
            for _ in range(num_warmup_iters):
                x = sample.detach().requires_grad_(True)
                y = call(x, *args)
                # zeros: a layer whose GEMMs add weight gradients into main_grad (model/wgrad.py) adds 0 here
                torch.autograd.grad(y, (x, *ps), torch.zeros_like(y), allow_unused=True)
                del x, y
        # compile the adder's kernel for each (main_grad, parameter) dtype pair before any capture
        for dst_dtype, src_dtype in {(p.main_grad.dtype, p.dtype) for ps in params for p in ps if _has_main_grad(p)}:
            _adder([torch.zeros(_block(), device=sample.device, dtype=dst_dtype)],
                   [torch.zeros(_block(), device=sample.device, dtype=src_dtype)])()
    torch.cuda.synchronize()

    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    links, copies = [], [0] if copies is None else copies
    x = sample.detach().clone().requires_grad_(True)
    for call, ps in zip(calls, params):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            y = call(x, *args)
        accumulated = tuple(p for p in ps if _has_main_grad(p))
        links.append(Link(fwd=graph, static_in=x, static_args=args, out=y,
                          returned=tuple(p for p in ps if not _has_main_grad(p)), accumulated=accumulated,
                          main_grads=tuple(p.main_grad for p in accumulated), copies=copies, pool=pool))
        x = y.detach().requires_grad_(True)  # the next layer reads this layer's output where it lies

    grad = torch.empty_like(links[-1].out)
    for link in reversed(links):
        link.grad_out = grad
        link.in_gemm = tuple(p for p in link.accumulated if fused_into_main_grad(p))  # the graph's GEMMs add these
        added = tuple(p for p in link.accumulated if not fused_into_main_grad(p))
        graph = torch.cuda.CUDAGraph()
        with main_grad_mode(variant), torch.cuda.graph(graph, pool=pool):
            grads = torch.autograd.grad(link.out, (link.static_in, *link.returned, *added),
                                        grad_outputs=grad, allow_unused=True)
        if grads[0] is None:
            raise RuntimeError("train.cuda_graphs: a layer's output does not depend on its input")
        link.bwd, link.grad_in, link.returned_grads = graph, grads[0], grads[1:1 + len(link.returned)]
        got = [(p, g) for p, g in zip(added, grads[1 + len(link.returned):]) if g is not None]
        link.added = link.in_gemm + tuple(p for p, _ in got)
        if got:  # the address tables are made here, between captures, from the gradients' fixed memory
            link.adder = _adder([p.main_grad for p, _ in got], [g for _, g in got])
            link.acc = torch.cuda.CUDAGraph()
            with torch.cuda.graph(link.acc, pool=pool):
                link.adder.run_all()  # as DDP's hook would
        grad = grads[0]  # the previous layer's output gradient, where this graph writes it
    return [_replayer(link) for link in links], links
