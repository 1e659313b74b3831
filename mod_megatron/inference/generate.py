"""`mod-generate --checkpoint DIR --prompt "..." [--prompt ...] --max-new-tokens N [sampling options]`

Samples continuations from a trained dense or MoD model with the routed KV cache of
mod_megatron/inference/decode.py. MoD layers decide per token with the causal predictor (default) or
the router's own logit (`--routing causal-router`). Each prompt stops at the end-of-document token
or after N new tokens (or when it reaches model.seq_length). Bad input ends with one `error:` line
and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional

import torch

from mod_megatron.inference.decode import CAUSAL_MODES, CachedDecoder


class InputError(ValueError):
    """Bad user input (prompt, options); the message is one line."""


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           greedy: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of logits [n, V]: argmax, or a draw after temperature / top-k / top-p."""
    if greedy or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def check_prompts(prompts: list[list[int]], max_len: int) -> None:
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i + 1} is empty; give at least one token of text")
        if len(p) > max_len:
            raise InputError(f"prompt {i + 1} has {len(p)} tokens, more than model.seq_length={max_len}; shorten it")


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: Optional[int], max_len: int,
             mode: str = "causal-predictor", seed: int = 0, decoder: Optional[CachedDecoder] = None,
             vocab_size: Optional[int] = None, **sampling) -> tuple[list[list[int]], CachedDecoder]:
    """New tokens for each prompt (EOS included when produced) and the decoder (for routing stats)."""
    check_prompts(prompts, max_len)
    device = next(model.parameters()).device
    decoder = decoder or CachedDecoder(model, mode)
    batch = len(prompts)
    capacity = min(max(len(p) for p in prompts) + max_new_tokens, max_len)
    decoder.start(batch, capacity)
    gen = torch.Generator().manual_seed(seed)
    vocab = vocab_size or model.vocab_size  # the LM head is padded; never sample the padding
    last = torch.stack([decoder.prefill(b, torch.tensor(p, device=device))[-1] for b, p in enumerate(prompts)])
    positions = torch.tensor([len(p) for p in prompts], device=device)
    out: list[list[int]] = [[] for _ in prompts]
    active = torch.arange(batch, device=device)
    logits = last[:, :vocab]
    for _ in range(max_new_tokens):
        tokens = sample(logits, generator=gen, **sampling)
        keep = []
        for j, row in enumerate(active.tolist()):
            tok = int(tokens[j])
            out[row].append(tok)
            finished = tok == eos_id or len(out[row]) >= max_new_tokens or int(positions[j]) + 1 >= max_len
            keep.append(not finished)
        keep = torch.tensor(keep, dtype=torch.bool, device=device)
        if not keep.any():
            break
        active, tokens, positions = active[keep], tokens[keep], positions[keep]
        logits = decoder.step(active, tokens, positions)[:, :vocab]
        positions = positions + 1
    return out, decoder


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mod-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint root (with `latest`) or an iter_* directory")
    p.add_argument("--config", help="YAML whose non-model sections replace the checkpoint's")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus filter")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing", default="causal-predictor", choices=CAUSAL_MODES)
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from mod_megatron.config import ConfigError
    from mod_megatron.training.checkpoint import CheckpointError

    try:
        if args.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be >= 1")
        if not 0.0 < args.top_p <= 1.0 or args.top_k < 0:
            raise InputError("--top-p must be in (0, 1] and --top-k >= 0")
        from mod_megatron.data.tokenizer import SPTokenizer
        from mod_megatron.inference.loading import checkpoint_config, load_model
        from mod_megatron.training.checkpoint import read_meta, resolve_checkpoint

        # Prompts are checked before the model is built: bad input fails fast.
        ckpt_dir = resolve_checkpoint(args.checkpoint)
        cfg = checkpoint_config(ckpt_dir, args.config, overrides)
        tokenizer = SPTokenizer(read_meta(ckpt_dir)["tokenizer_model"])
        prompts = [tokenizer.tokenize(text) for text in args.prompt]
        check_prompts(prompts, cfg.model.seq_length)
        if args.routing == "causal-predictor" and cfg.mod.enabled and not cfg.mod.predictor:
            raise InputError("this checkpoint has no predictor (mod.predictor=false); use --routing causal-router")
        cfg, model, meta, _ = load_model(ckpt_dir, args.config, overrides)
        outs, decoder = generate(model, prompts, args.max_new_tokens, tokenizer.eod, cfg.model.seq_length,
                                 mode=args.routing, seed=args.seed, vocab_size=cfg.model.vocab_size,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 greedy=args.greedy)
    except (InputError, ConfigError, CheckpointError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, ids in zip(args.prompt, outs):
        print(f"=== prompt: {text!r} ({len(ids)} new tokens)")
        print(text + tokenizer.detokenize(ids), flush=True)
    fractions = ", ".join(f"{i + 1}:{f:.2f}" for i, f in enumerate(decoder.fraction_routed()))
    print(f"routing {args.routing} | fraction of tokens computed per layer {fractions}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
