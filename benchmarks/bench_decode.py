"""Decode speed, MoD vs its dense twin, with the routed KV cache: `python benchmarks/bench_decode.py`.

Builds a GPT with random weights (default ~125M: 12 layers, d=768, every other layer routed) and the
same model with MoD off, prefills `--batch` random prompts and decodes `--new-tokens` tokens greedily
with mod_megatron.inference.decode.CachedDecoder; prints a table of decode tokens/s and the ratio.

Random weights do not route like a trained model, so by default (`--routing forced`) each MoD layer
routes a random `--routed-fraction` of the tokens (default: the capacity), as a trained predictor
would on average; `--routing causal-router|causal-predictor` uses the random router/predictor instead.
On a GPU it runs in bf16; on a CPU use tiny sizes, e.g. `--layers 4 --hidden 64 --heads 4 --vocab 256`.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def _setup(seed: int = 0) -> torch.device:
    from mod_megatron.training.distributed import init_single_process

    return init_single_process(seed)


def build(args, mod_enabled: bool, device, dtype):
    from mod_megatron.config import load_config
    from mod_megatron.model.gpt import build_model, transformer_config

    cfg = load_config(None, [
        f"--model.num_layers={args.layers}", f"--model.hidden_size={args.hidden}",
        f"--model.num_attention_heads={args.heads}", f"--model.vocab_size={args.vocab}",
        f"--model.seq_length={args.prompt_len + args.new_tokens}", f"--mod.enabled={mod_enabled}",
        f"--mod.capacity={args.capacity}", f"--mod.every={args.every}"])
    model = build_model(cfg, transformer_config(cfg, dtype)).to(device)
    if dtype == torch.bfloat16:
        model.bfloat16()
    return model.eval()


def forced_decider(fraction: float, device, seed: int = 0):
    """decide(layer, x, logits): route each token independently with probability `fraction`."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def decide(layer, x, logits):
        return torch.rand(logits.shape, generator=gen, device=logits.device) < fraction

    return decide


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_decode(model, args, device, mode: str, decide=None) -> dict:
    """Prefill `batch` random prompts, greedily decode `new_tokens`; seconds for each phase."""
    from mod_megatron.inference.decode import CachedDecoder

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    dec = CachedDecoder(model, mode, decide=decide)
    dec.start(args.batch, args.prompt_len + args.new_tokens)
    sync(device)
    t0 = time.perf_counter()
    last = torch.stack([dec.prefill(b, prompts[b])[-1] for b in range(args.batch)])
    sync(device)
    t1 = time.perf_counter()
    rows = torch.arange(args.batch, device=device)
    positions = torch.full((args.batch,), args.prompt_len, device=device)
    tokens = last.argmax(-1)
    prefill_seen = dec.seen
    prefill_routed = list(dec.routed)
    for _ in range(args.new_tokens - 1):
        tokens = dec.step(rows, tokens, positions).argmax(-1)
        positions = positions + 1
    sync(device)
    t2 = time.perf_counter()
    decoded = dec.seen - prefill_seen
    routed = [(r - p) / max(decoded, 1) for r, p in zip(dec.routed, prefill_routed)]
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens": decoded,
            "kv_entries": sum(int(c.lengths.sum()) for c in dec.caches), "routed": routed}


def best_of(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r["decode_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--routing", default="forced", choices=["forced", "causal-router", "causal-predictor"])
    p.add_argument("--routed-fraction", type=float, default=None, help="forced routing: default = capacity")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the best is kept")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_len < 1:
        p.error("--new-tokens must be >= 2 and --prompt-len >= 1")

    device = _setup()
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") \
        else torch.float32
    fraction = args.capacity if args.routed_fraction is None else args.routed_fraction
    rows = []
    for name, enabled in (("dense", False), ("MoD", True)):
        model = build(args, enabled, device, dtype)
        mode = "causal-router" if args.routing == "forced" else args.routing

        def once(model=model):
            decide = forced_decider(fraction, device) if args.routing == "forced" and enabled else None
            return run_decode(model, args, device, mode, decide)

        once()  # warm-up
        res = best_of(once, args.repeats)
        res["name"] = name
        rows.append(res)
        del model
    dense_tps = rows[0]["decode_tokens"] / rows[0]["decode_s"]
    print(f"device {device.type} | {dtype} | {args.layers} layers d={args.hidden} | batch {args.batch} | "
          f"prompt {args.prompt_len} + {args.new_tokens} new | MoD capacity {args.capacity} every {args.every} "
          f"| routing {args.routing}" + (f" (fraction {fraction})" if args.routing == "forced" else ""))
    print("| model | decode tok/s | vs dense | prefill ms | KV entries | mean fraction computed per layer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        tps = r["decode_tokens"] / r["decode_s"]
        mean_routed = sum(r["routed"]) / len(r["routed"])
        print(f"| {r['name']} | {tps:,.1f} | {tps / dense_tps:.2f}x | {r['prefill_s'] * 1e3:.1f} | "
              f"{r['kv_entries']:,} | {mean_routed:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
