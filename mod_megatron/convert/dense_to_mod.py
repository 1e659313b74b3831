"""`mod-convert dense-to-mod`: a dense checkpoint -> a MoD model that starts where the dense one is.

The MoD model is built with the routed layers the `--mod.*` options choose (capacity, every,
first_routed, predictor, ...); every weight of the dense model is copied into it (a MoD layer is
megatron-core's TransformerLayer plus a router, so all names match), and only the new parameters are
initialised:

- router weight 0 and `mod.router_weight=2sigmoid` (unless given otherwise): r = 2 * sigmoid(0) = 1,
  so a routed token gets x + f(x), exactly what the dense layer computes. At capacity 1.0 the MoD
  model *is* the dense model; every conversion checks that (max |logit difference| on random tokens,
  recorded in the meta and printed; ~1e-6 in fp32). The plain `sigmoid` would give r = 0.5 and halve
  every routed layer's contribution.
- at capacity c < 1 the remaining difference is the routing itself: 1 - c of the tokens skip each
  routed layer. With a zero router all scores tie and the first steps of training pick the tokens; use
  `--mod.capacity_warmup_iters=N` when training on, so capacity goes from 1.0 (= the dense model) to c.
- aux predictor: default init, with its output bias at logit(c) so it starts at the base rate.

The output is model-only at iteration 0 (a new model: fresh optimizer, LR schedule from the start)
with the source's consumed_samples (the data continues where the dense run stopped), and records
`converted_from` and `source_iteration`.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Optional, Sequence

import torch

from mod_megatron.convert import common
from mod_megatron.convert.deepspeed import ConversionError

LOGIT_CHECK_TOL = 1e-4  # capacity 1.0 with r = 1 must reproduce the dense logits (fp32 rounding only)


def plan(src: str, out_root: str, mod_overrides: Sequence[str], tokenizer: Optional[str] = None) -> dict:
    """Check the source and the requested MoD settings; return what the conversion needs. Writes nothing."""
    from mod_megatron.config import ConfigError, load_config
    from mod_megatron.model.spec import is_routed

    bad = [o for o in mod_overrides if not o.startswith("--mod.") or "=" not in o]
    if bad:
        raise ConversionError(f"unrecognised arguments: {' '.join(bad)} (MoD settings look like --mod.key=value)")
    src_dir, meta = common.open_source(src, tokenizer)
    common.check_output(out_root, src_dir)
    saved = meta["config"]
    base = common.overrides_from(saved) + [
        f"--model.make_vocab_size_divisible_by={common.vocab_divisor(meta, 1)}", "--parallel.tp=1",
        "--parallel.pp=1", "--parallel.vpp=null", "--parallel.sp=false", "--parallel.pipeline_split=even",
        "--moe.ep=1", "--train.device=cpu", "--train.precision=fp32", "--train.engine=megatron"]
    try:
        dense_cfg = load_config(None, base)
        cfg = load_config(None, base + ["--mod.enabled=true", "--mod.router_weight=2sigmoid", *mod_overrides])
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    routed = [i for i in range(cfg.model.num_layers) if is_routed(cfg, i)]
    if any(is_routed(dense_cfg, i) for i in range(dense_cfg.model.num_layers)):
        raise ConversionError(f"{src_dir} is already a MoD checkpoint (mod.enabled=true); dense-to-mod "
                              "needs a dense one (mod.enabled=false)")
    out_config = dict(saved, mod=cfg.to_dict()["mod"],
                      model=dict(saved["model"], make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by),
                      parallel=dict(saved.get("parallel") or {}, tp=1, pp=1, vpp=None, sp=False, pipeline_split="even"),
                      moe=dict(saved.get("moe") or {}, ep=1))
    out_meta = {k: v for k, v in meta.items() if k not in ("files", "world_size", "format_version", "iteration")}
    out_meta.update(config=out_config, layout={"tp": 1, "pp": 1, "dp": 1, "ep": 1, "vpp": None},
                    converted_from=os.path.abspath(src_dir), source_iteration=meta["iteration"],
                    conversion={"kind": "dense-to-mod", "routed_layers": [i + 1 for i in routed]})
    return {"src_dir": src_dir, "dense_overrides": base, "overrides": base + ["--mod.enabled=true",
            "--mod.router_weight=2sigmoid", *mod_overrides], "meta": out_meta, "cfg": cfg}


def copy_dense_weights(dense, mod) -> list[str]:
    """Load every dense tensor into the MoD model; return the names only the MoD model has."""
    src, own = dense.state_dict(), mod.state_dict()
    extra = [k for k in src if k not in own]
    fresh = [k for k in own if k not in src]
    unexpected = [k for k in fresh if ".router." not in k and ".predictor." not in k]
    if extra or unexpected:
        raise ConversionError(f"dense and MoD models differ beyond routers/predictors: "
                              f"{(extra + unexpected)[0]} (internal error)")
    mod.load_state_dict(src, strict=False)
    return fresh


def init_routing(mod, capacity: float) -> None:
    """Zero routers (r = 2*sigmoid(0) = 1); predictors start at the base rate logit(capacity)."""
    from mod_megatron.model.mod_layer import mod_layers

    p = min(max(capacity, 1e-3), 1.0 - 1e-3)
    with torch.no_grad():
        for layer in mod_layers([mod]):
            layer.router.weight.zero_()
            if layer.predictor is not None:
                layer.predictor.fc2.bias.fill_(math.log(p / (1.0 - p)))


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S] token ids -> [B, S, padded vocab] logits of a single-rank GPT."""
    model.eval()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None).float()


def capacity_one_gap(dense, mod, cfg, seed: int = 0) -> float:
    """max |logit(MoD at capacity 1.0) - logit(dense)| on a fixed batch of random tokens."""
    from mod_megatron.model.mod_layer import set_capacity

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g)
    set_capacity([mod], 1.0)
    try:
        return float((logits(mod, tokens) - logits(dense, tokens)).abs().max())
    finally:
        set_capacity([mod], cfg.mod.capacity)


def convert_rank(cfg, layout, src_dir: str, out_root: str, dense_overrides: list, meta: dict) -> dict:
    """The conversion itself (one rank, TP = PP = 1)."""
    from mod_megatron.config import load_config
    from mod_megatron.training.builder import build_model_chunks

    (dense,), _ = build_model_chunks(load_config(None, dense_overrides), layout.device, wrap_ddp=False)
    common.load_weights(src_dir, [dense])
    (mod,), _ = build_model_chunks(cfg, layout.device, wrap_ddp=False)
    copy_dense_weights(dense, mod)
    init_routing(mod, cfg.mod.capacity)
    gap = capacity_one_gap(dense, mod, cfg)
    if cfg.mod.router_weight == "2sigmoid" and not gap <= LOGIT_CHECK_TOL:
        raise ConversionError(f"check failed: at capacity 1.0 the MoD logits differ from the dense ones by {gap:.3g} "
                              f"(> {LOGIT_CHECK_TOL}); nothing written")
    meta = dict(meta, conversion=dict(meta["conversion"], max_abs_logit_diff_capacity_1=gap))
    return {"dir": common.save_model_only(out_root, 0, [mod], meta), "max_abs_logit_diff_capacity_1": gap}


def dense_to_mod(src: str, out_root: str, mod_overrides: Sequence[str] = (), tokenizer: Optional[str] = None) -> dict:
    """Convert; return {"dir", "max_abs_logit_diff_capacity_1", "train_overrides"}."""
    from mod_megatron.convert.ranks import run_ranks

    p = plan(src, out_root, list(mod_overrides), tokenizer)
    fn = partial(convert_rank, src_dir=p["src_dir"], out_root=out_root, dense_overrides=p["dense_overrides"],
                 meta=p["meta"])
    with common.output_guard(out_root):
        (result,) = run_ranks(fn, 1, p["overrides"])
    mod = p["cfg"].mod
    keys = ("enabled", "capacity", "every", "first_routed", "router_weight", "predictor")
    result["train_overrides"] = [f"--mod.{k}={common.yaml_value(getattr(mod, k))}" for k in keys]
    return result
