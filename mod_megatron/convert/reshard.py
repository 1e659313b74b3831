"""`mod-convert reshard`: the weights of a checkpoint saved at one TP/PP/EP layout, saved at another.

megatron-core's dist checkpoints are layout-free: every tensor is stored under a global key with its
global shape, and a load at any layout takes each rank's slice (that is how `mod-train` resumes at a
new layout). `reshard` uses exactly that: it starts the target layout's ranks itself (forked CPU
processes over gloo, `convert/ranks.py`), loads the source there and saves it again, so the result
is a checkpoint whose shards and meta `layout` are the target's. Everything the model holds goes
along: embeddings, attention and MLP weights, MoD routers (`router.layer{N}.weight`), aux predictors,
MoE experts (split over the target's expert-parallel ranks).

The result is model-only, like `from-deepspeed`'s: optimizer moments and RNG states are dropped, and
`mod-train` continues from it with a fresh optimizer at the same iteration and data position. To keep
the optimizer state, resume the source checkpoint at the new layout directly instead.

The embedding is padded to a multiple of make_vocab_size_divisible_by * tp; where the target TP would
change the padded row count, the saved divisor is changed so the rows (and the logits) stay the same.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Optional

from mod_megatron.convert import common
from mod_megatron.convert.deepspeed import ConversionError


def target_world_size(tp: int, pp: int, ep: int) -> int:
    """tp * pp * dp with the smallest dp for which ep divides tp * dp (experts come from tp x dp)."""
    return tp * pp * (ep // math.gcd(tp, ep))


def plan(src: str, out_root: str, tp: int, pp: int, ep: int = 1, tokenizer: Optional[str] = None) -> dict:
    """Check the source against the target layout; return what the ranks need. Writes nothing."""
    from mod_megatron.config import ConfigError, ffn_hidden, load_config, validate

    src_dir, meta = common.open_source(src, tokenizer)
    common.check_output(out_root, src_dir)
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if value < 1:
            raise ConversionError(f"--{name} must be >= 1, got {value}")
    saved = meta["config"]
    m = common.model_config(saved["model"])
    groups = m.num_query_groups or m.num_attention_heads
    for what, size in (("model.num_attention_heads", m.num_attention_heads), ("model.num_query_groups", groups),
                       ("the MLP width", ffn_hidden(m))):
        if size % tp:
            raise ConversionError(f"cannot reshard {src_dir} to tp={tp}: it must divide {what}={size}")
    is_moe = int((saved.get("moe") or {}).get("num_experts") or 0) > 0
    split = "even" if m.num_layers % pp == 0 else "cost"  # any split: the checkpoint keys are global
    divisor = common.vocab_divisor(meta, tp)
    overrides = common.overrides_from(saved) + [
        f"--model.make_vocab_size_divisible_by={divisor}", f"--parallel.tp={tp}", f"--parallel.pp={pp}",
        "--parallel.vpp=null", f"--parallel.sp={tp > 1 and is_moe}", f"--parallel.pipeline_split={split}",
        f"--moe.ep={ep}", "--train.device=cpu", "--train.precision=fp32", "--train.engine=megatron"]
    world_size = target_world_size(tp, pp, ep)
    overrides += ["--train.micro_batch_size=1", f"--train.global_batch_size={world_size}"]  # any dp is fine
    try:
        cfg = load_config(None, overrides)
        validate(cfg, world_size=world_size)
    except ConfigError as e:
        raise ConversionError(f"cannot reshard {src_dir} to tp={tp} pp={pp} ep={ep}: {e}") from None
    out_config = dict(saved, model=dict(saved["model"], make_vocab_size_divisible_by=divisor),
                      parallel=dict(saved.get("parallel") or {}, tp=tp, pp=pp, vpp=None, sp=tp > 1 and is_moe,
                                    pipeline_split=split),
                      moe=dict(saved.get("moe") or {}, ep=ep))
    out_meta = {k: v for k, v in meta.items() if k not in ("files", "world_size", "format_version", "iteration")}
    dp = world_size // (tp * pp)
    out_meta.update(config=out_config, layout={"tp": tp, "pp": pp, "dp": dp, "ep": ep, "vpp": None},
                    resharded_from=os.path.abspath(src_dir), source_layout=common.saved_layout(meta))
    return {"src_dir": src_dir, "overrides": overrides, "world_size": world_size, "meta": out_meta,
            "iteration": meta["iteration"]}


def reshard_rank(cfg, layout, src_dir: str, out_root: str, iteration: int, meta: dict) -> Optional[str]:
    """One rank of the target layout: load the source's weights here, save them as a new checkpoint."""
    from mod_megatron.parallel.stages import cost_aware_layout
    from mod_megatron.training.builder import build_model_chunks

    stages = cost_aware_layout(cfg, cfg.parallel.pp) if cfg.parallel.pipeline_split == "cost" else None
    chunks, _ = build_model_chunks(cfg, layout.device, wrap_ddp=False, pipeline_layout=stages)
    common.load_weights(src_dir, chunks)
    out = common.save_model_only(out_root, iteration, chunks, meta)
    return out if layout.rank == 0 else None


def reshard(src: str, out_root: str, tp: int, pp: int, ep: int = 1, tokenizer: Optional[str] = None) -> str:
    """Rewrite checkpoint `src` for layout tp x pp (x ep) under `out_root`; return the new directory."""
    from mod_megatron.convert.ranks import run_ranks

    p = plan(src, out_root, tp, pp, ep, tokenizer)
    fn = partial(reshard_rank, src_dir=p["src_dir"], out_root=out_root, iteration=p["iteration"], meta=p["meta"])
    with common.output_guard(out_root):
        return run_ranks(fn, p["world_size"], p["overrides"])[0]
