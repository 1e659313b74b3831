"""train.fused_optimizer (training/fused_adam.py): torch's fused AdamW kernel inside megatron-core's
optimizer. The kernels agree; a checkpoint resumes with the same or the other kernel and continues the
uninterrupted run's losses (single rank, and the distributed optimizer on 2 gloo ranks); on a GPU the
fused kernel keeps `step` on the device and a resumed run follows the straight one.

The GPU test is skipped without CUDA (CI); it ran on the device with `pytest tests/training/test_fused_adam.py`.
"""
from __future__ import annotations

import pytest
import torch
from test_train_cli import run_ranks, run_train, scalars

from mod_megatron.training import fused_adam

COMMON = ["--train.iters=8", "--train.eval_interval=0"]


class Wrapper:  # the shape of megatron's mixed-precision / distributed optimizer: .optimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


class Chained:  # megatron's ChainedOptimizer (e.g. dense + expert params): .chained_optimizers
    def __init__(self, chained):
        self.chained_optimizers = chained

    @property
    def optimizer(self):  # as megatron's: only valid with a single inner optimizer
        raise AssertionError("ChainedOptimizer has more than one optimizer when accessing self.optimizer")


def _adam(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (7, 33, 128)]
    return params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), **kw)


def _steps(params, opt, n=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_apply_picks_the_kernel_and_puts_step_where_it_belongs():
    params, opt = _adam()
    _steps(params, opt, 2)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    chained = Chained([Wrapper(opt), Wrapper(sgd)])
    assert list(fused_adam.torch_optimizers(chained)) == [opt, sgd]
    assert fused_adam.apply(chained, "auto") is False  # CPU parameters: auto keeps foreach
    assert fused_adam.kernel(chained) == "foreach" and fused_adam.kernel(Wrapper(sgd)) is None
    assert all(g["fused"] is False for g in opt.param_groups) and sgd.param_groups[0].get("fused") is None  # untouched
    for p in params:  # a restored `step` may come back as a float64 tensor or a number
        opt.state[p]["step"] = torch.tensor(2.0, dtype=torch.float64) if p.numel() > 7 else 2
    assert fused_adam.apply(chained, "on") is True and fused_adam.kernel(chained) == "fused"
    assert all(g["fused"] is True and g["foreach"] is False for g in opt.param_groups)
    assert all(opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 2.0 for p in params)
    assert fused_adam.apply(chained, "off") is False and all(g["foreach"] is None for g in opt.param_groups)


def test_fused_and_foreach_updates_agree():
    (pa, a), (pb, b) = _adam(), _adam()
    fused_adam.apply(Wrapper(b), "on")
    _steps(pa, a)
    _steps(pb, b)
    assert b.param_groups[0]["fused"] and not a.param_groups[0]["fused"]
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.state[x]["exp_avg_sq"], b.state[y]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def _losses(log_dir):
    return dict(scalars(log_dir, "train/loss"))


def test_resume_with_either_kernel_continues_the_run(tmp_path, prepared):
    """Straight runs with each kernel; split runs (stop at 4, resume) with the same and with the other kernel."""
    on, off = "--train.fused_optimizer=on", "--train.fused_optimizer=off"
    straight = {}
    for name, flag in (("on", on), ("off", off)):
        run_train(tmp_path, prepared, *COMMON, flag, run=f"straight-{name}")
        straight[name] = _losses(tmp_path / f"straight-{name}")
    first = run_train(tmp_path, prepared, *COMMON, on, "--train.exit_interval=4", run="on-on")
    assert "optimizer: AdamW, torch's fused kernel" in first.stdout
    run_train(tmp_path, prepared, *COMMON, on, run="on-on")
    run_train(tmp_path, prepared, *COMMON, off, "--train.exit_interval=4", run="off-on")
    second = run_train(tmp_path, prepared, *COMMON, on, run="off-on")
    assert "iteration 4" in second.stdout and "torch's fused kernel" in second.stdout
    run_train(tmp_path, prepared, *COMMON, on, "--train.exit_interval=4", run="on-off")
    third = run_train(tmp_path, prepared, *COMMON, run="on-off")  # auto: foreach on a CPU
    assert "iteration 4" in third.stdout and "torch's foreach kernel" in third.stdout
    diff = lambda a, b: max(abs(a[i] - b[i]) for i in range(5, 9))  # noqa: E731
    assert diff(straight["on"], straight["off"]) <= 1e-5  # the kernels may round differently, barely
    assert diff(_losses(tmp_path / "on-on"), straight["on"]) <= 1e-6
    assert diff(_losses(tmp_path / "off-on"), straight["on"]) <= 1e-5
    assert diff(_losses(tmp_path / "on-off"), straight["off"]) <= 1e-5


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_distributed_optimizer_resumes(tmp_path, prepared, mode):
    """2 gloo ranks, megatron's distributed optimizer (sharded AdamW state), fused and (auto on a CPU)
    foreach: saved in megatron's 'fully_reshardable' form and resumed, the losses continue the straight
    run's. (megatron-core restores one `step` tensor shared by a rank's parameters; unshared by
    fused_adam.apply, else the steps after the resume drift by ~1e-2.)"""
    flags = [*COMMON, "--train.micro_batch_size=4", "--train.distributed_optimizer=true",
             f"--train.fused_optimizer={mode}"]
    straight = _losses(run_ranks(tmp_path, prepared, "straight", *flags))
    run_ranks(tmp_path, prepared, "split", *flags, "--train.exit_interval=4")
    resumed = _losses(run_ranks(tmp_path, prepared, "split", *flags))
    assert sorted(resumed) == list(range(1, 9))
    assert max(abs(resumed[i] - straight[i]) for i in range(5, 9)) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_step_lives_on_the_device_and_resume_follows_the_straight_run(tmp_path):
    import subprocess
    import sys

    script = r'''
import json, sys, tempfile, torch
sys.path.insert(0, ".")
from benchmarks.bench_model import RandomTokens
from mod_megatron.config import load_config
from mod_megatron.training import fused_adam
from mod_megatron.training.distributed import initialize, shutdown
from mod_megatron.training.trainer import Trainer
ckpt, mode, exit_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config("configs/gpt-125m-mod.yaml", ["--model.num_layers=4", "--model.hidden_size=256",
    "--model.num_attention_heads=4", "--model.seq_length=256", "--model.vocab_size=512", "--model.fused_layer=off",
    "--train.micro_batch_size=4", "--train.global_batch_size=8", "--train.iters=8", "--train.eval_iters=0",
    f"--train.fused_optimizer={mode}", f"--train.exit_interval={exit_at}", f"--checkpoint.dir={ckpt}",
    f"--logging.dir={ckpt}/log", "--logging.tensorboard=false", "--logging.progress_bar=false"])
layout = initialize(cfg)
trainer = Trainer(cfg, layout, RandomTokens(256, 512, 0), None, None)
start = trainer.iteration
summary = trainer.run()
opts = list(fused_adam.torch_optimizers(trainer.optimizer))
steps = {str(s["step"].device) for o in opts for s in o.state.values()}
fused = all(g["fused"] for o in opts for g in o.param_groups)
print("RESULT " + json.dumps({"start": start, "losses": [h["loss"] for h in trainer.history],
      "step_devices": sorted(steps), "fused": fused}))
shutdown()
'''

    def run(ckpt, mode, exit_at=0):
        out = subprocess.run([sys.executable, "-c", script, str(ckpt), mode, str(exit_at)], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        import json
        return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])

    straight = run(tmp_path / "straight", "auto")
    assert straight["fused"] and straight["step_devices"] == ["cuda:0"]
    first = run(tmp_path / "split", "off", exit_at=4)  # foreach: step on the CPU in the checkpoint
    assert not first["fused"] and first["step_devices"] == ["cpu"]
    resumed = run(tmp_path / "split", "auto")
    assert resumed["start"] == 4 and resumed["fused"] and resumed["step_devices"] == ["cuda:0"]
    again = run(tmp_path / "same", "auto", exit_at=4)
    same = run(tmp_path / "same", "auto")
    assert same["start"] == 4 and len(same["losses"]) == 4 and again["step_devices"] == ["cuda:0"]
    tail = straight["losses"][4:]
    assert max(abs(a - b) for a, b in zip(same["losses"], tail)) <= 2e-3, (same["losses"], tail)  # bf16
    assert max(abs(a - b) for a, b in zip(resumed["losses"], tail)) <= 2e-2, (resumed["losses"], tail)


def test_distributed_optimizer_checkpoint_reshards_to_one_rank(tmp_path, prepared):
    """The 'fully_reshardable' form: 2-rank distributed-optimizer state resumes on 1 rank and continues the
    2-rank run (fp32 sums in another order: within 2e-4, as test_reshard_resume). Resuming it without the
    distributed optimizer is refused with one line that names the fix."""
    flags = [*COMMON, "--train.micro_batch_size=4", "--train.distributed_optimizer=true"]
    straight = _losses(run_ranks(tmp_path, prepared, "straight", *flags))
    run_ranks(tmp_path, prepared, "split", *flags, "--train.exit_interval=4")
    refused = run_train(tmp_path, prepared, *COMMON, run="split", check=False)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--train.distributed_optimizer=true" in last, refused.stderr[-2000:]
    resumed = _losses(run_ranks(tmp_path, prepared, "split", *COMMON, "--train.micro_batch_size=8",
                                "--train.distributed_optimizer=true", nproc=1))
    assert sorted(resumed) == list(range(1, 9))
    assert max(abs(resumed[i] - straight[i]) for i in range(5, 9)) <= 2e-4
