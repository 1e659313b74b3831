"""Cost-aware pipeline split: DP over split points, megatron layout strings, the MoD cost model."""
from __future__ import annotations

import pytest

from mod_megatron.config import load_config
from mod_megatron.parallel import stages


def test_balanced_split_minimises_the_slowest_stage():
    assert stages.balanced_split([4, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert stages.balanced_split([1, 1, 1, 1, 1, 1, 1, 1], 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stages.balanced_split([1, 1, 1, 1], 2, last_extra=1.5) == [(0, 3), (3, 4)]
    # the even split is kept when it is as good as any
    assert stages.balanced_split([2, 1, 2, 1], 2) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError):
        stages.balanced_split([1, 1], 3)


def test_balanced_split_is_optimal_against_brute_force():
    import itertools
    costs = [5, 1, 3, 3, 1, 1, 4, 2, 1]
    best = min(max(sum(costs[a:b]) for a, b in zip((0,) + cut, cut + (len(costs),)))
               for cut in itertools.combinations(range(1, len(costs)), 3))
    split = stages.balanced_split(costs, 4)
    assert max(stages.stage_costs(costs, split)) == best
    assert split[0][0] == 0 and split[-1][1] == len(costs)
    assert all(a < b for a, b in split) and all(s[1] == t[0] for s, t in zip(split, split[1:]))


def test_layout_string_is_megatrons_format():
    assert stages.layout_string([(0, 1), (1, 4)]) == "Et|tttL"
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    layout = PipelineParallelLayerLayout("Et|tttL", 2)
    layout.validate_layer_layout(num_layers=4, mtp_num_layers=None)
    assert layout.get_layer_id_list(vp_stage=0, pp_rank=1) == [1, 2, 3]


def test_mod_layers_are_cheaper_and_the_split_follows():
    cfg = load_config(None, ["--model.num_layers=24", "--model.hidden_size=1024", "--model.num_attention_heads=16",
                             "--model.seq_length=2048", "--model.vocab_size=50257", "--mod.capacity=0.125"])
    costs = stages.layer_costs(cfg)
    assert costs[1] < 0.2 * costs[0] and costs[0] == costs[2]
    even = stages.even_split(24, 4)
    aware = stages.cost_aware_split(cfg, 4)
    head = stages.head_cost(cfg)
    assert max(stages.stage_costs(costs, aware, head)) < 0.75 * max(stages.stage_costs(costs, even, head))
    assert aware[-1][1] - aware[-1][0] < 6  # the big LM head leaves fewer layers on the last stage
    table = stages.stage_table(cfg, 4)
    assert "cost-aware split" in table and stages.cost_aware_layout(cfg, 4) in table


def test_dense_model_keeps_the_even_split():
    cfg = load_config(None, ["--model.num_layers=8", "--mod.enabled=false"])
    assert stages.cost_aware_layout(cfg, 4, include_head=False) == "Ett|tt|tt|ttL"
