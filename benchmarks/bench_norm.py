"""The pre-LN norm's backward with the residual's gradient: `python benchmarks/bench_norm.py` (a CUDA GPU).

At the models' shapes (rows = S x micro-batch, width d), times the backward that gives the norm's input
its gradient dres + norm'(x)^T dy, with dw and db, two ways:

- inductor: torch.compile of autograd's x -> (x, layer_norm(x)), i.e. the compiler's own backward;
- kernel: kernels/norm_triton.py's one-pass kernel (what the fused layer runs), at its default launch
  configuration and, with --sweep, at others (rows per tile, programs, warps);

and prints us per call (GPU time: calls replayed from a CUDA graph), the bytes it must move (read x, dy, dres; write dx) over the time as GB/s,
and the floor: those bytes at the bandwidth of a large device copy measured in the same run.

    python benchmarks/bench_norm.py --shapes 32768,1024 16384,2048 4096,1024 --sweep
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_block import graphed_us  # noqa: E402  (after the path line)


def copy_bandwidth(iters: int) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    a = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / (graphed_us(lambda: b.copy_(a), iters, calls=2) * 1e-6)


def inductor_calls(x, dres, dy, w, b, rms: bool):
    """(forward, forward + backward) of the compiled x -> (x, norm(x)), for output gradients (dres, dy):
    the backward's time is their difference (a captured backward must follow a captured forward)."""
    def norm(x, w, b):
        out = F.rms_norm(x, (x.shape[-1],), w, 1e-5) if rms else F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
        return x.view_as(x), out

    leaves = [t.detach().requires_grad_() for t in (x, w) + (() if rms else (b,))]
    compiled = torch.compile(norm)
    inputs = (leaves[0], leaves[1], None if rms else leaves[2])
    return lambda: compiled(*inputs), lambda: torch.autograd.grad(compiled(*inputs), leaves, (dres, dy))


def kernel_backward(x, dres, dy, w, rms: bool, config):
    from mod_megatron.kernels import norm_triton as K
    from mod_megatron.model.fused_norm import _rms_stats

    if rms:
        rstd, mean = _rms_stats(x, 1e-5), None
    else:
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, (x.shape[-1],), w, None, 1e-5)
    mean = rstd if mean is None else mean
    return lambda: K.launch(dy, x, dres, w, mean, rstd, rms, *config)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["32768,1024", "16384,2048", "4096,1024"],
                    help="rows,width: the 368M and 1.3B dense layers, the 368M routed layer")
    ap.add_argument("--norm", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    ap.add_argument("--sweep", action="store_true", help="also time other launch configurations")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_norm.py needs a CUDA GPU (the kernel is Triton)")
    import triton

    from mod_megatron.kernels.norm_triton import launch_config

    rms = args.norm == "RMSNorm"
    bw = copy_bandwidth(args.iters)
    print(f"# {torch.cuda.get_device_name()}, bf16, {args.norm}; device copy {bw / 1e9:,.0f} GB/s")
    print("| rows | width | backward | tile, programs, warps | us | GB/s | floor us |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.shapes:
        m, n = (int(v) for v in spec.split(","))
        g = torch.Generator(device="cuda").manual_seed(0)
        x, dres, dy = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        w, b = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5, torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        moved = 4 * m * n * 2
        floor = moved / bw * 1e6
        forward, both = inductor_calls(x, dres, dy, w, b, rms)
        runs = [("inductor", "-", (both, forward))]
        configs = [launch_config(m, n)]
        if args.sweep:
            configs += [(t, p, wp) for t in (1, 2, 4, 8) for p in (512, 1024, 2048) for wp in (4, 8)
                        if (t, p, wp) != configs[0] and t * triton.next_power_of_2(n) <= 16384]
        runs += [("kernel" + (" (default)" if i == 0 else ""), ", ".join(map(str, c)), (kernel_backward(x, dres, dy, w, rms, c), None))
                 for i, c in enumerate(configs)]
        for name, config, (fn, minus) in runs:
            us = graphed_us(fn, args.iters) - (graphed_us(minus, args.iters) if minus else 0.0)
            print(f"| {m} | {n} | {name} | {config} | {us:.1f} | {moved / us / 1e3:,.0f} | {floor:.1f} |", flush=True)


if __name__ == "__main__":
    main()
