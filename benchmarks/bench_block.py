"""Dense vs MoD transformer block, forward+backward time: `python benchmarks/bench_block.py`.

Builds one megatron-core TransformerLayer (local spec, SDPA attention) and the same layer as a
MoD layer at several capacities, times fwd+bwd on random [S, B, H] inputs and prints a table of
ms per step and speed-up over dense. On a GPU it runs in bf16; on a CPU (fp32) use small sizes,
e.g. `--hidden 256 --seq 512 --batch 2`. Ideal speed-up at capacity c is about 1/c.

`--cuda-graph` also times each layer with its forward and backward captured once in CUDA graphs and
replayed, as `train.cuda_graphs` does in training (shapes are static, and so is k): that removes the
CPU's launch and Python overhead, which bounds small routed blocks. As in training, the parameters
carry megatron-core DDP's fp32 `main_grad` buffers, which the backward graph adds their gradients to;
as in a chain of graphed layers in training, each step reads the graph's own input and output-gradient
buffers in place (until the eleventh session the lone graphed layer copied both in every step). Two
graphed columns: a later micro-batch of a step (the weight-gradient GEMMs add into main_grad) and a
step's first micro-batch (they write it, as at one micro-batch per step: model/wgrad.py), each the best
of 3 rounds taken in turns. Config overrides (`--mod.predictor=false`, `--mod.fused_routing=off`)
apply to every layer built.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch


def _setup():
    from mod_megatron.training.distributed import init_single_process

    init_single_process(seed=0)


def build_layer(hidden: int, heads: int, capacity, dtype, overrides=()):
    from mod_megatron.config import load_config
    from mod_megatron.model.gpt import transformer_config
    from mod_megatron.model.spec import dense_layer_spec, mod_layer_spec
    from megatron.core.transformer.spec_utils import build_module

    args = [f"--model.hidden_size={hidden}", f"--model.num_attention_heads={heads}",
            "--model.num_layers=1", "--mod.first_routed=0", *overrides]
    if capacity is not None:
        args.append(f"--mod.capacity={capacity}")
    cfg = load_config(None, args)
    tcfg = transformer_config(cfg, dtype)
    spec = mod_layer_spec(cfg) if capacity is not None else dense_layer_spec(cfg)
    return build_module(spec, config=tcfg, layer_number=1)


def rotary(seq: int, dim: int, device):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


def output_grad(x):
    """The fixed output gradient every step's backward is fed (as the next layer would hand it back)."""
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)


def make_step(layer, x, rope, grad=None):
    """One fwd+bwd, the backward fed a fixed output gradient (`output_grad(x)` unless given)."""
    grad = output_grad(x) if grad is None else grad

    def step():
        x.grad = None  # the input's gradient is handed on, not accumulated step after step
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        out.backward(grad)
    return step


def time_fn(fn, warmup: int, iters: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def best_time_fn(fn, iters: int, warmup: int, cuda: bool) -> float:
    """Best of 3 rounds of `iters` calls (the first after `warmup` more), ms per call."""
    return min(time_fn(fn, warmup if i == 0 else 0, iters, cuda) for i in range(3))


def graphed_us(fn, iters: int, calls: int = 10) -> float:
    """GPU time per call, us: `calls` calls captured in one CUDA graph, replayed (the host's launch cost,
    which a training step's graphs do not pay, would otherwise dominate short kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return best_time_fn(graph.replay, iters, 5, True) * 1e3 / calls


def time_layer(layer, x, rope, warmup: int, iters: int) -> float:
    return time_fn(make_step(layer, x, rope), warmup, iters, x.is_cuda)


def with_main_grads(layer):
    """Give every parameter an fp32 `main_grad` buffer and the flag megatron-core's DDP gives it in training
    (`grad_added_to_main_grad`, which lets the fused layer's GEMMs add into main_grad: model/wgrad.py)."""
    for p in layer.parameters():
        if p.requires_grad:
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            p.grad_added_to_main_grad = False
    return layer


def graphed_steps(layer, x, rope):
    """(graphs, {"later": step, "first": step}) for the layer graphed as in training (train.cuda_graphs),
    or an error string.

    The first step captures. The returned steps then run on the graph's own input and output-gradient
    buffers, as a layer inside a chain of graphed layers does (each reads the previous one's output
    where it lies, graph_chain.py): no copy in or out per step, which a lone graphed layer fed other
    tensors would make (two passes over [S, B, H] that no layer of a training stack makes).
    "later" is a micro-batch after a step's first: the fused GEMMs add the weight gradients into main_grad.
    "first" is a step's first micro-batch (as every one is at one micro-batch per step): the flags DDP's
    `zero_grad_buffer` resets are reset before it, so those GEMMs write instead (model/wgrad.py); the
    buffer's own zeroing, once per step for the whole model, is not timed.
    """
    from mod_megatron.training.cuda_graphs import ChunkGraphs
    from mod_megatron.model.wgrad import ADD, WRITE

    graphs = ChunkGraphs([with_main_grads(layer)])
    grad = output_grad(x)
    try:  # with_main_grads reset the flags: the first step captures the WRITE chain, the second the ADD one
        for _ in range(2):
            make_step(layer, x, rope, grad)()
    except Exception as e:  # report it (full traceback on stderr), keep the eager numbers
        import traceback

        traceback.print_exc()
        return f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if graphs.graphed is None:
        return "not captured (the layer ran eagerly)"
    params = [p for p in layer.parameters() if p.requires_grad]

    def step_of(variant):
        chain = graphs.chains[variant]  # with model.fused_wgrad=false, one chain for both
        link = chain.links[0]  # the capturing steps copied x and grad into these
        step = make_step(layer, link.static_in, rope, link.grad_out)

        def run():
            if variant == WRITE:
                for p in params:
                    p.grad_added_to_main_grad = False  # what zero_grad_buffer does to the flags
            step()
            assert graphs.chains[graphs.variant] is chain
        return run
    return graphs, {"later": step_of(ADD), "first": step_of(WRITE)}


def time_graphed(layer, x, rope, warmup: int, iters: int, rounds: int = 3) -> dict:
    """{"later": ms, "first": ms} per fwd+bwd with the layer graphed as in training (`graphed_steps`): the
    best of `rounds` rounds of `iters` steps each, the two kinds taking turns (so that neither is timed
    on a card warmer than the other's), or why capture failed."""
    got = graphed_steps(layer, x, rope)
    if isinstance(got, str):
        return got
    graphs, steps = got
    times = {name: float("inf") for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            replays, copies = graphs.replays, graphs.copies
            times[name] = min(times[name], time_fn(step, warmup if r == 0 else 0, iters, True))
            assert graphs.replays >= replays + iters, "the timed steps did not replay the graph"
            assert graphs.copies == copies, "the timed steps copied their input or output gradient"
    return times


def profile(layer, x, rope) -> None:
    """Top operators by device (or CPU) time for a few fwd+bwd steps, to see where time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch_profile(activities=acts) as prof:
        time_layer(layer, x, rope, warmup=0, iters=3)
    key = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60), flush=True)


def _fmt(t, base) -> tuple[str, str]:
    if isinstance(t, str):
        return "-", "-"
    return f"{t:.2f}", f"{base / t:.2f}x" if isinstance(base, float) else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--capacities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each layer graphed as by train.cuda_graphs (GPU only)")
    p.add_argument("--profile", action="store_true",
                   help="also print the top kernels of the dense and the smallest-capacity MoD layer (torch.profiler)")
    args, overrides = p.parse_known_args(argv)
    warnings.filterwarnings("ignore")  # megatron-core's import-time notices; not when imported by tests
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o and "." in o.split("=", 1)[0])]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --mod.predictor=false)")
    _setup()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    graphs = args.cuda_graph and device.type == "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# {card}, {str(dtype).replace('torch.', '')}, S={args.seq}, B={args.batch}, fwd+bwd of one layer"
          + (f", overrides {' '.join(overrides)}" if overrides else ""))
    head = "| d | layer | ms/step | vs dense |" + (" graph ms | vs dense (graph) | graph ms, 1st micro-batch | "
                                                    "vs dense (graph, 1st) |" if graphs else "") + " ideal |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for hidden in args.hidden:
        heads = max(1, hidden // args.head_dim)
        rope = rotary(args.seq, hidden // heads, device)
        x = torch.randn(args.seq, args.batch, hidden, device=device, dtype=dtype, requires_grad=True)
        dense = build_layer(hidden, heads, None, dtype, overrides).to(device=device, dtype=dtype)
        base = {"eager": None, "graph": {}}
        for c in [None, *args.capacities]:
            layer = dense
            if c is not None:
                layer = build_layer(hidden, heads, c, dtype, overrides).to(device=device, dtype=dtype)
                layer.load_state_dict(dense.state_dict(), strict=False)
            t = time_layer(layer, x, rope, args.warmup, args.iters)
            tg = time_graphed(layer, x, rope, args.warmup, args.iters) if graphs else None
            if c is None:
                base = {"eager": t, "graph": tg}
            name = "dense" if c is None else f"MoD c={c:g}"
            row = f"| {hidden} | {name} | {t:.2f} | {base['eager'] / t:.2f}x |"
            if graphs:
                for kind in ("later", "first"):
                    ms, ratio = _fmt(tg if isinstance(tg, str) else tg[kind],
                                     base["graph"].get(kind) if isinstance(base["graph"], dict) else None)
                    row += f" {ms} | {ratio} |"
            print(row + f" {1 if c is None else 1 / c:.2f}x |", flush=True)
            if isinstance(tg, str):
                print(f"#   {name}: {tg}", flush=True)
            if args.profile and c in (None, min(args.capacities)):
                profile(layer, x, rope)
            if c is not None:
                del layer
            x.grad = None
        del dense, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
