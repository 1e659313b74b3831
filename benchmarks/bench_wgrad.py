"""Weight-gradient GEMM into an fp32 main_grad, three ways: `python benchmarks/bench_wgrad.py` (GPU only).

For each weight [out, in] and token count K, us per call (bench_block.graphed_us: CUDA-graphed, best of 3 rounds):
- `bf16 + add`: dY^T X in bf16, then `main_grad.add_(dW)` (autograd's gradient, then DDP's hook);
- `bf16 only`: the GEMM alone (what the graph chain's one multi-tensor add then completes);
- `fp32 acc`: `torch.addmm(main_grad, dY^T, X, out_dtype=float32, out=main_grad)`, what
  `model.fused_wgrad` runs (model/wgrad.py).
The shapes are the 368M (d=1024) and 1.3B (d=2048) layers' four weights, at a routed layer's K=1024
tokens and a dense layer's K=8192.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_block import graphed_us  # noqa: E402  (after the path line)

WEIGHTS = ["3072,1024", "1024,1024", "4096,1024", "1024,4096", "6144,2048", "2048,2048", "8192,2048", "2048,8192"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="+", default=WEIGHTS, help="out,in of each weight")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024, 8192])
    ap.add_argument("--iters", type=int, default=10, help="graph replays per timing round")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_wgrad.py needs a CUDA GPU (addmm with an fp32 out_dtype is CUDA-only)")
    from mod_megatron.model.wgrad import wgrad_into_main_grad

    print(f"# {torch.cuda.get_device_name()}, bf16 GEMM inputs, fp32 main_grad; us per call (CUDA-graphed)")
    print("| out x in | tokens | bf16 + add | bf16 only | fp32 acc | fp32 acc / (bf16 + add) |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for spec in args.weights:
        out, inp = (int(v) for v in spec.split(","))
        for k in args.tokens:
            dy = torch.randn(k, out, device="cuda", dtype=torch.bfloat16, generator=g)
            x = torch.randn(k, inp, device="cuda", dtype=torch.bfloat16, generator=g)
            main_grad = torch.zeros(out, inp, device="cuda")
            sep = graphed_us(lambda: main_grad.add_(dy.t().mm(x)), args.iters)
            mm = graphed_us(lambda: dy.t().mm(x), args.iters)
            acc = graphed_us(lambda: wgrad_into_main_grad(main_grad, dy, x), args.iters)
            print(f"| {out}x{inp} | {k} | {sep:.1f} | {mm:.1f} | {acc:.1f} | {acc / sep:.2f} |", flush=True)


if __name__ == "__main__":
    main()
