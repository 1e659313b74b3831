"""Grouped-GEMM experts (mod_megatron/moe/grouped.py) equal megatron's SequentialMLP loop.

On a CPU torch runs `_grouped_mm` too, so `moe.grouped_gemm=on` is compared with `off` (megatron's
loop over experts) on the same parameters: the experts' outputs and the gradients of their input,
their router probabilities and every expert weight, with an expert that receives no token; then a
whole staged-MoDE model's loss and gradients. The expert-parallel run with grouped experts against the
single-rank loop is in tests/moe/test_moe_equivalence.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mod_megatron.moe.grouped import GroupedExperts, unsupported_reason

STAGED = ["--moe.num_experts=4", "--moe.topk=2", "--moe.ffn_hidden_size=48", "--train.precision=fp32"]


def _moe_layer(cfg):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mod_megatron.model.gpt import transformer_config
    from mod_megatron.moe.spec import moe_mlp_spec

    return MoELayer(config=transformer_config(cfg), submodules=moe_mlp_spec(cfg).submodules, layer_number=1)


def _experts_step(experts, x, counts, probs, cot):
    x = x.detach().clone().requires_grad_(True)
    probs = probs.detach().clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out, bias = experts(x, counts, probs)
    assert bias is None
    (out.float() * cot).sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    return out.detach(), x.grad, probs.grad, grads


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = [pytest.param(torch.float32, "cpu", id="fp32-cpu"), pytest.param(torch.bfloat16, "cpu", id="bf16-cpu"),
         pytest.param(torch.bfloat16, "cuda", id="bf16-cuda", marks=CUDA)]  # CUTLASS's grouped kernels on sm90


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype,device", CASES)
def test_grouped_experts_equal_megatrons_loop(megatron_single_rank, activation, dtype, device):
    from mod_megatron.config import load_config
    from tests.conftest import TINY, seed_all

    cfg = load_config(None, TINY + ["--mod.enabled=false", "--moe.num_experts=4", "--moe.ffn_hidden_size=48",
                                    f"--model.activation={activation}", "--moe.grouped_gemm=on"])
    seed_all(0)  # megatron initialises the experts with its expert-parallel RNG where CUDA is present
    experts = _moe_layer(cfg).experts.to(device=device, dtype=dtype)
    assert isinstance(experts, GroupedExperts) and experts.mode == "on"
    counts = torch.tensor([7, 0, 12, 5])  # expert 1 gets no token; counts stay on the host, as megatron's
    g = torch.Generator().manual_seed(1)
    x = torch.randn(int(counts.sum()), cfg.model.hidden_size, generator=g).to(device, dtype)
    probs = torch.rand(int(counts.sum()), generator=g).to(device)  # fp32, as megatron's router gives them
    cot = torch.randn(int(counts.sum()), cfg.model.hidden_size, generator=g).to(device)
    if device == "cuda" and torch.cuda.get_device_capability() >= (9, 0):
        experts.mode = "auto"
        assert experts.uses_grouped(x)  # auto takes the grouped path on bf16 sm90+ tensors

    grouped = _experts_step(experts, x, counts, probs, cot)
    experts.mode = "off"  # megatron's SequentialMLP.forward, same parameters
    loop = _experts_step(experts, x, counts, probs, cot)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for name, a, b in zip(["output", "input grad", "probs grad"], grouped[:3], loop[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
    assert set(grouped[3]) == set(loop[3]) and len(loop[3]) == 8  # fc1 and fc2 of 4 experts
    for name, gl in loop[3].items():
        gg = grouped[3][name]
        assert gg.is_contiguous() and gg.shape == gl.shape, name  # [out, in] like the weight
        torch.testing.assert_close(gg.float(), gl.float(), **tol, msg=name)
    assert torch.count_nonzero(loop[3]["local_experts.1.linear_fc1.weight"]) == 0  # no token: zero gradient
    assert torch.count_nonzero(grouped[3]["local_experts.1.linear_fc1.weight"]) == 0
    assert torch.count_nonzero(loop[3]["local_experts.0.linear_fc2.weight"]) > 0


def test_staged_mode_model_equal_with_and_without_grouped_experts(megatron_single_rank, build_gpt):
    runs = {}
    for mode in ("on", "off"):
        cfg, model = build_gpt(*STAGED, f"--moe.grouped_gemm={mode}", seed=4)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length),
                               generator=torch.Generator().manual_seed(6))
        position_ids = torch.arange(cfg.model.seq_length).expand(2, -1)
        model.train()
        loss = model(tokens, position_ids, None, labels=tokens).float().mean()
        loss.backward()
        runs[mode] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        used = [m.uses_grouped(torch.zeros(1)) for m in model.modules() if isinstance(m, GroupedExperts)]
        assert used and all(u == (mode == "on") for u in used)
    (loss_on, grads_on), (loss_off, grads_off) = runs["on"], runs["off"]
    assert abs(loss_on - loss_off) <= 1e-6
    assert set(grads_on) == set(grads_off) and any(".experts." in n for n in grads_on)
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_auto_keeps_cpu_tensors_on_megatrons_loop(megatron_single_rank, build_gpt):
    cfg, model = build_gpt(*STAGED, seed=0)
    assert cfg.moe.grouped_gemm == "auto"
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    assert experts and not any(m.uses_grouped(torch.zeros(2, 2, dtype=torch.bfloat16)) for m in experts)


def test_configs_the_path_does_not_model_are_refused_or_left_on_the_loop(megatron_single_rank):
    from mod_megatron.config import ConfigError, load_config
    from mod_megatron.model.gpt import transformer_config

    cfg = load_config(None, ["--moe.num_experts=4", "--moe.ffn_hidden_size=48"])
    ours = transformer_config(cfg)
    assert unsupported_reason(ours) is None
    biased = dataclasses.replace(ours, add_bias_linear=True)
    assert unsupported_reason(biased) == "expert biases"
    assert unsupported_reason(dataclasses.replace(ours, moe_ffn_hidden_size=44)) == "widths not a multiple of 8"
    with pytest.raises(ValueError, match="moe.grouped_gemm=on can't model expert biases"):
        GroupedExperts(2, biased, _submodules(cfg), pg_collection=_pgs(), mode="on")
    auto = GroupedExperts(2, biased, _submodules(cfg), pg_collection=_pgs(), mode="auto")
    assert auto.mode == "off"
    with pytest.raises(ConfigError, match="moe.grouped_gemm must be auto, on or off"):
        load_config(None, ["--moe.num_experts=4", "--moe.grouped_gemm=fast"])


def _submodules(cfg):
    from mod_megatron.moe.spec import moe_mlp_spec

    return moe_mlp_spec(cfg).submodules.experts.submodules


def _pgs():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()
