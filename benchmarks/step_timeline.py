"""Where a training step's GPU time goes, and when the GPU waits: `python benchmarks/step_timeline.py`.

For each config, the real Trainer (as in bench_model.py: random tokens, bf16, CUDA graphs unless
overridden) runs `--warmup` steps, times `--iters` steps, then records `--steps` more with the CUDA
profiler (kernels and copies only, to keep its own host overhead low). From the trace it prints

    | config | ms/step | span ms | GPU busy ms | idle ms | gemm | attention | compiled | optimizer | other |

per step: busy is the union of kernel intervals, idle = span - busy (the GPU had nothing queued:
the host was behind, e.g. after a `.item()`), the categories sum kernel durations (kernels on two
streams may overlap, so they can add up to more than busy). Below the table, each config's idle time
by gap size (many short gaps: launch latency between kernels or graphs; a few long ones: host work
the GPU waited for), and its largest idle gaps with the kernels on either side. The profiler adds host work
per launch, so idle time under it is an upper bound; compare configs or commits within one run.
GPU only (`--smoke` runs the analysis on a synthetic trace).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import REPO, RESULT, random_token_trainer, run_worker  # noqa: E402

CATEGORIES = ("gemm", "attention", "compiled", "optimizer", "other")
GAP_SIZES = ((0.0, 10.0, "<10us"), (10.0, 50.0, "10-50us"), (50.0, 200.0, "50-200us"), (200.0, float("inf"), ">=200us"))


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("nvjet", "gemm", "cutlass", "splitk", "cublas")):
        return "gemm"
    if any(s in n for s in ("sdpa", "flash", "fmha", "cudnn")):
        return "attention"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if n.startswith("triton"):
        return "compiled"
    return "other"


def analyse(events: list, steps: int, top_gaps: int = 8) -> dict:
    """events: (name, start us, duration us) of kernels/copies; per-step busy, idle, categories, gaps."""
    events = sorted(events, key=lambda e: e[1])
    if not events:
        raise ValueError("no GPU kernels in the trace (is this a CUDA run?)")
    span = max(s + d for _, s, d in events) - events[0][1]
    busy, end, last, gaps = 0.0, float("-inf"), None, []
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    for name, start, dur in events:
        per_cat[category(name)] += dur
        if start > end:
            if last is not None:
                gaps.append((start - end, last, name))
            busy += dur
        elif start + dur > end:
            busy += start + dur - end
        if start + dur > end:
            end, last = start + dur, name
    gaps.sort(key=lambda g: -g[0])
    by_size = {label: [sum(lo <= g[0] < hi for g in gaps) / steps, sum(g[0] for g in gaps if lo <= g[0] < hi) / steps / 1e3]
               for lo, hi, label in GAP_SIZES}  # per step: how many gaps of that size, and their idle ms
    pairs: dict = {}  # (kernel before the gap, kernel after it) -> [gaps, idle us], for gaps that recur
    for g, a, b in gaps:
        entry = pairs.setdefault((a[:60], b[:60]), [0, 0.0])
        entry[0] += 1
        entry[1] += g
    recurring = sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top_gaps]
    return {"span_ms": span / steps / 1e3, "busy_ms": busy / steps / 1e3, "idle_ms": (span - busy) / steps / 1e3,
            "categories_ms": {k: v / steps / 1e3 for k, v in per_cat.items()}, "idle_by_gap_size": by_size,
            "idle_by_neighbours": [{"gaps": n / steps, "ms": us / steps / 1e3, "after": a, "before": b}
                                   for (a, b), (n, us) in recurring],
            "gaps": [{"us": round(g, 1), "after": a[:90], "before": b[:90]} for g, a, b in gaps[:top_gaps]]}


def measure(config: str, overrides: list, warmup: int, iters: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with random_token_trainer(config, ["--train.cuda_graphs=true", *overrides], warmup + iters + steps) as (
            _, trainer, batches), tempfile.TemporaryDirectory() as tmp:
        for _ in range(warmup):
            trainer.train_step(batches)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            trainer.train_step(batches)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / iters * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                trainer.train_step(batches)
            torch.cuda.synchronize()
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            raw = json.load(f)["traceEvents"]
    events = [(e["name"], float(e["ts"]), float(e["dur"])) for e in raw
              if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    return {"config": config, "card": torch.cuda.get_device_name(), "ms_per_step": ms, **analyse(events, steps)}


def format_report(results: list) -> str:
    rows = ["| config | ms/step | span ms | GPU busy ms | idle ms | " + " | ".join(CATEGORIES) + " |",
            "|---" * (5 + len(CATEGORIES)) + "|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | failed: {r['error']} |" + " |" * (3 + len(CATEGORIES)))
            continue
        cats = " | ".join(f"{r['categories_ms'][c]:.2f}" for c in CATEGORIES)
        rows.append(f"| {r['config']} | {r['ms_per_step']:.2f} | {r['span_ms']:.2f} | {r['busy_ms']:.2f} | "
                    f"{r['idle_ms']:.2f} | {cats} |")
    for r in results:
        if "idle_by_gap_size" in r:
            rows.append(f"# {r['config']}: idle per step by gap size: " + ", ".join(
                f"{label} {n:.0f} gaps {ms:.2f} ms" for label, (n, ms) in r["idle_by_gap_size"].items()))
        for p in r.get("idle_by_neighbours", []):
            rows.append(f"# {r['config']}: {p['ms']:.3f} ms/step idle in {p['gaps']:.1f} gaps/step after {p['after']} "
                        f"| before {p['before']}")
        for g in r.get("gaps", []):
            rows.append(f"# {r['config']}: idle {g['us']:.0f} us after {g['after']} | before {g['before']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["gpt-368m-dense", "gpt-368m-mod"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=5, help="timed steps (without the profiler)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--timeout", type=int, default=600, help="seconds per config")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="analyse a synthetic trace (no GPU needed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    if args.worker:
        sys.path.insert(0, REPO)
        print(RESULT + json.dumps(measure(args.worker, overrides, args.warmup, args.iters, args.steps)), flush=True)
        return 0
    if args.smoke:
        events = [("nvjet_gemm", 0, 10), ("triton_poi_fused_gelu", 12, 3), ("Memcpy DtoH", 15, 1), ("multi_tensor_apply", 30, 5)]
        print(format_report([{"config": "synthetic", "ms_per_step": 0.035, **analyse(events, 1)}]))
        return 0
    results = []
    for config in args.configs:
        results.append(run_worker(os.path.abspath(__file__), config, [
            f"--warmup={args.warmup}", f"--iters={args.iters}", f"--steps={args.steps}", *overrides], args.timeout))
        print(f"# {config}: done", flush=True)
    card = next((r["card"] for r in results if "card" in r), "?")
    print(f"# {card}; per step, averaged over {args.steps} profiled steps")
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
