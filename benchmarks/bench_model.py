"""Training throughput of whole GPTs, dense vs MoD vs MoDE: `python benchmarks/bench_model.py`.

Each config runs `--warmup` + `--iters` training steps through the real Trainer (megatron-core
schedule, DDP wrapper, optimizer; bf16 on a GPU) in a subprocess of its own (fresh memory and peak
counter), on random tokens: throughput does not depend on the data, and no corpus is needed. Printed:

    | config | tokens/s | model TFLOP/s | MFU | peak memory GiB | vs dense |

- tokens/s: the timed steps only (after the warm-up), CUDA synchronised at both ends;
- model TFLOP/s: tokens/s x training FLOPs per token from mod_megatron/training/flops.py (matmuls only,
  routed layers at their k tokens, active experts only; docs/benchmarks.md has the formula);
- MFU: model FLOP/s over the card's dense bf16 peak (H100 SXM: 989 TFLOP/s; flops.PEAK_BF16);
- peak memory: torch.cuda.max_memory_allocated over the whole run;
- vs dense: tokens/s over the dense twin's (the same shape without routing or experts).

Config overrides (`--train.micro_batch_size=8`, `--mod.fused_routing=off`) apply to every config.
`--tokens-per-step N` sets each config's global batch to N tokens (N / seq_length sequences, in
micro-batches of the config's size: gradient accumulation), as papers quote batch sizes (GPT-3 trained
its 125M-760M models on 0.5M-token batches); the configs' own global batch is one micro-batch per step.
`--smoke` runs tiny versions of three configs on the CPU in well under a minute (a CI check).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWINS = {  # config -> its dense twin
    "gpt-125m-dense": "gpt-125m-dense",
    "gpt-125m-mod": "gpt-125m-dense",
    "mode-staged-125m": "gpt-125m-dense",
    "mode-integrated-125m": "gpt-125m-dense",
    "gpt-368m-dense": "gpt-368m-dense",
    "gpt-368m-mod": "gpt-368m-dense",
    "gpt-1.3b-dense": "gpt-1.3b-dense",
    "gpt-1.3b-mod": "gpt-1.3b-dense",
}
SMOKE_CONFIGS = ["gpt-125m-dense", "gpt-125m-mod", "mode-staged-125m"]
SMOKE = ["--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
         "--model.seq_length=64", "--model.vocab_size=512", "--train.micro_batch_size=4",
         "--train.global_batch_size=4", "--moe.ffn_hidden_size=64", "--train.device=cpu"]
RESULT = "RESULT "  # the worker's one line of JSON on stdout


class RandomTokens:
    """A dataset of uniform random token sequences in the shape the Trainer's batches take."""

    def __init__(self, seq_length: int, vocab_size: int, seed: int):
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, i: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        tokens = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


@contextlib.contextmanager
def random_token_trainer(config: str, overrides: list, iters: int):
    """(cfg, trainer, its micro-batch iterator): the real Trainer for configs/`config`.yaml on random
    tokens, in a temporary run directory (no evaluation, checkpoints or TensorBoard); shut down after."""
    from mod_megatron.config import load_config
    from mod_megatron.training.distributed import initialize, shutdown
    from mod_megatron.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(os.path.join(REPO, "configs", f"{config}.yaml"), [
            *overrides, f"--train.iters={iters}", "--train.eval_iters=0", "--checkpoint.load=false",
            f"--checkpoint.dir={tmp}/checkpoints", f"--logging.dir={tmp}", "--logging.tensorboard=false",
            "--logging.progress_bar=false"])
        layout = initialize(cfg)
        data = RandomTokens(cfg.model.seq_length, cfg.model.vocab_size, cfg.train.seed)
        trainer = Trainer(cfg, layout, data, None, None)
        try:
            yield cfg, trainer, trainer._iterators("train", 0)
        finally:
            shutdown()


def measure(config: str, overrides: list, warmup: int, iters: int, profile: str = None) -> dict:
    """Build the Trainer for `config`, run warmup + iters steps, return the numbers of the timed ones."""
    import torch

    from mod_megatron.training.flops import peak_flops, train_flops_per_token

    with random_token_trainer(config, overrides, warmup + iters) as (cfg, trainer, batches):
        cuda = trainer.device.type == "cuda"
        losses = []
        for _ in range(warmup):
            losses.append(trainer.train_step(batches)["loss"])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = trainer.train_step(batches)
            losses.append(out["loss"])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if profile:
            write_profile(trainer, batches, os.path.join(profile, f"{config}.txt"), cuda)
    tokens_per_s = iters * cfg.train.global_batch_size * cfg.model.seq_length / seconds
    flops_per_token = train_flops_per_token(cfg)
    card = torch.cuda.get_device_name() if cuda else "CPU"
    peak = peak_flops(card) if cuda else None
    result = {"config": config, "card": card, "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
              "tflops": tokens_per_s * flops_per_token / 1e12, "mfu": tokens_per_s * flops_per_token / peak if peak else None,
              "peak_flops": peak, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "loss": out["loss"], "losses": losses, "ms_per_step": seconds / iters * 1e3,
              "cuda_graph_layers": sum(len(g.layers) for g in trainer.graphs if g.graphed),
              "cuda_graph_replays": sum(g.replays for g in trainer.graphs),
              "cuda_graph_writes": sum(g.writes for g in trainer.graphs),
              "package": os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["mod_megatron"].__file__)))}
    return result


def write_profile(trainer, batches, path: str, cuda: bool, steps: int = 2) -> None:
    """Top kernels (by device time on a GPU) of a few more training steps, as a text table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            trainer.train_step(batches)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {steps} training steps\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
        f.write("\n# the same operators by input shapes\n")
        f.write(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=30, max_name_column_width=40,
                                                                   max_shapes_column_width=60))


def batch_override(config: str, tokens: int, overrides: list) -> str:
    """The --train.global_batch_size override giving `config` (with `overrides`) `tokens` tokens per step."""
    from mod_megatron.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", f"{config}.yaml"), overrides)
    micro, seq = cfg.train.micro_batch_size, cfg.model.seq_length
    if tokens % (micro * seq):
        raise SystemExit(f"error: --tokens-per-step={tokens} is not a whole number of {config}'s micro-batches "
                         f"({micro} x {seq} tokens); use a multiple of {micro * seq}")
    return f"--train.global_batch_size={tokens // seq}"


def run_config(config: str, args, overrides: list) -> dict:
    """measure() in a subprocess of its own; a failure (OOM, bad config) becomes {"error": ...}."""
    if args.tokens_per_step:
        overrides = [*overrides, batch_override(config, args.tokens_per_step, overrides)]
    return run_worker(os.path.abspath(__file__), config, [
        f"--warmup={args.warmup}", f"--iters={args.iters}", *([f"--profile={args.profile}"] if args.profile else []),
        *(SMOKE if args.smoke else []), *overrides], args.timeout)


def run_worker(script: str, config: str, args: list, timeout: int, tree: str = REPO) -> dict:
    """`script --worker config *args` in a subprocess (fresh memory and peak counter), run in source
    tree `tree` (its package first on the path); its `RESULT {...}` line as a dict, or
    {"config", "error"} on a failure (OOM, bad config, timeout)."""
    cmd = [sys.executable, script, "--worker", config, *args]
    path = os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()
    errors = [ln for ln in lines if "Error" in ln and "Warning" not in ln]  # not NCCL's exit warnings
    return {"config": config, "error": (errors or lines)[-1][:200]}


def _f(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(results: list) -> str:
    by_name = {r["config"]: r for r in results}
    rows = ["| config | tokens/s | model TFLOP/s | MFU | peak memory GiB | vs dense |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | failed: {r['error']} | | | | |")
            continue
        twin = by_name.get(TWINS.get(r["config"], ""), {})
        ratio = r["tokens_per_s"] / twin["tokens_per_s"] if twin.get("tokens_per_s") else None
        rows.append(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3g} | {_f(r['mfu'], '{:.1%}')} | "
                    f"{_f(r['peak_mem_gib'], '{:.1f}')} | {_f(ratio, '{:.2f}x')} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(TWINS),
                   help=f"configs/NAME.yaml to run (default: all but the 1.3b pair; --smoke: {' '.join(SMOKE_CONFIGS)})")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, optimizer state)")
    p.add_argument("--iters", type=int, default=15, help="timed steps")
    p.add_argument("--timeout", type=int, default=600, help="seconds per config")
    p.add_argument("--smoke", action="store_true", help="tiny versions of three configs on the CPU")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--tokens-per-step", type=int, help="global batch in tokens (gradient accumulation); "
                   "default: each config's own global batch")
    p.add_argument("--profile", metavar="DIR", help="also profile 2 more steps per config: DIR/CONFIG.txt (top kernels)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one config, print RESULT {...}
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o and "." in o.split("=", 1)[0])]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --train.micro_batch_size=8)")
    if args.worker:
        sys.path.insert(0, REPO)
        print(RESULT + json.dumps(measure(args.worker, overrides, args.warmup, args.iters, args.profile)), flush=True)
        return 0
    configs = args.configs or (SMOKE_CONFIGS if args.smoke else [c for c in TWINS if "1.3b" not in c])
    results = []
    for config in configs:
        results.append(run_config(config, args, overrides))
        r = results[-1]
        print(f"# {config}: " + (f"failed: {r['error']}" if "error" in r else
                                 f"{r['tokens_per_s']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step, loss {r['loss']:.3f}"),
              flush=True)
    card = next((r["card"] for r in results if "card" in r), "?")
    peak = next((r["peak_flops"] for r in results if r.get("peak_flops")), None)
    print(f"\n# {card}" + (f", MFU of {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "")
          + f"; {args.warmup} warm-up + {args.iters} timed steps per config"
          + (f"; {args.tokens_per_step:,} tokens per step" if args.tokens_per_step else "")
          + (f"; overrides {' '.join(overrides)}" if overrides else ""))
    print(format_table(results), flush=True)
    return save_results(results, args.json)


def save_results(results: list, path) -> int:
    """Write every run's result to `path` as JSON (if given); the exit status: 1 if a run failed."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
