"""model.fused_layer (model/fused_layer.py, model/fused_mod.py): the layer as one function must compute
what megatron-core's TransformerLayer (and the eager MoD layer around it) computes.

On a CPU `on` runs the fused functions eagerly: a whole GPT (dense and MoD, LayerNorm/GeLU and
RMSNorm/SwiGLU, grouped-query attention, learned positions) must give megatron's loss, aux losses,
routing and gradients to fp32 rounding. Layers the path does not model fall back to megatron's forward
(or, with `on`, refuse at build). On a GPU (skipped in CI) the compiled function is checked against
the eager one in bf16.
"""
from __future__ import annotations

import pytest
import torch

from mod_megatron.config import load_config
from mod_megatron.model.fused_layer import FusedTransformerLayer
from mod_megatron.model.mod_layer import MoDTransformerLayer, mod_layers
from tests.conftest import TINY, dense_and_mod_layers, layer_stack_step, tiny_trainer_runs, trace_fused_functions

CUDA = torch.cuda.is_available()


def _run(model, tokens, eval_mode=False):
    """Loss (with the MoD aux losses in its backward), grads, routing and diagnostics of one step."""
    model.train(not eval_mode)
    loss = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1), None,
                 labels=tokens[:, 1:]).mean()
    if not eval_mode:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    routing = [(layer.last_routing.index.clone(), layer.last_routing.weight.clone(),
                {k: v.clone() for k, v in layer.last_aux.items()}) for layer in mod_layers([model])]
    return loss.detach(), grads, routing


CASES = {
    "mod": [],
    "dense": ["--mod.enabled=false"],
    "rmsnorm-swiglu-gqa": ["--model.normalization=RMSNorm", "--model.activation=swiglu", "--model.num_query_groups=2"],
    "learned-positions": ["--model.position_embedding=learned_absolute"],
    "full-capacity-2sigmoid": ["--mod.capacity=1.0", "--mod.router_weight=2sigmoid"],
    "no-aux-losses": ["--mod.aux_loss=false", "--mod.predictor=false"],
}


cpu_only = pytest.mark.skipif(CUDA, reason="CPU: fused eagerly vs megatron in fp32; the GPU test below covers compiling")


@cpu_only
@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("eval_mode", [False, True], ids=["train", "eval"])
def test_fused_model_equals_megatrons(build_gpt, extra, eval_mode):
    tokens = torch.randint(0, 100, (3, 33), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("off", "on"):
        _, model = build_gpt(f"--model.fused_layer={mode}", "--mod.router_init_std=0.5", *extra, seed=0)
        layers = model.decoder.layers
        assert all(isinstance(layer, FusedTransformerLayer) for layer in layers)
        assert all((layer.fused_why_not is None) == (mode == "on") for layer in layers)
        out[mode] = _run(model, tokens, eval_mode)
    (loss_off, grads_off, routing_off), (loss_on, grads_on, routing_on) = out["off"], out["on"]
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    routed = "--mod.enabled=false" not in extra
    assert set(grads_on) == set(grads_off) and (eval_mode or any("router" in n for n in grads_on) == routed)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert len(routing_on) == len(routing_off) == (2 if routed else 0)
    for (idx_on, w_on, aux_on), (idx_off, w_off, aux_off) in zip(routing_on, routing_off):
        assert torch.equal(idx_on, idx_off)
        torch.testing.assert_close(w_on, w_off, rtol=1e-5, atol=1e-6)
        assert set(aux_on) == set(aux_off)
        for key in aux_off:
            torch.testing.assert_close(aux_on[key], aux_off[key], rtol=1e-5, atol=1e-6)


@cpu_only
def test_aux_losses_reach_router_and_predictor_as_in_megatrons_path(build_gpt):
    """The aux losses' gradient alone (LM loss scaled to zero) must match: it is all the predictor gets."""
    tokens = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ("off", "on"):
        _, model = build_gpt(f"--model.fused_layer={mode}", "--mod.router_init_std=0.5", seed=3)
        loss = model(tokens[:, :-1], torch.arange(32).expand(2, 32), None, labels=tokens[:, 1:]).mean()
        (loss * 0).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None and ("router" in n or "predictor" in n)}
    assert any("predictor" in n for n in grads["on"]) and any("router" in n for n in grads["on"])
    assert all(float(g.abs().max()) > 0 for g in grads["on"].values())
    for name, grad in grads["off"].items():
        torch.testing.assert_close(grads["on"][name], grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("extra,why", [
    (["--moe.num_experts=2"], "MoE"),
    (["--model.dropout=0.1"], "dropout"),
    (["--model.attention_backend=local"], "SDPA"),
], ids=["moe", "dropout", "local-attention"])
def test_layers_it_does_not_model_keep_megatrons_forward(build_gpt, extra, why):
    _, model = build_gpt(*extra)  # auto: such layers run megatron's forward
    layer = model.decoder.layers[0]
    assert why in layer.fused_why_not
    assert not layer.use_fused(torch.zeros(4, 1, 64), {})
    with pytest.raises(ValueError, match="model.fused_layer=on cannot fuse"):
        build_gpt("--model.fused_layer=on", *extra)


def test_auto_keeps_megatrons_forward_on_a_cpu_and_calls_it_models_nothing_of_fall_back(build_gpt):
    _, model = build_gpt()
    layer = model.decoder.layers[1]
    assert isinstance(layer, MoDTransformerLayer) and layer.fused_why_not is None
    x = torch.zeros(8, 1, 64)
    assert not layer.use_fused(x, {}) or CUDA  # auto fuses CUDA tensors only
    _, model = build_gpt("--model.fused_layer=on")
    layer = model.decoder.layers[1]
    assert layer.use_fused(x, {"attention_mask": None})
    assert not layer.use_fused(x, {"inference_context": object()})


def test_the_mode_is_validated():
    from mod_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="model.fused_layer must be auto, on or off"):
        load_config(None, TINY + ["--model.fused_layer=fast"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.compile with triton)")
@pytest.mark.parametrize("extra", [[], ["--model.normalization=RMSNorm", "--model.activation=swiglu",
                                        "--model.num_query_groups=2"]], ids=["gelu", "swiglu-gqa"])
def test_compiled_layers_equal_eager_ones_on_a_gpu(gpu_process, extra):
    """The compiled functions against the same functions run eagerly, bf16, dense and MoD layers."""
    from benchmarks.bench_block import rotary
    from mod_megatron.model import compiled as compiled_fns
    from mod_megatron.model import fused_layer, fused_mod
    from mod_megatron.model.predictor import set_aux_loss_scale

    set_aux_loss_scale(torch.ones(1, device="cuda"))
    layers = dense_and_mod_layers("--model.seq_length=512", *extra)
    S, B, H = 512, 2, 256
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.randn(S, B, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    cot = torch.randn(S, B, H, device="cuda", generator=gen)
    rope = rotary(S, H // 4, "cuda")
    results = {}
    for compiled in (False, True):
        compiled_fns._failed.clear()
        if not compiled:  # functions in _failed run eagerly
            compiled_fns._failed.update({fused_layer.block, fused_mod.routed_forward})
        h, dx, grads, aux = layer_stack_step(layers, x0, rope, cot)
        if compiled:  # weight grads in the weights' own layout (megatron's DDP adds them into main_grad)
            assert all(p.grad.is_contiguous() for layer in layers for p in layer.parameters())
        results[compiled] = (h.float(), dx.float(), {n: g.float() for n, g in grads.items()},
                             layers[1].last_routing.index.clone(), {k: v.float() for k, v in aux.items()})
    compiled_fns._failed.clear()
    eager, comp = results[False], results[True]
    assert torch.equal(eager[3], comp[3])
    torch.testing.assert_close(comp[0], eager[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(comp[1], eager[1], rtol=2e-2, atol=2e-2)
    for name, grad in eager[2].items():
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(comp[2][name] / scale, grad / scale, rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
    for key in eager[4]:
        torch.testing.assert_close(comp[4][key], eager[4][key], rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.compile with triton)")
def test_training_with_fused_layers_follows_megatrons_path(tmp_path):
    """The real Trainer (DDP, megatron optimizer, 2 micro-batches per step) with model.fused_layer=auto
    (compiled layers and megatron's fused cross entropy) against =off: the same losses step by step."""
    runs = tiny_trainer_runs(tmp_path, {mode: [f"--model.fused_layer={mode}"] for mode in ("off", "auto")})
    off, on = runs["off"]["losses"], runs["auto"]["losses"]
    assert len(off) == len(on) == 8 and len(set(on)) == 8  # the fused steps really update the weights
    for a, b in zip(off, on):
        assert abs(a - b) < 2e-2 * max(1.0, abs(a)), (off, on)


@pytest.mark.parametrize("extra,fused", [([], True), (["--train.device=cpu"], False),
                                         (["--model.fused_layer=off"], False)], ids=["gpu", "cpu-device", "off"])
def test_fused_cross_entropy_only_for_gpu_training_with_fused_layers(monkeypatch, extra, fused):
    from mod_megatron import platform
    from mod_megatron.model.gpt import transformer_config

    monkeypatch.setattr(platform, "cuda_available", lambda: True)  # as on a GPU machine
    tcfg = transformer_config(load_config(None, TINY + extra))
    assert tcfg.cross_entropy_loss_fusion is fused and tcfg.cross_entropy_fusion_impl == "native"
    monkeypatch.setattr(platform, "cuda_available", lambda: False)
    assert transformer_config(load_config(None, TINY + extra)).cross_entropy_loss_fusion is False


@cpu_only
def test_fused_functions_trace_as_one_graph_each(build_gpt, monkeypatch):
    """dynamo + AOTAutograd (the `aot_eager` backend: no compiler needed) trace the dense layer and the whole
    routed MoD forward, backward included, without a graph break, and give the eager functions' results."""
    tokens = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(0))
    traced = {}
    results = []
    for trace in (False, True):
        if trace:
            traced = trace_fused_functions(monkeypatch, "aot_eager")
        _, model = build_gpt("--model.fused_layer=on", "--mod.router_init_std=0.5", seed=0)
        loss = model(tokens[:, :-1], torch.arange(32).expand(2, 32), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert {f.__name__ for f in traced} == {"block", "routed_forward"}
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_token_sum_is_the_router_weight_gradient_and_a_well_formed_op():
    """The router weight's gradient op (model/fused_mod.py: token_sum) sums g[t] * x[t] over tokens, and
    passes torch.library's checks of a custom op (schema, fake shapes, autograd registration)."""
    from mod_megatron.model.fused_mod import token_sum

    x, g = torch.randn(37, 11, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    torch.testing.assert_close(token_sum(x, g), (g[:, None] * x).sum(0))
    torch.library.opcheck(token_sum, (x.float(), g.float()))
