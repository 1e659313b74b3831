"""A checkpoint saved at one parallel layout resumes at another (dist-checkpoint resharding).

TP=2 -> TP=1 and TP=1 -> PP=2: the resumed run continues the loss curve of the uninterrupted run
at the first layout (tolerance 2e-4: TP and PP change the fp32 summation order, and 4 Adam steps
amplify that; measured differences are ~1e-5).
"""
from __future__ import annotations

from test_train_cli import run_ranks, scalars

COMMON = ["--train.iters=8", "--train.eval_interval=0", "--train.eval_iters=1", "--train.micro_batch_size=4"]
TOL = 2e-4


def _losses(log_dir):
    return dict(scalars(log_dir, "train/loss"))


def test_tp2_checkpoint_resumes_at_tp1(tmp_path, prepared):
    straight = _losses(run_ranks(tmp_path, prepared, "straight", *COMMON, "--parallel.tp=2"))
    run_ranks(tmp_path, prepared, "split", *COMMON, "--parallel.tp=2", "--train.exit_interval=4")
    resumed = _losses(run_ranks(tmp_path, prepared, "split", *COMMON, "--parallel.tp=1",
                                "--train.micro_batch_size=8", nproc=1))
    assert sorted(resumed) == list(range(1, 9))
    diffs = {i: abs(resumed[i] - straight[i]) for i in range(5, 9)}
    assert max(diffs.values()) <= TOL, diffs


def test_tp1_checkpoint_resumes_at_pp2(tmp_path, prepared):
    straight = _losses(run_ranks(tmp_path, prepared, "straight", *COMMON, "--train.micro_batch_size=8", nproc=1))
    run_ranks(tmp_path, prepared, "split", *COMMON, "--train.micro_batch_size=8", "--train.exit_interval=4", nproc=1)
    resumed = _losses(run_ranks(tmp_path, prepared, "split", *COMMON, "--parallel.pp=2"))
    diffs = {i: abs(resumed[i] - straight[i]) for i in range(5, 9)}
    assert max(diffs.values()) <= TOL, diffs
