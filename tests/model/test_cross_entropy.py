"""The fused language-model loss (model/cross_entropy.py): per-token values and logit gradients equal
PyTorch's cross entropy; a GPT taking it gives megatron-core's loss and gradients; it stays off with
tensor parallelism; and on a GPU, compiled from bf16 logits, it matches an fp32 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mod_megatron.model.cross_entropy import cross_entropy

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("shape", [(5, 3, 11), (1, 1, 2), (7, 2, 1000)], ids=str)
def test_loss_and_gradient_equal_pytorchs(shape):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 4).requires_grad_()
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    weight = torch.rand(shape[:-1], generator=g)  # a loss mask's weights
    loss = cross_entropy(logits, target)
    (grad,) = torch.autograd.grad((loss * weight).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, shape[-1]), target.reshape(-1), reduction="none").view(shape[:-1])
    (ref_grad,) = torch.autograd.grad((ref * weight).sum(), ref_logits)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def _loss_and_grads(model, tokens):
    labels = torch.roll(tokens, -1, 1)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, pos, None, labels=labels)
    grads = torch.autograd.grad(loss.sum(), [p for p in model.parameters() if p.requires_grad])
    return loss, grads


@pytest.mark.skipif(CUDA, reason="CPU: megatron's unfused loss in fp32 is the reference")
def test_a_gpt_with_it_gives_megatrons_loss_and_gradients(build_gpt):
    from mod_megatron.model.gpt import build_model, transformer_config

    cfg, reference = build_gpt(seed=0)
    assert not reference.config.cross_entropy_loss_fusion  # a CPU run: megatron's vocab-parallel loss
    torch.manual_seed(0)
    fused = build_model(cfg, transformer_config(cfg, cross_entropy_loss_fusion=True))
    fused.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 100, (3, 33), generator=torch.Generator().manual_seed(1))
    (loss, grads), (ref_loss, ref_grads) = _loss_and_grads(fused, tokens), _loss_and_grads(reference, tokens)
    assert loss.shape == ref_loss.shape == tokens.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_tensor_parallel_logits_keep_megatrons_loss(monkeypatch, build_gpt):
    """Logits sharded over the vocabulary need megatron's all-reduces: the override steps aside."""
    from megatron.core.models.gpt import GPTModel

    from mod_megatron.model import gpt

    _, model = build_gpt(seed=0)
    calls = []
    monkeypatch.setattr(GPTModel, "compute_language_model_loss", lambda self, labels, logits: calls.append(1))
    monkeypatch.setattr(gpt, "cross_entropy", lambda *a: pytest.fail("fused loss used with TP > 1"))
    model.config.cross_entropy_loss_fusion, model.config.tensor_model_parallel_size = True, 2
    model.compute_language_model_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, 5))
    assert calls == [1]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled)")
def test_compiled_from_bf16_logits_matches_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(512, 4, 8192, device="cuda", generator=g) * 3).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 8192, (512, 4), device="cuda", generator=g)
    loss = cross_entropy(logits, target)
    (grad,) = torch.autograd.grad(loss.mean(), logits)
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 8192), target.view(-1), reduction="none").view(512, 4)
    (ref_grad,) = torch.autograd.grad(ref.mean(), ref_logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())
