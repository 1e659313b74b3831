"""Attention backends at the models' shapes: `python benchmarks/bench_attention.py`.

Times torch's scaled_dot_product_attention (causal) forward and forward+backward with each SDPA
backend forced in turn, on random bf16 inputs (fp32 on a CPU), and prints a table of ms and TFLOP/s.
FLOPs count the causal half: 2 matmuls x 2 FLOPs x B x heads x S^2 x head_dim / 2 forward, and 3.5x
that for forward + backward. The default shapes are the 368M (head dim 64) and 1.3B (head dim 128)
configs' attention at micro-batch 16 / 8. A backend that cannot run a shape prints its reason.

    python benchmarks/bench_attention.py --shapes 16,16,2048,64 8,16,2048,128
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_block import best_time_fn  # noqa: E402  (after the path line)

BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def measure(shape, backend: str, device: str, iters: int = 20, warmup: int = 5) -> dict:
    """{backend, shape, fwd_ms, step_ms, fwd_tflops, step_tflops} or {..., error}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen)
    row = {"backend": backend, "shape": list(shape)}

    def fwd():
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def step():
        q.grad = k.grad = v.grad = None
        fwd().backward(grad)

    try:
        row["fwd_ms"] = best_time_fn(fwd, iters, warmup, device == "cuda")
        row["step_ms"] = best_time_fn(step, iters, warmup, device == "cuda")
    except RuntimeError as e:
        row["error"] = (str(e).strip().splitlines() or [""])[0][:80]
        return row
    flops = 4 * b * h * s * s * d / 2
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    row["step_tflops"] = 3.5 * flops / row["step_ms"] / 1e9
    return row


def table(rows: list) -> str:
    lines = ["| shape [B, heads, S, head dim] | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['backend']} | - | - | - | {r['error']} |")
        else:
            lines.append(f"| {r['shape']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
                         f"{r['step_ms']:.3f} | {r['step_tflops']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["16,16,2048,64", "8,16,2048,128"], help="B,heads,S,head_dim")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS[:3]), choices=BACKENDS)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [measure(tuple(int(x) for x in shape.split(",")), backend, device, a.iters, a.warmup)
            for shape in a.shapes for backend in a.backends]
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (fp32)"
    print(f"# {card}, causal SDPA\n" + table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
