"""Is a graphed layer bound by the GPU or by the host? `python benchmarks/block_kernels.py`.

For each layer variant (dense, MoD at a capacity, MoD without aux loss and predictor), builds the
layer as bench_block.py does, graphs it as `train.cuda_graphs` does (ChunkGraphs; the parameters
carry DDP's `main_grad` buffers), times `--iters` fwd+bwd steps, then traces `--steps` more with
the CUDA profiler (kernels and copies only) and prints

    ## <variant>: wall W us/step, K kernels/step, kernel sum G us, traced span T us

and the top kernels by time per step. G is the GPU's own work; W > G means the GPU waited for the
host (Python, autograd, launches) for W - G per step: the ratio of two layers' G is what faster host
code could reach, the ratio of their W is what a step costs now. GPU only (`--smoke` runs the
summary on a synthetic trace).

    python benchmarks/block_kernels.py --hidden 1024 --seq 4096 --batch 2 --variants dense 0.125 0.125-plain
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PLAIN = ["--mod.predictor=false", "--mod.aux_loss_weight=0"]  # MoD with no causal-routing aids


def summarise(kernels: list, steps: int, top: int = 40) -> dict:
    """kernels: (name, start us, end us) over `steps` steps -> per step: count, sum, span, top by time."""
    if not kernels:
        raise ValueError("no GPU kernels in the trace")
    kernels = sorted(kernels, key=lambda k: k[1])
    per_name: dict = {}
    for name, start, end in kernels:
        entry = per_name.setdefault(name[:70], [0, 0.0])
        entry[0] += 1
        entry[1] += end - start
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels": len(kernels) / steps,
            "sum_us": sum(end - start for _, start, end in kernels) / steps,
            "span_us": (max(end for _, _, end in kernels) - kernels[0][1]) / steps,
            "top": [(name, count / steps, total / steps) for name, (count, total) in ranked]}


def report(variant: str, wall_us: float, s: dict) -> str:
    lines = [f"## {variant}: wall {wall_us:.1f} us/step, {s['kernels']:.0f} kernels/step, "
             f"kernel sum {s['sum_us']:.1f} us, traced span {s['span_us']:.1f} us"]
    lines += [f"  {total:8.1f} us  x{count:<3.0f} {name}" for name, count, total in s["top"]]
    return "\n".join(lines)


def trace(variant: str, hidden: int, seq: int, batch: int, head_dim: int, iters: int, steps: int, top: int,
          first: bool = False) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_block as bb

    device, dtype = torch.device("cuda"), torch.bfloat16
    heads = max(1, hidden // head_dim)
    rope = bb.rotary(seq, hidden // heads, device)
    x = torch.randn(seq, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    capacity, _, plain = variant.partition("-")
    layer = bb.build_layer(hidden, heads, None if capacity == "dense" else float(capacity), dtype,
                           PLAIN if plain else ()).to(device=device, dtype=dtype)
    got = bb.graphed_steps(layer, x, rope)
    assert not isinstance(got, str), got
    step = got[1]["first" if first else "later"]
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return report(variant, wall, summarise(kernels, steps, top))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--variants", nargs="+", default=["dense", "0.125", "0.125-plain"],
                   help="dense, a capacity (MoD), or a capacity with -plain (no aux loss, no predictor)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--first", action="store_true",
                   help="time a step's first micro-batch (weight gradients written into main_grad, not added)")
    p.add_argument("--smoke", action="store_true", help="summarise a synthetic trace (no GPU needed)")
    args = p.parse_args(argv)
    if args.smoke:
        fake = [("gemm", 0.0, 10.0), ("norm", 12.0, 14.0), ("gemm", 20.0, 30.0), ("norm", 32.0, 34.0)]
        print(report("smoke", 40.0, summarise(fake, steps=2)))
        return 0
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (CUDA graphs); --smoke runs the summary alone")
    warnings.filterwarnings("ignore")
    import bench_block as bb

    bb._setup()
    print(f"# {torch.cuda.get_device_name()}, bf16, d={args.hidden}, S={args.seq}, B={args.batch}, graphed fwd+bwd")
    for variant in args.variants:
        print(trace(variant, args.hidden, args.seq, args.batch, args.head_dim, args.iters, args.steps, args.top,
                    args.first),
              flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
