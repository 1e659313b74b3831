"""model.fused_wgrad (model/wgrad.py): the fused layer's GEMMs add weight gradients into megatron-core
DDP's fp32 main_grad, and DDP ends with the same main_grad as when its hook adds autograd's gradients.

On a CPU the fused layer runs eagerly (`model.fused_layer=on`, fp32); on a GPU it is compiled, in bf16,
where the fused GEMM accumulates in fp32 and autograd's way rounds each weight gradient to bf16 first.
The GPU test of the CUDA graphs (tests/training/test_cuda_graphs.py) covers the GEMMs inside graphs.
"""
from __future__ import annotations

import pytest
import torch

from mod_megatron.config import load_config
from mod_megatron.model.wgrad import FUSED, fused_into_main_grad, main_grad_of, wgrad_into_main_grad
from tests.conftest import TINY, seed_all, trace_fused_functions

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LINEAR = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("write", [False, True], ids=["add", "write"])
def test_the_op_adds_or_writes_grad_t_x_into_main_grad(device, dtype, write):
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(7, 3, 5, generator=gen).to(device, dtype)  # [s, b, out] of odd sizes
    x = torch.randn(7, 3, 11, generator=gen).to(device, dtype)  # [s, b, in]
    main_grad = torch.randn(5, 11, generator=gen).to(device)
    want = (0 if write else main_grad) + grad.reshape(-1, 5).float().t() @ x.reshape(-1, 11).float()
    if write:
        main_grad.fill_(float("nan"))  # a write never reads it
    buffer = main_grad.data_ptr()
    wgrad_into_main_grad(main_grad, grad, x, write)
    assert main_grad.data_ptr() == buffer and main_grad.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the CPU fallback rounds the GEMM's output
    torch.testing.assert_close(main_grad, want, rtol=tol, atol=tol)


def _ddp_like(weight: torch.nn.Parameter, dtype=torch.float32) -> torch.nn.Parameter:
    weight.main_grad = torch.zeros(weight.shape, dtype=dtype)
    weight.grad_added_to_main_grad = False
    return weight


def test_only_weights_of_megatron_ddp_with_fp32_main_grad_are_claimed():
    plain = torch.nn.Parameter(torch.zeros(4, 3))
    assert main_grad_of(plain, True) is None
    no_flag = torch.nn.Parameter(torch.zeros(4, 3))
    no_flag.main_grad = torch.zeros(4, 3)
    assert main_grad_of(no_flag, True) is None  # a main_grad without DDP's hook contract
    assert main_grad_of(_ddp_like(torch.nn.Parameter(torch.zeros(4, 3)), torch.bfloat16), True) is None
    w = _ddp_like(torch.nn.Parameter(torch.zeros(4, 3)))
    assert main_grad_of(w, False) is None and not fused_into_main_grad(w)  # model.fused_wgrad=false
    with torch.no_grad():
        assert main_grad_of(w, True) is None  # no backward to come
    assert not w.grad_added_to_main_grad and not fused_into_main_grad(w)
    assert main_grad_of(w, True) is w.main_grad
    assert w.grad_added_to_main_grad and fused_into_main_grad(w) and getattr(w, FUSED)


def test_the_op_finds_the_claimed_main_grad_by_the_weights_address_and_nothing_else():
    import gc

    from mod_megatron.model.wgrad import wgrad_of_weight

    w = _ddp_like(torch.nn.Parameter(torch.zeros(5, 11)))
    grad, x = torch.ones(7, 5), torch.ones(7, 11)
    with pytest.raises(RuntimeError, match="fused_wgrad=false"):
        wgrad_of_weight(torch.nn.Parameter(torch.zeros(5, 11)), grad, x)  # never claimed
    assert main_grad_of(w, True) is w.main_grad
    placeholder = wgrad_of_weight(w, grad, x)
    assert placeholder.shape == w.shape and placeholder.data_ptr() != w.main_grad.data_ptr()
    torch.testing.assert_close(w.main_grad, torch.full((5, 11), 7.0))  # 7 tokens of 1 x 1
    del w.main_grad
    gc.collect()
    with pytest.raises(RuntimeError, match="fused_wgrad=false"):  # the table does not keep it alive
        wgrad_of_weight(w, grad, x)


def test_a_steps_first_backward_writes_and_every_other_adds():
    """The forward that finds DDP's flag reset (zero_grad_buffer) makes its backward write, once; a forward
    after it, or main_grad_mode("add"), adds; main_grad_mode("write") writes whatever the flag says."""
    from mod_megatron.model.wgrad import main_grad_mode, wgrad_of_weight

    w = _ddp_like(torch.nn.Parameter(torch.zeros(5, 11)))
    grad, x = torch.ones(7, 5), torch.ones(7, 11)
    w.main_grad.fill_(100.0)  # not zeroed: shows which backward wrote
    assert main_grad_of(w, True) is w.main_grad  # the flag was False: this forward is the step's first
    wgrad_of_weight(w, grad, x)
    torch.testing.assert_close(w.main_grad, torch.full((5, 11), 7.0))
    wgrad_of_weight(w, grad, x)  # a second backward of the same forward adds
    torch.testing.assert_close(w.main_grad, torch.full((5, 11), 14.0))
    main_grad_of(w, True)  # the flag is set now: a later micro-batch
    wgrad_of_weight(w, grad, x)
    torch.testing.assert_close(w.main_grad, torch.full((5, 11), 21.0))
    w.grad_added_to_main_grad = False  # zero_grad_buffer's reset, without its zeroing
    main_grad_of(w, True)
    with main_grad_mode("add"):
        wgrad_of_weight(w, grad, x)
    torch.testing.assert_close(w.main_grad, torch.full((5, 11), 28.0))
    with main_grad_mode("write"):
        wgrad_of_weight(w, grad, x)
    torch.testing.assert_close(w.main_grad, torch.full((5, 11), 7.0))
    with pytest.raises(ValueError, match="not one of"):
        with main_grad_mode("overwrite"):
            pass


def _ddp_step(megatron_single_rank, fused_wgrad: bool, *extra, poison: bool = False):
    """Two micro-batches through a DDP-wrapped tiny MoD GPT on the fused path; (main grads, parameters).
    poison: after zero_grad_buffer, NaN in the main_grads of the weights whose GEMMs should write them."""
    from mod_megatron.training.builder import build_model_chunks

    cfg = load_config(None, TINY + ["--model.fused_layer=on", f"--model.fused_wgrad={str(fused_wgrad).lower()}",
                                    "--mod.router_init_std=0.5", "--parallel.bucket_size=4096", *extra])
    seed_all(0)
    (ddp,), _ = build_model_chunks(cfg, torch.device(DEVICES[-1]))
    gen = torch.Generator().manual_seed(1)
    ddp.zero_grad_buffer()
    if poison:
        for name, p in ddp.module.named_parameters():
            if name.startswith("decoder.layers.") and name.endswith(LINEAR):
                p.main_grad.fill_(float("nan"))
    for _ in range(2):  # gradient accumulation: the second micro-batch adds to the first
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length + 1), generator=gen).to(DEVICES[-1])
        positions = torch.arange(cfg.model.seq_length, device=DEVICES[-1]).expand(2, -1)
        ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean().backward()
    ddp.finish_grad_sync()
    params = dict(ddp.module.named_parameters())
    assert all(p.grad is None for p in params.values())  # DDP's hook took (or dropped) every gradient
    return {n: p.main_grad.clone() for n, p in params.items()}, params


@pytest.mark.parametrize("extra", [[], ["--parallel.overlap_grad_reduce=false"], ["--mod.enabled=false"]],
                         ids=["overlapped-reduction", "reduction-after", "dense"])
def test_ddp_main_grads_equal_with_and_without_the_fused_weight_gradients(megatron_single_rank, extra):
    """The first micro-batch's GEMMs write (NaN left in their main_grads shows any that would add), the
    second's add."""
    want, unfused = _ddp_step(megatron_single_rank, False, *extra)
    got, fused = _ddp_step(megatron_single_rank, True, *extra, poison=True)
    claimed = {n for n, p in fused.items() if fused_into_main_grad(p)}
    assert claimed == {n for n in fused if n.startswith("decoder.layers.") and n.endswith(LINEAR)}
    assert len(claimed) == 4 * 4 and not any(fused_into_main_grad(p) for p in unfused.values())
    bf16 = next(iter(fused.values())).dtype == torch.bfloat16  # on a GPU
    for name, grad in want.items():
        assert float(grad.abs().max()) > 0, name
        tol = dict(rtol=2e-2, atol=2e-2 * float(grad.abs().max())) if bf16 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[name], grad, **tol, msg=lambda m: f"{name}: {m}")


def test_compiled_layers_add_into_main_grad_without_copying_it(megatron_single_rank, monkeypatch):
    """Traced by dynamo + AOTAutograd (`aot_eager`: no compiler needed), the fused functions still add every
    claimed weight's gradient into its main_grad, and their graphs hold no `copy_`: no main_grad enters
    them (model/wgrad.py), so nothing is functionalised and written back (on a GPU those copies cost 1.7 ms
    a step in the 368M MoD model)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    want, _ = _ddp_step(megatron_single_rank, False)
    traced = trace_fused_functions(monkeypatch, aot_autograd(fw_compiler=keep, bw_compiler=keep))
    got, fused = _ddp_step(megatron_single_rank, True)
    assert {f.__name__ for f in traced} == {"block", "routed_forward"} and len(graphs) >= 4  # fwd + bwd each
    assert sum(fused_into_main_grad(p) for p in fused.values()) == 4 * 4
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "mod_megatron.wgrad_of_weight.default" in ops
    assert not [op for op in ops if "copy_" in op or "auto_functionalized" in op]
    bf16 = next(iter(fused.values())).dtype == torch.bfloat16  # on a GPU
    for name, grad in want.items():
        tol = dict(rtol=2e-2, atol=2e-2 * float(grad.abs().max())) if bf16 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[name], grad, **tol, msg=lambda m: f"{name}: {m}")


def test_the_option_is_a_boolean():
    from mod_megatron.config import ConfigError

    assert load_config(None, TINY).model.fused_wgrad is True  # on by default (docs/benchmarks.md, fourteenth session)
    with pytest.raises(ConfigError):
        load_config(None, TINY + ["--model.fused_wgrad=sometimes"])
