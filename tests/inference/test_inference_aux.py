"""Training-side causal routing: router aux BCE, stop-gradient predictor, aux-loss scale, capacity warm-up."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from mod_megatron.model.mod_layer import mod_layers
from mod_megatron.model.predictor import Predictor, confusion, rates, set_aux_loss_scale
from mod_megatron.model.router import capacity_at, capacity_tokens

S = 32


@pytest.fixture(autouse=True)
def unit_aux_scale():
    """Other tests' schedules leave their 1/num_microbatches behind; these call backward directly."""
    set_aux_loss_scale(1.0)
    yield
    set_aux_loss_scale(1.0)


def _grads(model, weights=None):
    """Per-parameter grads of the mean LM loss on a fixed batch, with the layers' aux weights set."""
    for layer in mod_layers([model]):
        for name, value in (weights or {}).items():
            setattr(layer, name, value)
    model.zero_grad(set_to_none=True)
    tokens = torch.randint(0, 100, (2, S), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(S).unsqueeze(0).expand(2, S)
    model(tokens, pos, None, labels=tokens).mean().backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_predictor_is_stop_gradient(build_gpt):
    _, model = build_gpt("--mod.aux_loss=false", "--mod.predictor=true")
    with_pred = _grads(model, {"predictor_loss_weight": 1.0})
    without = _grads(model, {"predictor_loss_weight": 0.0})
    pred = [n for n in with_pred if ".predictor." in n]
    assert len(pred) == 2 * 4  # two MoD layers, fc1/fc2 weight and bias
    for name, g in with_pred.items():
        if name in pred:
            assert without[name] is None  # the LM loss never reaches the predictor
            assert g is not None and g.abs().sum() > 0  # its own BCE does
        else:
            assert g is not None and torch.equal(g, without[name]), name  # bit-identical LM grads


def test_predictor_sees_detached_input():
    pred = Predictor(16)
    x = torch.randn(5, 2, 16, requires_grad=True)
    out = pred(x)
    assert out.shape == (5, 2) and out.dtype == torch.float32 and not x.grad_fn
    out.sum().backward()
    assert x.grad is None and pred.fc1.weight.grad is not None


def test_aux_bce_changes_router_grads_linearly_and_can_be_zero_weighted(build_gpt):
    _, model = build_gpt("--mod.predictor=false", "--mod.aux_loss_weight=0.01")
    g0 = _grads(model, {"aux_loss_weight": 0.0})
    g1 = _grads(model, {"aux_loss_weight": 0.01})
    g2 = _grads(model, {"aux_loss_weight": 0.02})
    routers = [n for n in g0 if n.endswith("router.weight")]
    assert len(routers) == 2
    for n in routers:
        d1, d2 = g1[n] - g0[n], g2[n] - g0[n]
        assert d1.abs().max() > 1e-6 * max(1.0, float(g0[n].abs().max()))
        torch.testing.assert_close(d2, 2 * d1, rtol=1e-3, atol=1e-8)  # weight * grad of the BCE
    # weight 0 is exactly "off": same grads as a model built without the aux loss
    _, off = build_gpt("--mod.predictor=false", "--mod.aux_loss=false")
    g_off = _grads(off)
    assert all(torch.equal(g0[n], g_off[n]) for n in g0)


def test_aux_bce_value_is_bce_against_topk_membership(build_gpt):
    _, model = build_gpt("--mod.router_init_std=0.5")
    _grads(model)
    for layer in mod_layers([model]):
        r = layer.last_routing
        target = torch.zeros(S, 2).scatter(0, r.index, 1.0)
        expected = torch.nn.functional.binary_cross_entropy_with_logits(r.logits.detach(), target)
        torch.testing.assert_close(layer.last_aux["router_bce"], expected)
        c = layer.last_aux["predictor_confusion"]
        assert float(c.sum()) == S * 2 and float(c[0] + c[2]) == capacity_tokens(S, 0.25) * 2


def test_schedule_scales_aux_losses_like_the_lm_loss(build_gpt):
    """megatron's schedule divides the LM loss by num_microbatches; the aux loss gets the same scale."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _, model = build_gpt()
    batches = [{"tokens": torch.randint(0, 100, (1, S), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]

    def step(it, m):
        b = next(it)
        pos = torch.arange(S).unsqueeze(0)
        out = m(b["tokens"], pos, None, labels=b["tokens"])
        return out, lambda o: (o.sum(), torch.tensor(S, dtype=torch.int), {"lm": o.sum().detach()})

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[model],
                                num_microbatches=4, seq_length=S, micro_batch_size=1, forward_only=False)
    assert float(MoEAuxLossAutoScaler.main_loss_backward_scale) == pytest.approx(0.25)


def test_capacity_warmup_schedule():
    assert [capacity_at(i, 0.25, 4) for i in range(7)] == [1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25, 0.25]
    assert capacity_at(0, 0.125, 0) == 0.125  # no warm-up
    ks = [capacity_tokens(64, capacity_at(i, 0.125, 10)) for i in range(12)]
    assert ks[0] == 64 and ks[10] == ks[11] == 8 and all(a >= b for a, b in zip(ks, ks[1:]))


def test_confusion_rates():
    decide = torch.tensor([True, True, False, False, True])
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert confusion(decide, target).tolist() == [2, 1, 1, 1]
    assert rates([2, 1, 1, 1]) == {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3}
    assert rates([0, 0, 0, 5])["precision"] is None
