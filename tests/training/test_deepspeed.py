"""train.engine=deepspeed: ZeRO-1/2 with DP=2 match the megatron engine; DeepSpeed checkpoints resume.

Real 2-process gloo runs of `python -m mod_megatron.training.cli` (the way torchrun would start
them), compared through their TensorBoard event files.
"""
from __future__ import annotations

import os
import subprocess
import sys

from test_train_cli import run_ranks, run_train, scalars

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--train.iters=6", "--train.eval_interval=0", "--train.eval_iters=1", "--train.micro_batch_size=4"]


def test_zero1_and_zero2_match_megatron_engine_dp2(tmp_path, prepared):
    ref = dict(scalars(run_ranks(tmp_path, prepared, "megatron", *COMMON), "train/loss"))
    assert sorted(ref) == list(range(1, 7))
    # ZeRO-2 also in 20k-element buckets: many reductions overlapped with the backward (overlap_comm)
    for stage, extra in ((1, ()), (2, ()), (2, ("--parallel.bucket_size=20000",))):
        log = run_ranks(tmp_path, prepared, f"zero{stage}{'-buckets' if extra else ''}", *COMMON,
                        "--train.engine=deepspeed", f"--train.zero_stage={stage}", *extra)
        got = dict(scalars(log, "train/loss"))
        assert sorted(got) == sorted(ref)
        diff = max(abs(got[i] - ref[i]) for i in ref)
        assert diff <= 1e-4, (stage, diff, got, ref)
        assert (log / "ckpt" / "iter_0000006" / "mp_rank_00_model_states.pt").is_file()


def test_deepspeed_checkpoint_resumes_exactly(tmp_path, prepared, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    common = [*COMMON, "--train.iters=8", "--train.engine=deepspeed"]
    run_train(tmp_path, prepared, *common, run="straight")
    run_train(tmp_path, prepared, *common, "--train.exit_interval=4", run="split")
    second = run_train(tmp_path, prepared, *common, run="split")
    assert "resumed from" in second.stdout and "iter_0000004" in second.stdout
    straight = dict(scalars(tmp_path / "straight", "train/loss"))
    split = dict(scalars(tmp_path / "split", "train/loss"))
    assert sorted(split) == sorted(straight) == list(range(1, 9))
    assert max(abs(straight[i] - split[i]) for i in straight) <= 1e-6


def test_engines_refuse_each_others_checkpoints(tmp_path, prepared):
    run_train(tmp_path, prepared, *COMMON, "--train.iters=2", run="r")
    proc = run_train(tmp_path, prepared, *COMMON, "--train.iters=4", "--train.engine=deepspeed", run="r", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "megatron engine" in err[0], proc.stderr


def test_from_deepspeed_gives_the_same_weights_and_resumes_with_megatron(tmp_path, prepared, megatron_single_rank,
                                                                         monkeypatch):
    import torch

    from mod_megatron.convert.deepspeed import _config_from_meta, consolidated_fp32_state_dict, from_deepspeed
    from mod_megatron.model.gpt import build_model, transformer_config
    from mod_megatron.training import checkpoint as ckpt

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_train(tmp_path, prepared, *COMMON, "--train.iters=4", "--train.engine=deepspeed", "--train.zero_stage=2",
              run="ds")
    ds_dir = tmp_path / "ds" / "ckpt" / "iter_0000004"
    out = from_deepspeed(str(ds_dir), str(tmp_path / "native"))
    assert (tmp_path / "native" / "latest").read_text().strip() == "4"
    meta = ckpt.read_meta(out)
    assert meta["model_only"] and meta["consumed_samples"] == 4 * 8
    ref = consolidated_fp32_state_dict(str(ds_dir), 2)
    model = build_model(_config_from_meta(meta), transformer_config(_config_from_meta(meta)))
    ckpt.load(out, [model])
    params = dict(model.named_parameters())
    assert params and all(torch.equal(p.detach(), ref[name]) for name, p in params.items())
    # The converted checkpoint continues with the megatron engine (fresh optimizer, same schedule/data).
    proc = run_train(tmp_path, prepared, *COMMON, "--train.iters=6", f"--checkpoint.dir={tmp_path / 'native'}",
                     run="cont")
    assert "resumed from" in proc.stdout and "iter_0000004" in proc.stdout
    assert "iter      5/6" in proc.stdout and "done: iteration 6" in proc.stdout


def test_from_deepspeed_refuses_a_megatron_checkpoint(tmp_path, prepared):
    run_train(tmp_path, prepared, *COMMON, "--train.iters=2", run="m")
    proc = subprocess.run([sys.executable, "-m", "mod_megatron.convert.cli", "from-deepspeed", "--checkpoint",
                           str(tmp_path / "m" / "ckpt" / "iter_0000002"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not a DeepSpeed checkpoint" in err[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_gradient_reduction_settings_reach_zero():
    """parallel.overlap_grad_reduce -> ZeRO's overlap_comm (on by default, as for megatron's DDP);
    parallel.bucket_size -> reduce_bucket_size (DeepSpeed's default when null)."""
    import torch

    from mod_megatron.config import load_config
    from mod_megatron.training.ds_engine import ds_config

    zero = ds_config(load_config(None, ["--train.engine=deepspeed"]), torch.float32, 1)["zero_optimization"]
    assert zero["overlap_comm"] is True and "reduce_bucket_size" not in zero
    zero = ds_config(load_config(None, ["--train.engine=deepspeed", "--parallel.overlap_grad_reduce=false",
                                        "--parallel.bucket_size=5000"]), torch.float32, 1)["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["reduce_bucket_size"] == 5000
