"""Cost-aware assignment of layers to pipeline stages.

megatron-core splits the decoder layers evenly over the pipeline stages. With MoD that is unbalanced:
a routed layer at capacity c costs roughly c times a dense one (attention even c^2), so a stage that
happens to hold more routed layers idles while the others work. Here each layer's cost is its
forward FLOPs per sequence (`training.flops.layer_forward_flops`: the routed tokens only, plus the
router for MoD layers); the LM head is charged to the last stage (the embedding lookup costs no
matmul FLOPs). A dynamic program over the split points picks the contiguous split that minimises the
slowest stage, preferring the even split when it is as good. The result is expressed as megatron's
`pipeline_model_parallel_layout` string (e.g. "Et|tttL"), which `spec.block_spec` and megatron's
layer offsets honour:

    layout = cost_aware_layout(cfg, pp=4)
    chunks, tcfg = build_model_chunks(cfg, device, pipeline_layout=layout)

    python -m mod_megatron.parallel.stages --config configs/gpt-125m-mod.yaml --pp 4 [--model.num_layers=24]

Virtual pipeline stages (vpp) are not handled: the layout would have to balance pp*vpp chunks per rank.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from mod_megatron.config import Config, padded_vocab
from mod_megatron.model.router import capacity_tokens
from mod_megatron.model.spec import is_routed
from mod_megatron.training.flops import layer_forward_flops

Split = list[tuple[int, int]]  # per stage, [first, end) layer indices


def layer_costs(cfg: Config) -> list[float]:
    """Forward FLOPs per sequence of each decoder layer (MoD layers: routed tokens + router)."""
    m = cfg.model
    s = m.seq_length
    costs = []
    for i in range(m.num_layers):
        if is_routed(cfg, i):
            costs.append(layer_forward_flops(cfg, capacity_tokens(s, cfg.mod.capacity)) + 2.0 * s * m.hidden_size)
        else:
            costs.append(layer_forward_flops(cfg, s))
    return costs


def head_cost(cfg: Config) -> float:
    """Forward FLOPs per sequence of the LM head (on the last stage)."""
    m = cfg.model
    return 2.0 * m.seq_length * m.hidden_size * padded_vocab(m, cfg.parallel.tp)


def stage_costs(costs: Sequence[float], split: Split, last_extra: float = 0.0) -> list[float]:
    out = [sum(costs[a:b]) for a, b in split]
    out[-1] += last_extra
    return out


def even_split(num_layers: int, pp: int) -> Optional[Split]:
    """megatron's default: num_layers / pp layers per stage (None when that does not divide)."""
    if num_layers % pp:
        return None
    n = num_layers // pp
    return [(i * n, (i + 1) * n) for i in range(pp)]


def balanced_split(costs: Sequence[float], pp: int, last_extra: float = 0.0) -> Split:
    """Contiguous split of the layers into pp non-empty stages minimising the most expensive stage."""
    n = len(costs)
    if not 1 <= pp <= n:
        raise ValueError(f"cannot split {n} layers into {pp} non-empty pipeline stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, stage: int) -> float:
        return prefix[b] - prefix[a] + (last_extra if stage == pp - 1 else 0.0)

    # best[j][i]: the smallest possible slowest-stage cost of layers [0, i) on stages 0..j.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, i, 0)
    for j in range(1, pp):
        for i in range(j + 1, n + 1):
            for m in range(j, i):
                value = max(best[j - 1][m], cost(m, i, j))
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, m
    split, end = [], n
    for j in range(pp - 1, 0, -1):
        start = cut[j][end]
        split.append((start, end))
        end = start
    split.append((0, end))
    split.reverse()

    even = even_split(n, pp)
    if even is not None and max(stage_costs(costs, even, last_extra)) <= best[pp - 1][n] * (1 + 1e-12):
        return even
    return split


def layout_string(split: Split) -> str:
    """megatron's pipeline_model_parallel_layout: 'E' on the first stage, 'L' on the last, 't' per layer."""
    stages = ["t" * (b - a) for a, b in split]
    stages[0] = "E" + stages[0]
    stages[-1] += "L"
    return "|".join(stages)


def cost_aware_split(cfg: Config, pp: int, include_head: bool = True) -> Split:
    return balanced_split(layer_costs(cfg), pp, head_cost(cfg) if include_head else 0.0)


def cost_aware_layout(cfg: Config, pp: int, include_head: bool = True) -> str:
    if cfg.parallel.vpp:
        raise ValueError("cost-aware pipeline layouts do not handle virtual pipeline stages (parallel.vpp)")
    return layout_string(cost_aware_split(cfg, pp, include_head))


def stage_table(cfg: Config, pp: int, include_head: bool = True) -> str:
    """Table of the even and the cost-aware split: stage | layers | est. cost (GFLOP per sequence, fwd)."""
    costs = layer_costs(cfg)
    extra = head_cost(cfg) if include_head else 0.0
    marks = "".join("m" if is_routed(cfg, i) else "d" for i in range(cfg.model.num_layers))
    lines = [f"{cfg.model.num_layers} layers ({marks}: d dense, m MoD at capacity {cfg.mod.capacity}), "
             f"pp={pp}; cost = forward GFLOP per sequence" + (", LM head on the last stage" if include_head else "")]
    splits = [("even", even_split(len(costs), pp)), ("cost-aware", balanced_split(costs, pp, extra))]
    for name, split in splits:
        lines.append("")
        if split is None:
            lines.append(f"{name}: {len(costs)} layers do not split evenly into {pp} stages")
            continue
        per_stage = stage_costs(costs, split, extra)
        mean = sum(per_stage) / len(per_stage)
        lines.append(f"{name} split  (layout {layout_string(split)!r})")
        lines.append(f"{'stage':>5} | {'layers':<14} | {'est. cost':>9}")
        for stage, ((a, b), c) in enumerate(zip(split, per_stage)):
            layers = f"{a}-{b - 1} ({b - a})" if b - a > 1 else f"{a} (1)"
            lines.append(f"{stage:>5} | {layers:<14} | {c / 1e9:9.3f}")
        lines.append(f"slowest stage {max(per_stage) / 1e9:.3f}, imbalance max/mean {max(per_stage) / mean:.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    from mod_megatron.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--no-head", action="store_true", help="do not charge the LM head to the last stage")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    print(stage_table(cfg, args.pp, include_head=not args.no_head))


if __name__ == "__main__":
    main()
