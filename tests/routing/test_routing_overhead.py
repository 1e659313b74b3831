"""The MoD layer's per-step work: no host synchronisation, and diagnostics only when they are read."""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mod_megatron.model.mod_layer import MoDTransformerLayer
from mod_megatron.model.predictor import bce_sum, confusion
from mod_megatron.model.router import topk_membership

S = 32
# aten ops that copy a device value to the host (or size an output by data) and so wait for the GPU.
SYNCING = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "is_nonzero", "unique",
           "_unique2", "masked_scatter", "equal", "allclose"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bool_indexing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in ("index", "index_put", "index_put_"):  # x[mask] sizes its output by the mask's count
            indices = args[1] if len(args) > 1 else []
            self.bool_indexing += any(t is not None and t.dtype == torch.bool for t in indices)
        return func(*args, **(kwargs or {}))


def _train_step(model, log=None):
    tokens = torch.randint(0, 100, (2, S), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(S).unsqueeze(0).expand(2, S)
    model.zero_grad(set_to_none=True)
    if log is None:
        model(tokens, pos, None, labels=tokens).mean().backward()
        return
    with log:
        model(tokens, pos, None, labels=tokens).mean().backward()


def test_mod_layer_training_step_has_no_host_sync(build_gpt):
    """Forward and backward of a routed layer (aux BCE and predictor on); megatron's own LM loss, outside
    the layer, is not checked."""
    _, model = build_gpt()
    layer = model.decoder.layers[1]
    assert isinstance(layer, MoDTransformerLayer)
    x = torch.randn(S, 2, 64, requires_grad=True)
    rope = model.rotary_pos_emb(S)
    log = OpLog()
    with log:
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        out.sum().backward()
    assert log.ops["topk"] == 1 and log.ops["binary_cross_entropy_with_logits"] == 2  # routed, aux losses on
    assert not SYNCING & set(log.ops), {k: log.ops[k] for k in SYNCING & set(log.ops)}
    assert log.bool_indexing == 0


def test_diagnostics_are_computed_only_when_read(build_gpt):
    _, model = build_gpt("--mod.router_init_std=0.5")
    _train_step(model)
    log = OpLog()
    _train_step(model, log)
    assert log.ops["bitwise_and"] == 0 and log.ops["bitwise_not"] == 0  # no confusion counts in the step
    layers = [layer for layer in model.decoder.layers if isinstance(layer, MoDTransformerLayer)]
    for layer in layers:
        r = layer.last_routing
        target = topk_membership(r.index, S)
        with OpLog() as reading:
            stats = layer.last_aux
        assert reading.ops["bitwise_and"] > 0  # computed now, on first read ...
        with OpLog() as again:
            assert layer.last_aux is stats  # ... and only once per forward
        assert sum(again.ops.values()) == 0
        torch.testing.assert_close(stats["router_bce"], bce_sum(r.logits.detach(), target) / (2 * S))
        assert torch.equal(stats["router_confusion"], confusion(r.logits.detach() > 0, target))
        c = stats["predictor_confusion"]
        assert float(c.sum()) == 2 * S and float(c[0] + c[2]) == r.index.numel()
