"""Helpers of tests/convert: small real checkpoints on synthetic data, and logits/loss at any layout.

`make_checkpoint(root, *overrides, world_size=2, tp=2)` trains a tiny model for a few steps with the
real Trainer in forked gloo ranks (no torchrun) and returns its checkpoint root: a real checkpoint
(optimizer, scheduler, RNG states, mod_meta.json with config, consumed samples, tokenizer hash,
layout). The data is a fixed first-order Markov chain over the vocabulary (each token has a few likely
successors), so a few dozen steps teach the model something and conversions can be judged by loss.
`outputs_at(ckpt, world_size, tp=..., pp=...)` loads a checkpoint at a layout (tests/distributed/spawn
.run_layout) and returns the full-vocabulary logits (or per-token losses) of a held-out batch.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mod_megatron.convert.ranks import run_ranks
from tests.distributed.spawn import layout_overrides, run_layout

# 4 layers, hidden 64, 4 heads, seq 32, vocab 128 (padded to 128 at TP 1, 2 and 4), fp32.
MODEL = ["--model.num_layers=4", "--model.hidden_size=64", "--model.num_attention_heads=4",
         "--model.seq_length=32", "--model.vocab_size=128", "--model.make_vocab_size_divisible_by=32",
         "--model.dropout=0.0", "--mod.capacity=0.25", "--train.precision=fp32"]
TRAIN = ["--train.micro_batch_size=4", "--train.global_batch_size=8", "--train.lr=3e-3", "--train.warmup_iters=2",
         "--train.eval_interval=0", "--train.eval_iters=1", "--logging.tensorboard=false",
         "--logging.progress_bar=false", "--logging.log_interval=1000"]
DENSE = ["--mod.enabled=false", "--mod.predictor=false", "--mod.aux_loss=false"]


class MarkovTokens:
    """Sample i: a sequence from a fixed random transition table (4 successors per token), seeded by i."""

    def __init__(self, vocab: int, seq_length: int, size: int = 4096, seed: int = 7):
        g = np.random.default_rng(seed)
        self.successors = g.integers(0, vocab, size=(vocab, 4))
        self.probs = np.array([0.55, 0.25, 0.12, 0.08])
        self.vocab, self.seq, self.size = vocab, seq_length, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = np.random.default_rng(10_000 + int(i))
        seq = np.empty(self.seq + 1, dtype=np.int64)
        seq[0] = g.integers(self.vocab)
        choice = g.choice(4, size=self.seq, p=self.probs)
        for t in range(self.seq):
            seq[t + 1] = self.successors[seq[t], choice[t]]
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": np.ones(self.seq, dtype=np.float32),
                "position_ids": np.arange(self.seq)}


def batch(cfg, n: int = 8, start: int = 100_000) -> dict:
    """n held-out samples of the chain as tensors (never seen in training)."""
    ds = MarkovTokens(cfg.model.vocab_size, cfg.model.seq_length)
    samples = [ds[start + i] for i in range(n)]
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


def _train(cfg, layout, tokenizer: str):
    from mod_megatron.data.common import sha256_file
    from mod_megatron.training.trainer import Trainer

    ds = MarkovTokens(cfg.model.vocab_size, cfg.model.seq_length)
    meta = {"tokenizer_sha256": sha256_file(tokenizer), "tokenizer_model": tokenizer}
    trainer = Trainer(cfg, layout, ds, ds, ds, meta=meta)
    trainer.run()
    return [h["loss"] for h in trainer.history]


def make_checkpoint(root: Path, *overrides: str, world_size: int = 1, tp: int = 1, pp: int = 1, ep: int = 1,
                    iters: int = 2, ckpt_dir=None, losses: Optional[list] = None, dp_opt: bool = False) -> Path:
    """Train `iters` steps at the layout; return the checkpoint root (root/ckpt unless `ckpt_dir`, e.g.
    a converted checkpoint to continue from). `losses` receives the per-step training losses."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = root / "tokenizer.model"
    tokenizer.write_bytes(b"a stand-in tokenizer file: only its sha256 is recorded\n")
    ckpt_dir = ckpt_dir or root / "ckpt"
    args = MODEL + TRAIN + [f"--train.iters={iters}", f"--logging.dir={root / 'log'}",
                            f"--checkpoint.dir={ckpt_dir}", *overrides]
    sp = tp > 1 and any(o.startswith("--moe.num_experts") for o in overrides)
    # run_layout's ranks are daemonic and megatron's checkpoint writer starts child processes, so ranks
    # that save run through the conversion's own launcher (same fork-based scheme, not daemonic).
    results = run_ranks(partial(_train, tokenizer=str(tokenizer)), world_size,
                        args + layout_overrides(tp, pp, sp=sp, ep=ep, dp_opt=dp_opt))
    if losses is not None:
        losses.extend(results[-1])  # the last rank is on the last pipeline stage
    return Path(ckpt_dir)


def checkpoint_overrides(ckpt_dir) -> list[str]:
    """The model-defining overrides saved in a checkpoint's meta (its config), for run_layout."""
    from mod_megatron.convert.common import overrides_from
    from mod_megatron.training.checkpoint import resolve_checkpoint
    from mod_megatron.training import checkpoint as ckpt

    meta = ckpt.read_meta(resolve_checkpoint(str(ckpt_dir)))
    return overrides_from(meta["config"]) + ["--train.precision=fp32", "--train.micro_batch_size=1",
                                             "--train.global_batch_size=8"]


def rank_outputs(cfg, layout, ckpt_dir: str, labels: bool = False):
    """Load `ckpt_dir` at this rank's layout; full-vocabulary logits [B, S, V] (or per-token losses [B, S]
    when `labels`) of the held-out batch on the last stage's first TP rank, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from mod_megatron.training.checkpoint import resolve_checkpoint
    from mod_megatron.training import checkpoint as ckpt
    from mod_megatron.training.builder import build_model_chunks

    chunks, _ = build_model_chunks(cfg, layout.device, wrap_ddp=False)
    ckpt.load(resolve_checkpoint(ckpt_dir), chunks, load_rng=False)
    for chunk in chunks:
        chunk.eval()
    data = batch(cfg)
    captured = []

    def forward_step(it, model):
        b = next(it)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"] if labels else None)

        def loss_func(output):
            captured.append(output if labels else gather_from_tensor_model_parallel_region(output))
            return output.sum() * 0.0, torch.tensor(1), {}

        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([data]), model=chunks,
                                    num_microbatches=1, seq_length=cfg.model.seq_length,
                                    micro_batch_size=data["tokens"].shape[0], forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True) or layout.tp_rank != 0:
        return None
    return captured[0].float()


def outputs_at(ckpt_dir, world_size: int = 1, tp: int = 1, pp: int = 1, ep: int = 1, sp: bool = False,
               labels: bool = False, extra=()) -> np.ndarray:
    """rank_outputs at a layout, the one non-None result."""
    overrides = checkpoint_overrides(ckpt_dir) + list(extra)
    results = run_layout(partial(rank_outputs, ckpt_dir=str(ckpt_dir), labels=labels), world_size, tp=tp, pp=pp,
                         ep=ep, sp=sp, overrides=overrides)
    (out,) = [r for r in results if r is not None][:1]
    return out


def load_single(ckpt_dir, device):
    """The model of a checkpoint on this (TP = PP = 1) rank, built from its saved config, in eval mode."""
    from mod_megatron.config import load_config
    from mod_megatron.training.checkpoint import resolve_checkpoint
    from mod_megatron.training import checkpoint as ckpt
    from mod_megatron.training.builder import build_model_chunks

    cfg = load_config(None, checkpoint_overrides(ckpt_dir))
    (model,), _ = build_model_chunks(cfg, device, wrap_ddp=False)
    ckpt.load(resolve_checkpoint(str(ckpt_dir)), [model], load_rng=False)
    return cfg, model.eval()


@torch.no_grad()
def rank_dense_vs_mod(cfg, layout, dense_dir: str, mod_dir: str) -> dict:
    """Held-out loss of the dense model and of the converted MoD model at capacity 1.0 and at its own
    capacity, with the conversion's r = 2*sigmoid(0) = 1 and, for comparison, a plain sigmoid router
    (r = 0.5); plus max |logit difference| to the dense model at capacity 1.0."""
    from mod_megatron.model.mod_layer import mod_layers, set_capacity

    _, dense = load_single(dense_dir, layout.device)
    mod_cfg, mod = load_single(mod_dir, layout.device)
    data = batch(cfg)

    def run(model, labels):
        return model(data["tokens"], data["position_ids"], None, labels=data["labels"] if labels else None)

    out = {"dense": float(run(dense, True).mean())}
    dense_logits = run(dense, False)
    for kind in ("2sigmoid", "sigmoid"):
        for layer in mod_layers([mod]):
            layer.router_weight_kind = kind
        for capacity in (1.0, mod_cfg.mod.capacity):
            set_capacity([mod], capacity)
            out[f"{kind}@{capacity}"] = float(run(mod, True).mean())
            if capacity == 1.0:
                out[f"{kind}@1.0 logits"] = float((run(mod, False) - dense_logits).abs().max())
    return out


@torch.no_grad()
def rank_loss_on(cfg, layout, ckpt_dir: str, start: int, n: int) -> float:
    """Mean token loss of a checkpoint's model on samples [start, start + n) of the training chain."""
    _, model = load_single(ckpt_dir, layout.device)
    data = batch(cfg, n=n, start=start)
    return float(model(data["tokens"], data["position_ids"], None, labels=data["labels"]).mean())
