"""MoD under sequence parallelism, one layer: global top-k with all kept tokens on one TP rank, padding.

The router is set to score token t by its first feature, and the input places the kept tokens of
batch column 0 all in the first half of the sequence (TP rank 0 owns them), of column 1 all in the
second half (rank 1), of column 2 split 3 / 2. k = 5 is padded to 6 rows. The SP layer's output, input
gradient and parameter gradients must equal the same layer without TP (same weights: megatron's CPU
init is TP-invariant, see test_equivalence).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mod_megatron.model.gpt import build_model, transformer_config
from mod_megatron.model.mod_layer import MoDTransformerLayer
from mod_megatron.parallel.sequence import padded_capacity
from tests.distributed.equivalence import MODEL, tp_gather
from tests.distributed.spawn import run_layout

S, B, H = 32, 3, 64
KEPT = {0: [2, 5, 9, 11, 14], 1: [16, 20, 27, 30, 31], 2: [0, 7, 15, 16, 24]}
OVERRIDES = MODEL + ["--mod.capacity=0.15625"]  # k = 5 of 32


def _inputs():
    g = torch.Generator().manual_seed(7)
    x = 0.5 * torch.randn(S, B, H, generator=g)
    x[:, :, 0] = -1.0 - torch.rand(S, B, generator=g)  # router score of every token: below 0 ...
    for col, positions in KEPT.items():
        x[positions, col, 0] = 1.0 + torch.rand(len(positions), generator=g)  # ... except the kept ones
    cotangent = torch.randn(S, B, H, generator=g)
    return x, cotangent


def _gather_seq(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=0)


def _one_layer(cfg, layout):
    model = build_model(cfg, transformer_config(cfg))
    layer = model.decoder.layers[1]
    assert isinstance(layer, MoDTransformerLayer)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x_full, cotangent = _inputs()
    x, sp = x_full, cfg.parallel.sp
    if sp:
        s_local = S // layout.tp
        x, cotangent = (t[layout.tp_rank * s_local:(layout.tp_rank + 1) * s_local] for t in (x_full, cotangent))
    x = x.clone().requires_grad_()
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(S))
    (out * cotangent).sum().backward()
    grads = {}
    for name, p in layer.named_parameters():
        g = p.grad
        if sp and getattr(p, "sequence_parallel", False):  # what finalize_model_grads does in training
            g = g.clone()
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        grads[name] = tp_gather(p, g)
    marked = sorted(n for n, p in layer.named_parameters() if getattr(p, "sequence_parallel", False))
    return {"out": _gather_seq(out.detach()) if sp else out.detach(),
            "x_grad": _gather_seq(x.grad) if sp else x.grad, "grads": grads,
            "index": layer.last_routing.index, "marked": marked, "x": x_full}


@pytest.fixture(scope="module")
def single():
    (res,) = run_layout(_one_layer, 1, overrides=OVERRIDES)
    return res


def test_sp_layer_equals_single_rank_with_uneven_ownership(single):
    assert padded_capacity(5, 2) == 6
    for col, positions in KEPT.items():
        assert sorted(single["index"][:, col].tolist()) == positions
    ranks = run_layout(_one_layer, 2, tp=2, sp=True, overrides=OVERRIDES)
    for res in ranks:
        np.testing.assert_array_equal(res["index"], single["index"])  # the same global top-k everywhere
        np.testing.assert_allclose(res["out"], single["out"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(res["x_grad"], single["x_grad"], rtol=0, atol=1e-6)
        assert res["grads"].keys() == single["grads"].keys()
        for name, g in res["grads"].items():
            np.testing.assert_allclose(g, single["grads"][name], rtol=0, atol=1e-5, err_msg=name)
        # router and norms are replicated: their SP grads are partial and need the TP all-reduce
        assert res["marked"] == ["input_layernorm.bias", "input_layernorm.weight", "pre_mlp_layernorm.bias",
                                 "pre_mlp_layernorm.weight", "router.weight"]


def test_skipped_tokens_pass_through_bit_identical_under_sp(single):
    kept = np.zeros((S, B), dtype=bool)
    for col, positions in KEPT.items():
        kept[positions, col] = True
    ranks = run_layout(_one_layer, 2, tp=2, sp=True, overrides=OVERRIDES)
    out, x = ranks[0]["out"], ranks[0]["x"]
    np.testing.assert_array_equal(out[~kept], x[~kept])
    assert np.abs(out[kept] - x[kept]).max() > 1e-3
