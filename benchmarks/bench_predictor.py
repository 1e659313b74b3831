"""The MoD predictor, F.linear (compiled) vs the Triton kernels: `python benchmarks/bench_predictor.py`.

Every routed layer runs its predictor MLP (H -> H/8 -> 1, model/predictor.py) on all S*B tokens, forward
and weight gradients, whatever the capacity. This times one forward+backward of it (logits, a BCE loss,
the weight gradients) at the shapes of the block and model benchmarks, both ways inside one compiled
function, each captured in a CUDA graph and replayed (bench_block.graphed_us), and prints us per call.
`--sweep` also times the forward kernel alone (with the router score, as the routed layer runs it) at its
launch shapes (kernels/predictor_triton.py FWD), at the first two shapes. GPU only.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def step_fn(tokens: int, hidden: int, fused: bool, compiled: bool = True):
    import torch

    from mod_megatron.model.predictor import Predictor, predictor_logits

    torch.manual_seed(0)
    pred = Predictor(hidden).to("cuda", torch.bfloat16)
    x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16)
    target = (torch.rand(tokens, 1, device="cuda") < 0.125).float()

    def loss_of(x, w1, b1, w2, b2):
        logits = predictor_logits(x, w1, b1, w2, b2, fused=fused)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")

    fn = torch.compile(loss_of) if compiled else loss_of

    def step():
        for p in pred.parameters():
            p.grad = None
        fn(x, *pred.weights()).backward()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["8192x1024", "8192x2048", "32768x1024", "8192x4096"],
                   help="TOKENSxHIDDEN")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also time the forward kernel at its launch shapes")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: bench_predictor.py needs a CUDA GPU (the predictor kernel is Triton on CUDA)")
    warnings.filterwarnings("ignore")
    import bench_block as bb
    from mod_megatron.kernels import predictor_triton as K

    print(f"# {torch.cuda.get_device_name()}, bf16, predictor H -> H/8 -> 1, fwd+bwd with a BCE loss, graphed")
    print("| tokens | H | F.linear, compiled us | kernels us | speed-up |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        t, h = (int(v) for v in shape.split("x"))
        ref = bb.graphed_us(step_fn(t, h, fused=False), args.iters)
        got = bb.graphed_us(step_fn(t, h, fused=True), args.iters)
        print(f"| {t} | {h} | {ref:.1f} | {got:.1f} | {ref / got:.2f}x |", flush=True)
    if args.sweep:
        default = dict(K.FWD)
        print("\n| tokens | H | BT | BN | BK | warps | forward kernel us (with the router score) |")
        print("|---|---|---|---|---|---|---|")
        for shape in args.shapes[:2]:
            t, h = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            w1, wr = torch.randn(h // 8, h, device="cuda", dtype=torch.bfloat16), torch.randn_like(x[0])
            b1, w2 = torch.randn_like(w1[:, 0]), torch.randn_like(w1[:, 0])
            for bt, bn, bk, warps in itertools.product((32, 64, 128), (64, 128), (64, 128), (4, 8)):
                K.FWD.update(BT=bt, BN=bn, BK=bk, num_warps=warps)
                try:
                    us = f"{bb.graphed_us(lambda: K.predictor_fwd(x, w1, b1, w2, wr), args.iters):.1f}"
                except Exception as e:  # e.g. out of shared memory for this shape
                    us = f"failed ({type(e).__name__})"
                print(f"| {t} | {h} | {bt} | {bn} | {bk} | {warps} | {us} |", flush=True)
        K.FWD.update(default)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
