"""Per-layer CUDA graphs for training (`train.cuda_graphs`): capture each transformer layer's forward
and backward once, then replay them every micro-batch.

Why: a MoD layer at capacity 12.5% does an eighth of a dense layer's GPU work but all of its CPU
work (megatron-core's Python layer code, routing, ~100 kernel launches), so small routed layers are
bound by the CPU, not the GPU (docs/benchmarks.md). A replayed graph launches the whole layer at
once. Top-k routing has a static k and no host synchronisation, which is what makes it capturable.

How: `enable(chunks)` wraps the forward of every layer of each model chunk. The first training
forward (grad on, layer in train mode) captures all layers of the chunk together as one chain
(`graph_chain.capture_chain`): one memory pool, captured in the order they run (forwards in layer
order, backwards in reverse), each layer reading the previous layer's output where it lies, using
that forward's shapes; every later training forward with the same shapes replays. Evaluation (no
grad, eval mode), other shapes or extra arguments run the plain eager forward. The backward graphs
add each parameter's gradient to megatron-core DDP's `main_grad` themselves (what DDP's hook does
after autograd; parameters without `main_grad` get theirs through autograd), and then, with
`parallel.overlap_grad_reduce`, mark them ready in DDP's buckets as that hook does, so a full bucket
starts its all-reduce while the backward goes on. Gradient accumulation over micro-batches, the
gradient reduction and the optimizer are unchanged. Where the fused layer's GEMMs take the weight
gradients into main_grad (model/wgrad.py) and a step has one micro-batch, each step (DDP's
`grad_added_to_main_grad` flags still as `zero_grad_buffer` left them) replays a chain whose GEMMs write
them; with several micro-batches per step all replay the chain whose GEMMs add (a second chain would hold
two more [S, B, H] tensors per layer, 3.2 GiB at the 368M and 1.3B models' micro-batches, to speed up
one micro-batch in 16 or 32). Each chain is captured when a micro-batch first needs it.

What it needs (config.validate and `check_supported` say so with the fix): a CUDA device, one
pipeline stage (1F1B keeps several micro-batches in flight; a graph holds one), no tensor
parallelism (not yet validated on several GPUs), no data parallelism (correct, equal losses, but
measured 2.3x slower than eager at DP=4, cause not yet found; docs/parallel.md), no MoE layers
(their per-expert token counts go through the host), no capacity warm-up (k changes), no dropout.
The MoD layer's diagnostics (`last_aux`, `last_routing`) point at the graph's tensors, which each
replay rewrites, so they describe the latest micro-batch as in eager mode.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from mod_megatron.model.fused_layer import PLAIN_IF_SET, fused_wgrad_weights
from mod_megatron.model.wgrad import ADD, WRITE
from mod_megatron.training import graph_chain

# Arguments a TransformerLayer forward may get that the graph does not carry (those the fused layer does not
# model, and the attention mask): any of them not None (or a hidden state that needs no grad) sends that call
# down the eager path.
_EAGER_IF_SET = ("attention_mask", *PLAIN_IF_SET)


def unsupported(cfg) -> Optional[str]:
    """Why `train.cuda_graphs` cannot run with this config (None if it can), with the fix."""
    from mod_megatron.config import is_moe_layer

    if cfg.train.engine != "megatron":
        return "train.cuda_graphs needs --train.engine=megatron (the DeepSpeed engine runs eagerly)"
    if cfg.parallel.pp > 1:
        return ("train.cuda_graphs needs parallel.pp=1: the pipeline schedule keeps several micro-batches in "
                "flight and a layer's graph holds one; use --train.cuda_graphs=false with pipeline parallelism")
    if cfg.parallel.tp > 1:
        return ("train.cuda_graphs is validated with one GPU per model replica (parallel.tp=1): "
                "tensor-parallel collectives inside captured layers are not yet tested; use "
                "--train.cuda_graphs=false with parallel.tp > 1")
    if any(is_moe_layer(cfg, i) for i in range(cfg.model.num_layers)):
        return ("train.cuda_graphs does not support MoE layers (their per-expert token counts go through the "
                "host); use --train.cuda_graphs=false for MoE/MoDE models")
    if cfg.mod.enabled and cfg.mod.capacity_warmup_iters > 0:
        return ("train.cuda_graphs needs a fixed capacity (k is baked into the graph); "
                "set --mod.capacity_warmup_iters=0 or --train.cuda_graphs=false")
    if cfg.model.dropout > 0:
        return "train.cuda_graphs needs model.dropout=0 (dropout's RNG is not captured); set --model.dropout=0"
    if cfg.parallel.overlap_param_gather:
        return ("train.cuda_graphs cannot wait for overlapped parameter all-gathers (a replay skips the forward "
                "hooks that do); use --parallel.overlap_param_gather=false with graphs")
    return None


def capture_stream() -> "torch.cuda.Stream":
    """The stream every capture runs on: torch.cuda.graph's default capture stream, fixed once."""
    if torch.cuda.graph.default_capture_stream is None:
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
    return torch.cuda.graph.default_capture_stream


@contextlib.contextmanager
def on_capture_stream():
    """Build megatron-core's DDP wrapper (or anything that makes parameters' AccumulateGrad nodes) here.

    An autograd node runs on the stream that was current when it was made. megatron-core's DDP makes
    every parameter's AccumulateGrad node once, when it wraps the model, and keeps it (its grad hooks
    hang on it). Made on the default stream, such a node makes a captured backward wait on the legacy
    stream, which CUDA refuses ("operation would make the legacy stream depend on a capturing blocking
    stream"); made on the capture stream, the captured backward needs no cross-stream wait. Eager
    backwards then hand those parameters' grads over with an event, which is correct and cheap.
    """
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


class _LayerCall(torch.nn.Module):
    """A layer as the graph chain wants it: positional tensors in, one tensor out."""

    def __init__(self, layer, with_rope: bool):
        super().__init__()
        self.layer = layer
        self.with_rope = with_rope

    def forward(self, hidden_states, *rope):
        out, _ = self.layer.eager_forward(hidden_states=hidden_states, attention_mask=None,
                                          rotary_pos_emb=rope[0] if self.with_rope else None)
        return out


def _ensure_aux_loss_scale(device) -> None:
    """The aux-loss scale tensor must exist (shape [1], on the GPU) before capture: the graphs read
    that tensor, and later schedule steps copy the new scale into it rather than replacing it."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mod_megatron.model.predictor import set_aux_loss_scale

    cur = MoEAuxLossAutoScaler.main_loss_backward_scale  # keep its value; set_aux_loss_scale fixes shape/device
    set_aux_loss_scale(torch.ones(1, device=device) if cur is None else cur.detach().float().reshape(-1)[:1].to(device))


@dataclass
class Chain:
    """One captured chain of the chunk's layers (graph_chain.capture_chain) for one variant."""

    functions: list  # per layer: fn(x, *rope) -> y, replaying its graphs
    links: list  # graph_chain.Link per layer
    state: list  # per layer: the MoD attributes that point at this chain's graph tensors


class ChunkGraphs:
    """The graphed layers of one model chunk, captured together on their first training forward."""

    def __init__(self, layers, num_warmup_iters: int = 3, grads_ready=None, write_first: bool = True):
        self.layers = list(layers)
        self.write_first = write_first  # a micro-batch that finds main_grad just zeroed replays the WRITE chain
        self.grads_ready = grads_ready  # called with the parameters each backward graph added to main_grad
        self.num_warmup_iters = num_warmup_iters
        self.chains: dict = {}  # WRITE / ADD -> Chain, each captured when first needed
        self.pool = None  # the chains' one graph memory pool
        self.fused: Optional[list] = None  # parameters whose GEMMs take their gradients into main_grad
        self.variant = ADD  # the chain this micro-batch replays, chosen by layer 0's forward
        self.key = None  # (shape, dtype, device, rope shape) the graphs were captured for
        self.replays = 0
        self.writes = 0  # micro-batches that replayed the WRITE chain (a step's first)
        self._copies = [0]  # shared by every chain's links
        self.capture_s: Optional[float] = None
        for i, layer in enumerate(self.layers):
            layer.eager_forward = layer.forward
            layer.forward = self._forward_of(i)

    def _forward_of(self, i: int):
        def forward(hidden_states, *args, **kwargs):
            return self.forward(i, hidden_states, *args, **kwargs)
        return forward

    def _graphable(self, i: int, hidden_states, args, kwargs) -> bool:
        layer = self.layers[i]
        if args or not (layer.training and torch.is_grad_enabled() and hidden_states.is_cuda
                        and hidden_states.requires_grad):
            return False
        if getattr(layer, "routing_mode", "topk") != "topk":
            return False
        return all(kwargs.get(name) is None for name in _EAGER_IF_SET)

    def forward(self, i: int, hidden_states, *args, **kwargs):
        layer = self.layers[i]
        if not self._graphable(i, hidden_states, args, kwargs):
            return layer.eager_forward(hidden_states, *args, **kwargs)
        rope = kwargs.get("rotary_pos_emb")
        key = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device,
               None if rope is None else (tuple(rope.shape), rope.dtype))
        if i == 0 and (self.key is None or key == self.key):
            self.variant = self._variant()
            if self.variant not in self.chains:
                self.capture(self.variant, hidden_states, rope)
                self.key = key
            for p in self.fused:  # as model/wgrad.py's forward does: DDP's hook, and the next micro-batch, see it
                p.grad_added_to_main_grad = True
            self.writes += self.variant == WRITE
        chain = self.chains.get(self.variant)
        if chain is None or key != self.key:
            return layer.eager_forward(hidden_states, *args, **kwargs)
        for name, value in chain.state[i].items():  # eager calls in between (evaluation) replaced them
            setattr(layer, name, value)
        if hasattr(layer, "_aux_stats"):
            layer._aux_stats = None  # recomputed from this replay's tensors when read
        self.replays += 1
        out = chain.functions[i](hidden_states, *(() if rope is None else (rope,)))
        return out, None

    @property
    def graphed(self) -> Optional[dict]:
        """The chains captured so far (variant -> Chain), or None before the first capture."""
        return self.chains or None

    def _variant(self) -> str:
        """WRITE if none of the weight gradients the GEMMs take went into main_grad since megatron-core DDP's
        `zero_grad_buffer` (which zeroes main_grad and resets every `grad_added_to_main_grad`), else ADD."""
        if self.fused is None:  # before the first capture: the weights the fused layers will claim
            self.fused = [w for layer in self.layers for w in fused_wgrad_weights(layer)]
        if not self.fused or not self.write_first:
            return ADD
        return ADD if any(p.grad_added_to_main_grad for p in self.fused) else WRITE

    def capture(self, variant: str, hidden_states, rope) -> None:
        """Capture every layer's forward and backward (the `variant` chain) on sample inputs shaped like this
        forward's."""
        import time

        t0 = time.perf_counter()
        _ensure_aux_loss_scale(hidden_states.device)
        with_rope = rope is not None
        calls = [_LayerCall(layer, with_rope) for layer in self.layers]
        sample = hidden_states.detach().clone().requires_grad_(True)
        try:
            functions, links = graph_chain.capture_chain(
                calls, sample, (rope,) if with_rope else (), num_warmup_iters=self.num_warmup_iters,
                variant=variant, pool=self.pool, copies=self._copies)
        except Exception as e:  # an op that cannot be captured: one line with the way out, not a CUDA trace
            from mod_megatron.config import ConfigError

            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"train.cuda_graphs: capturing the layers failed ({type(e).__name__}: {first}); "
                              "run with --train.cuda_graphs=false") from e
        self.pool = links[0].pool  # the next chain's capture shares it
        for link in links:
            link.grads_ready = self.grads_ready
        state = [{name: getattr(layer, name) for name in ("last_routing", "_aux_inputs") if hasattr(layer, name)}
                 for layer in self.layers]
        self.chains[variant] = Chain(functions, links, state)
        in_gemm = [p for link in links for p in link.in_gemm]  # what the capture's forwards claimed
        if {id(p) for p in in_gemm} != {id(p) for p in self.fused}:
            raise RuntimeError(f"train.cuda_graphs: {len(in_gemm)} weights took their gradients in their GEMMs, "
                               f"{len(self.fused)} were expected to (model/fused_layer.py: fused_wgrad_weights)")
        if not self.fused:  # no GEMM takes a gradient: one chain serves every micro-batch
            self.chains[WRITE] = self.chains[ADD] = self.chains[variant]
        self.capture_s = (self.capture_s or 0.0) + time.perf_counter() - t0

    @property
    def copies(self) -> int:
        """Input and output-gradient copies the replays made so far (a chain run in order makes 2 per micro-batch)."""
        return self._copies[0]


ALLOW_DP_ENV = "MOD_MEGATRON_GRAPHS_WITH_DP"  # =1: graph anyway at DP > 1 (to measure or debug it)


def data_parallel_refusal(dp: int) -> Optional[str]:
    """Why graphs are refused at this data-parallel size (None at dp=1, or with ALLOW_DP_ENV=1).

    Correct, but slow: a 1.2B MoD GPT at DP=4 on 4 H200s ran 118k tokens/s graphed against 271k eager
    (docs/parallel.md); until the cause is found a launch does not pay for it unasked."""
    if dp <= 1 or os.environ.get(ALLOW_DP_ENV) == "1":
        return None
    return (f"train.cuda_graphs is for one model replica per launch for now (this launch has data-parallel "
            f"size {dp}): graphed layers with data parallelism measured 2.3x slower than eager on 4 GPUs; "
            "use --train.cuda_graphs=false with data parallelism")


def check_supported(cfg, device: torch.device, dp: int = 1) -> None:
    """Raise ConfigError (one line, with the fix) if `train.cuda_graphs` cannot run here (dp: the
    data-parallel size of this launch)."""
    from mod_megatron.config import ConfigError

    why = unsupported(cfg)
    if why is None and device.type != "cuda":
        why = "train.cuda_graphs needs a CUDA GPU; use --train.cuda_graphs=false on a CPU"
    if why is None:
        why = data_parallel_refusal(dp)
    if why:
        raise ConfigError(why)


def ddp_grads_ready(ddp):
    """What megatron-core DDP's backward hook does after adding a parameter's grad to main_grad, when
    it overlaps the gradient reduction: mark the parameter ready in its bucket group, which launches
    the group's async reduction once all of its parameters are in (on the last micro-batch). None
    where there is nothing to do (no DDP, or the reduction runs after the backward)."""
    config = getattr(ddp, "ddp_config", None)
    if config is None or not config.overlap_grad_reduce:
        return None

    def ready(params):
        for p in params:
            group = ddp.param_to_bucket_group.get(p)
            if group is not None:
                group.register_grad_ready(p, ddp.force_all_reduce)
    return ready


def enable(chunks, num_warmup_iters: int = 3, write_first: bool = True) -> list[ChunkGraphs]:
    """Graph the decoder layers of every model chunk (DDP-wrapped or not); capture is lazy. write_first:
    the WRITE chain for micro-batches that find main_grad just zeroed (give False when a step has several
    micro-batches: see the module's docstring)."""
    graphs = []
    for chunk in chunks:
        model = getattr(chunk, "module", chunk)
        model = getattr(model, "module", model)  # Float16Module inside DDP
        layers = list(model.decoder.layers)
        if layers:
            graphs.append(ChunkGraphs(layers, num_warmup_iters, grads_ready=ddp_grads_ready(chunk),
                                      write_first=write_first))
    return graphs
