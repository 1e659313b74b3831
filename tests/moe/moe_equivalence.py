"""Train a tiny MoE / MoDE GPT for a few steps with expert parallelism and compare it with one rank.

Same procedure as tests/distributed/equivalence.py (whose batch, schedule and loss helpers are reused):
the single-rank run's full parameters are loaded into every layout, then the real training path runs
(`build_model_chunks` + `build_optimizer`, megatron DDP, Adam, clipping, LR schedule, megatron's
forward/backward schedule). What differs is the parameter naming: expert `j` of EP rank `r` is global
expert `r * num_local_experts + j`, and expert weights are never tensor-parallel (expert TP = 1), so
they are neither split nor gathered over TP (with EP=1 every TP rank holds all of them).
"""
from __future__ import annotations

import re
from functools import lru_cache, partial
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from mod_megatron.moe.router import MoDERouter
from mod_megatron.training.builder import build_model_chunks, build_optimizer, param_dtype
from tests.distributed import equivalence as eq
from tests.distributed.spawn import run_layout

STEPS = eq.STEPS
EXPERTS = ["--moe.num_experts=4", "--moe.topk=2", "--moe.ffn_hidden_size=64", "--moe.aux_loss_coeff=0.01",
           "--moe.z_loss_coeff=0.001"]
# Staged MoDE: every layer MoE, layers 1 and 3 also MoD-routed (capacity 0.25: k = 8 of 32 tokens).
# Integrated MoDE: no MoD router; one no-op expert among the 4 real ones, target share 0.25.
VARIANTS = {
    "staged": EXPERTS,
    # the same with the experts as two grouped GEMMs (moe/grouped.py; compared with "staged"'s loop)
    "staged_grouped": EXPERTS + ["--moe.grouped_gemm=on"],
    "integrated": EXPERTS + ["--mod.enabled=false", "--moe.noop_experts=1", "--moe.noop_target=0.25"],
    "integrated_bias": EXPERTS + ["--mod.enabled=false", "--moe.noop_experts=1", "--moe.noop_target=0.25",
                                  "--moe.score_function=sigmoid", "--moe.expert_bias=true",
                                  "--moe.bias_update_rate=0.01"],
    "integrated_capacity": EXPERTS + ["--mod.enabled=false", "--moe.noop_experts=1", "--moe.noop_target=0.25",
                                      "--moe.capacity_factor=1.0", "--moe.pad_to_capacity=true"],
}


def overrides(variant: str) -> list[str]:
    return eq.MODEL + VARIANTS[variant]


# ----------------------------------------------------------------------------- global parameter names

def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def named_params(chunk):
    """(global name, param): global layer index, global expert index, tied LM head folded."""
    module = getattr(chunk, "module", chunk)
    layer_ids = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(module.decoder.layers)}
    local_experts = None
    out = []
    for name, p in module.named_parameters():
        g = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layer_ids[m.group(1)]}.", name)
        if _is_expert(g):
            if local_experts is None:
                local_experts = module.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
            offset = ps.get_expert_model_parallel_rank() * local_experts
            g = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + offset}.", g)
        if module.share_embeddings_and_output_weights and g == "output_layer.weight":
            g = "embedding.word_embeddings.weight"
        out.append((g, p))
    return out


def _split(name, param, full):
    return full if _is_expert(name) else eq.tp_split(param, full)


def _gather(name, param, local):
    return local.detach().clone() if _is_expert(name) else eq.tp_gather(param, local)


def load_full_state(chunks, state: dict) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for g, p in named_params(chunk):
                p.copy_(_split(g, p, torch.as_tensor(state[g])))


def full_params(chunks) -> dict:
    return {g: _gather(g, p, p.data) for c in chunks for g, p in named_params(c)}


def routers(chunks) -> list[MoDERouter]:
    return [m for c in chunks for m in getattr(c, "module", c).modules() if isinstance(m, MoDERouter)]


# ----------------------------------------------------------------------------- one layout's run

def train_steps(cfg, layout, full_state: Optional[dict] = None) -> dict:
    chunks, _ = build_model_chunks(cfg, layout.device)
    if full_state is not None:
        load_full_state(chunks, full_state)
    initial = full_params(chunks) if full_state is None else None
    optimizer, scheduler = build_optimizer(cfg, chunks, param_dtype(cfg, layout.device))
    forward_backward = get_forward_backward_func()
    t = cfg.train
    mbs = eq.micro_batches(eq.make_batch(cfg), t.micro_batch_size, layout.dp_rank, layout.dp)
    losses, grads, biases = [], [], []
    for _ in range(STEPS):
        for chunk in chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=eq._forward_step, data_iterator=iter(mbs), model=chunks,
            num_microbatches=len(mbs), seq_length=cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=False)
        grads.append({g: _gather(g, p, p.main_grad) for c in chunks for g, p in named_params(c)})
        ok, _, _ = optimizer.step()
        assert ok, "optimizer step skipped"
        scheduler.step(increment=1)
        losses.append(eq._global_loss(reduced, layout))
        biases.append({r.layer_number: r.expert_bias.clone() for r in routers(chunks) if r.expert_bias is not None})
    return {"losses": losses, "grads": grads, "params": full_params(chunks), "initial": initial,
            "expert_bias": biases}


@lru_cache(maxsize=None)
def reference(variant: str) -> dict:
    (result,) = run_layout(train_steps, 1, overrides=overrides(variant))
    return result


def run(variant: str, world_size: int, tp: int = 1, ep: int = 1, dp_opt: bool = False, pp: int = 1,
        start_from: Optional[str] = None) -> list[dict]:
    """The layout's ranks, from the initial parameters of `start_from`'s (default: the variant's) single rank."""
    fn = partial(train_steps, full_state=reference(start_from or variant)["initial"])
    return run_layout(fn, world_size, tp=tp, pp=pp, sp=tp > 1, ep=ep, dp_opt=dp_opt, overrides=overrides(variant))


def compare(variant: str, ranks: list[dict]) -> dict:
    """max |Δloss|, |Δgrad| (every param, every step), |Δparam| after the last step, |Δexpert bias|."""
    ref = reference(variant)
    d = {"loss": 0.0, "grad": 0.0, "param": 0.0, "bias": 0.0}
    seen = set()
    for res in ranks:
        for step in range(STEPS):
            if res["losses"][step] is not None:
                d["loss"] = max(d["loss"], abs(res["losses"][step] - ref["losses"][step]))
            for name, g in res["grads"][step].items():
                d["grad"] = max(d["grad"], _max_abs_diff(g, ref["grads"][step][name]))
                seen.add(name)
            for layer, b in res["expert_bias"][step].items():
                d["bias"] = max(d["bias"], _max_abs_diff(b, ref["expert_bias"][step][layer]))
        for name, p in res["params"].items():
            d["param"] = max(d["param"], _max_abs_diff(p, ref["params"][name]))
    missing = set(ref["grads"][0]) - seen
    assert not missing, f"{variant}: no rank reported grads for {sorted(missing)}"
    return d


def _max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


if __name__ == "__main__":  # prints the table of docs/mode.md
    LAYOUTS = [("EP=2", 2, 1, 2, 1), ("TP=2+SP (EP=1)", 2, 2, 1, 1), ("TP=2+SP x EP=2", 4, 2, 2, 1),
               ("EP=4", 4, 1, 4, 1), ("PP=2 x EP=2", 4, 1, 2, 2)]
    print("| variant | layout | max |Δloss| | max |Δgrad| | max |Δparam| | max |Δbias| |")
    for variant in VARIANTS:
        for name, world, tp, ep, pp in LAYOUTS:
            if variant == "integrated_capacity" and tp > 1:
                continue  # capacity is per rank's tokens: SP halves it (see docs/mode.md)
            d = compare(variant, run(variant, world, tp=tp, ep=ep, pp=pp))
            print(f"| {variant} | {name} | {d['loss']:.1e} | {d['grad']:.1e} | {d['param']:.1e} | {d['bias']:.1e} |")
