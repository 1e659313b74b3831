"""training/optimizer_step.py: prepare() + finish() update the model exactly as megatron-core's own
optimizer.step() does (fp32 and bf16 mixed-precision optimizers, a ChainedOptimizer with expert
parameters, the distributed optimizer; clipping on, active, and off), and MicroBatches.prefetch()
hands out the same micro-batches in the same order."""
from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY, TINY_TRAINER, seed_all

from mod_megatron.training import fused_adam, optimizer_step

VARIANTS = {
    "fp32": [],
    "bf16 (GPU)": ["--train.precision=bf16"],  # megatron's bf16 optimizer wants CUDA tensors
    "moe (chained)": ["--moe.num_experts=4", "--moe.topk=2", "--moe.ffn_hidden_size=64"],
    "distributed optimizer": ["--train.distributed_optimizer=true"],
    # torch's fused AdamW (its CPU kernel here; on a GPU every variant above is fused already): an
    # active clip goes to the kernel as grad_scale instead of a pass over the gradients
    "fused adamw": ["--train.fused_optimizer=on"],
    "fused adamw, chained": ["--train.fused_optimizer=on", "--moe.num_experts=4", "--moe.topk=2",
                             "--moe.ffn_hidden_size=64"],
}


def _build(overrides, device):
    from mod_megatron.config import load_config
    from mod_megatron.training.builder import build_model_chunks, build_optimizer, param_dtype

    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    cfg = load_config(None, TINY + ["--train.weight_decay=0.1"] + overrides)
    get_moe_layer_wise_logging_tracker().clear()  # megatron's process-wide MoE loss log, sized by an earlier model
    seed_all(0)
    chunks, _ = build_model_chunks(cfg, device)
    optimizer, _ = build_optimizer(cfg, chunks, param_dtype(cfg, device))
    for group in optimizer.param_groups:
        group["lr"] = 1e-2  # the scheduler would start at 0
    return cfg, chunks, optimizer


def _backward(cfg, chunks, step: int, device):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g).to(device)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    model = chunks[0]
    positions = torch.arange(cfg.model.seq_length, device=device).expand(2, -1)
    losses = model(tokens, positions, None, labels=tokens.roll(-1, 1))
    losses.float().sum().backward()
    for chunk in chunks:  # as megatron's finalize_model_grads does after the schedule's last backward:
        chunk.finish_grad_sync()  # waits for the reductions the backward hooks launched (overlap_grad_reduce)


@pytest.fixture
def one_rank(request):
    """One process: NCCL on a GPU machine (as the benchmarks start it), else gloo with the CPU shims."""
    request.getfixturevalue("gpu_process" if torch.cuda.is_available() else "megatron_single_rank")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("clip", [1e-3, 1e4, 0.0], ids=["clipping", "norm-below-clip", "no-clip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prepare_and_finish_equal_megatrons_step(one_rank, variant, clip, monkeypatch):
    import torch.distributed as dist

    # On a GPU machine every variant runs on the GPU (megatron-core's optimizer assumes CUDA there).
    device = one_rank
    if "GPU" in variant and device.type != "cuda":
        pytest.skip("needs a GPU (run on the device)")
    if variant == "distributed optimizer" and device.type == "cuda" and dist.get_backend() != "nccl":
        pytest.skip("an earlier test started gloo, which cannot run these collectives on CUDA tensors")
    runs = []
    for mode in ("megatron", "split", "deferred"):
        cfg, chunks, optimizer = _build(VARIANTS[variant] + [f"--train.clip_grad={clip}"], device)
        fused = [bool(optimizer_step.fused_adams_stepping(part, part.get_parameters()))
                 for part in optimizer_step._parts(optimizer)]
        assert optimizer_step.deferrable(optimizer) == all(fused)
        if mode == "deferred" and not all(fused):
            continue  # the foreach kernel cannot clip or skip on the device
        initial = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
        norms, folded = [], False  # folded: clipped by the AdamW kernel (grad_scale)
        for step in range(3):
            optimizer.zero_grad()
            _backward(cfg, chunks, step, device)
            if mode == "deferred":  # clip from the norm on the device; a zero skip flag
                # wait=None (the trainer's call) resolves to wait=False where deferrable: both, on alternate steps
                prepared = optimizer_step.prepare(optimizer, wait=None if step % 2 else False)
                assert prepared.deferred and prepared.grad_norm is None
                assert optimizer_step.finish(optimizer, prepared, skip=torch.zeros(1, device=device)) is True
                folded = clip == 1e-3
                assert not any(hasattr(o, n) for o in fused_adam.torch_optimizers(optimizer)
                               for n in ("grad_scale", "found_inf"))
                norm = None if prepared.norm_sq is None else prepared.norm_sq.item() ** 0.5
            elif mode == "split":
                prepared = optimizer_step.prepare(optimizer)
                assert prepared.found_inf is False
                muls = _count_calls(monkeypatch, torch, "_foreach_mul_")
                assert optimizer_step.finish(optimizer, prepared) is True
                folded = clip == 1e-3 and all(fused)
                assert len(muls) == (clip == 1e-3 and not all(fused)) * len(fused), (muls, fused)
                assert not any(hasattr(o, "grad_scale") for o in fused_adam.torch_optimizers(optimizer))
                norm = prepared.grad_norm
            else:
                ok, norm, _ = optimizer.step()
                assert ok
            norms.append(norm)
        runs.append((norms, {n: p.detach().clone() for n, p in chunks[0].named_parameters()}, folded,
                     mode == "deferred"))
    assert len(runs) == (3 if all(fused) else 2)
    (want_norms, want, _, _), *others = runs
    for got_norms, got, folded, deferred in others:
        _check_same_update(want_norms, want, got_norms, got, folded, deferred, optimizer, clip, initial, variant)
    assert all(fused) == (device.type == "cuda" or "fused" in variant), fused


def _check_same_update(want_norms, want, got_norms, got, folded, deferred, optimizer, clip, initial, variant):
    chained = hasattr(optimizer, "chained_optimizers")
    if clip > 0 or chained:
        # exact, unless the clip was folded into AdamW (the params then differ by rounding after a step,
        # bf16 model params on a GPU by a whole bf16 step here and there)
        # (deferred: a ChainedOptimizer's parts' squared norms are summed in fp32 on the device, megatron
        # sums the parts' norms in Python floats: 1e-8 apart)
        rel = (1e-5 if next(iter(got.values())).dtype == torch.float32 else 1e-3) if folded else 1e-7 * deferred
        assert got_norms == pytest.approx(want_norms, rel=rel, abs=0)
        assert all(n > 0 for n in got_norms)
    else:  # megatron reports 0.0 (mixed precision) or None (fp32) without clipping: no norm is computed
        assert got_norms == [None] * 3
    if clip == 1e-3:
        assert all(n > clip for n in got_norms)  # the clipping branch ran
    for name, p in got.items():
        if folded:  # clipped in the AdamW kernel: g / (1/coeff) there, g * coeff in megatron's clip.
            # Rounding apart; Adam magnifies a gradient's rounding by up to lr/eps where it is near eps
            # (rarely seen embedding rows; clip=1e-3 puts the gradients there), so the bound is 1e-4 of one
            # lr=1e-2 update. bf16 model params (on a GPU) round such differences up to whole bf16 steps
            # (~5e-4 at 0.1): the bound is a tenth of an update, still far below a wrong clip's effect
            tol = {"rtol": 1e-5, "atol": 1e-6} if p.dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 1e-3}
            torch.testing.assert_close(p, want[name], **tol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(p, want[name]), name  # bit for bit
    assert sum(not torch.equal(p, initial[name]) for name, p in got.items()) > len(got) // 2  # the steps moved them
    parts = optimizer_step._parts(optimizer)
    assert (len(parts) > 1) == ("chained" in variant), [type(p).__name__ for p in parts]


def _count_calls(monkeypatch, owner, name: str) -> list:
    """Record each call of owner.name (then run it) in the returned list."""
    calls, original = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_prefetch_keeps_the_order():
    from mod_megatron.training.trainer import MicroBatches

    class Data:
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            t = torch.full((4,), i)
            return {"tokens": t, "labels": t + 1, "loss_mask": torch.ones(4), "position_ids": torch.arange(4)}

    plain = MicroBatches(Data(), 8, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp=2)
    eager = [next(plain)["tokens"][:, 0].tolist() for _ in range(5)]
    ahead = MicroBatches(Data(), 8, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp=2)
    got = []
    ahead.prefetch(2)
    assert len(ahead._ready) == 2
    got.append(next(ahead)["tokens"][:, 0].tolist())
    ahead.prefetch(2)  # tops up to 2, no more
    assert len(ahead._ready) == 2
    got += [next(ahead)["tokens"][:, 0].tolist() for _ in range(4)]
    assert got == eager == [[12, 13], [14, 15], [20, 21], [22, 23], [28, 29]]


def test_a_skip_flag_needs_fused_adamw(one_rank):
    """The foreach AdamW cannot clip or skip on device tensors: prepare(wait=False) and finish(skip=...)
    refuse rather than update."""
    cfg, chunks, optimizer = _build(["--train.fused_optimizer=off"], one_rank)
    _backward(cfg, chunks, 0, one_rank)
    before = [p.detach().clone() for p in chunks[0].parameters()]
    assert not optimizer_step.deferrable(optimizer)
    with pytest.raises(ValueError, match="fused AdamW"):
        optimizer_step.prepare(optimizer, wait=False)
    prepared = optimizer_step.prepare(optimizer, wait=None)  # waits here
    assert not prepared.deferred and prepared.norm_sq is None
    with pytest.raises(ValueError, match="fused AdamW"):
        optimizer_step.finish(optimizer, prepared, skip=torch.ones(1, device=one_rank))
    assert all(torch.equal(a, b) for a, b in zip(before, chunks[0].parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_steps_read_before_the_update_and_train_as_before():
    """A deferred step on a GPU copies out loss, flag and norm before its queued update and waits for that copy
    only: the same losses, norms and parameters as reading after the update, the update applied by the time
    the next step's work runs."""
    import json
    import subprocess
    import sys

    script = r'''
import json, sys, torch
sys.path.insert(0, ".")
from benchmarks.bench_model import random_token_trainer
with random_token_trainer("gpt-125m-mod", sys.argv[2:], 6) as (cfg, trainer, batches):
    trainer.read_before_update = sys.argv[1] == "1"
    outs, moved = [], []
    for _ in range(4):
        before = [p.detach().clone() for p in trainer.chunks[0].parameters()]
        outs.append(trainer.train_step(batches))
        moved.append(sum(not torch.equal(a, p) for a, p in zip(before, trainer.chunks[0].parameters())))
    params = torch.cat([p.detach().float().reshape(-1) for p in trainer.chunks[0].parameters()])
    print("RESULT " + json.dumps({"losses": [o["loss"] for o in outs], "norms": [o["grad_norm"] for o in outs],
                                  "skipped": [o["skipped"] for o in outs], "moved": moved,
                                  "checksum": float(params.double().sum()), "absum": float(params.double().abs().sum())}))
'''

    def run(early, *overrides):
        out = subprocess.run([sys.executable, "-c", script, "1" if early else "0", *TINY_TRAINER,
                              "--train.warmup_iters=0", *overrides], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])

    early, late = run(True), run(False)
    assert early["skipped"] == late["skipped"] == [False] * 4 and min(early["moved"]) > 0
    assert len(set(early["losses"])) == 4 and all(n > 0 for n in early["norms"])
    for key in ("losses", "norms"):
        assert early[key] == pytest.approx(late[key], rel=1e-5, abs=0), key
    assert early["checksum"] == pytest.approx(late["checksum"], rel=1e-5) and early["absum"] == pytest.approx(late["absum"], rel=1e-6)
