"""launch/slurm/pretrain.sbatch on a real one-node Slurm (munged + slurmctld + slurmd on localhost).

Each test submits the batch script as a user would (sbatch, --chdir=repo root, the job inheriting an
environment whose PATH starts with this venv's bin), with a tiny CPU model, 2 processes on the node
(DP=2) and the session's prepared corpus. Skips only when the Slurm/munge programs are not installed
(CI installs them: apt-get install slurmctld slurmd slurm-client munge).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

from slurm_cluster import TERMINAL_STATES, SlurmCluster, missing_binaries

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(REPO, "launch", "slurm", "pretrain.sbatch")

_missing = missing_binaries()
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"Slurm not installed (missing {', '.join(_missing)}): "
                           "apt-get install slurmctld slurmd slurm-client munge")

TINY = ["--model.num_layers=4", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--model.seq_length=64", "--mod.capacity=0.25", "--train.micro_batch_size=4",
        "--train.global_batch_size=8", "--train.warmup_iters=2", "--train.eval_interval=0",
        "--train.eval_iters=2", "--logging.log_interval=1", "--logging.progress_bar=false"]


@pytest.fixture(scope="session")
def slurm():
    cluster = SlurmCluster.start(cpus=4)
    try:
        yield cluster
    finally:
        cluster.stop()


def overrides(tmp_path, prepared, iters):
    return [*TINY, f"--train.iters={iters}", f"--data.data_dir={prepared['data_dir']}",
            f"--logging.dir={tmp_path / 'run'}", f"--checkpoint.dir={tmp_path / 'ckpt'}"]


def job_env(slurm, **extra):
    """The submitting environment: this venv first on PATH (the job's python3), 2 processes per node."""
    venv_bin = os.path.dirname(sys.executable)
    env = slurm.env(PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""), PYTHONWARNINGS="ignore",
                    NPROC_PER_NODE="2", MOD_CONFIG="configs/tiny-cpu.yaml")
    for k in ("PYTHON", "MOD_ARGS", "GPUS_PER_NODE", "MOD_REQUEUE", "MOD_MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def complete_checkpoint(ckpt, it):
    meta = ckpt / f"iter_{it:07d}" / "mod_meta.json"
    return meta.is_file() and json.loads(meta.read_text())["iteration"] == it



def wait_for_progress(slurm, job, out, pattern: str, timeout: float = 120) -> None:
    """Until the job's output file matches `pattern`; fails if that takes longer or the job ends first."""
    deadline = time.time() + timeout
    while not (out.exists() and re.search(pattern, out.read_text())):
        text = out.read_text() if out.exists() else ""
        assert time.time() < deadline, f"no training progress:\n{text[-3000:]}"
        assert slurm.job_info(job).get("JobState") not in TERMINAL_STATES, f"job ended early:\n{text[-3000:]}"
        time.sleep(0.2)

def test_sbatch_trains_two_ranks_to_the_end(slurm, tmp_path, prepared):
    out = tmp_path / "job.out"
    job = slurm.sbatch([f"--chdir={REPO}", f"--output={out}", SBATCH, *overrides(tmp_path, prepared, iters=6)],
                       env=job_env(slurm))
    info = slurm.wait_job(job, timeout=240)
    text = out.read_text() if out.exists() else ""
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"{info}\n{text[-4000:]}\n{slurm.daemon_logs()}"
    assert "1 node(s) x 2 process(es)" in text and "rendezvous localhost:" in text
    assert "done: iteration 6 |" in text, text[-3000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "6"
    assert complete_checkpoint(ckpt, 6)
    meta = json.loads((ckpt / "iter_0000006" / "mod_meta.json").read_text())
    assert meta["layout"]["dp"] == 2 and meta["world_size"] == 2
    assert "requeueing" not in text


def test_sigterm_saves_then_the_job_requeues_and_resumes(slurm, tmp_path, prepared):
    """scancel --signal=TERM mid-run: every rank saves and exits 0, the batch script requeues the job,
    the rerun resumes from that checkpoint and finishes; the job ends COMPLETED after one restart."""
    iters = 50  # ~0.06 s/iteration: the signal (sent after iteration 2) lands long before the end
    out, ckpt = tmp_path / "job.out", tmp_path / "ckpt"
    # Overrides through MOD_ARGS this time (the other test passes them as script arguments).
    args = [*overrides(tmp_path, prepared, iters), "--checkpoint.keep_last=2"]  # k's checkpoint stays
    env = job_env(slurm, MOD_ARGS=" ".join(args))
    job = slurm.sbatch([f"--chdir={REPO}", f"--output={out}", SBATCH], env=env)
    try:
        wait_for_progress(slurm, job, out, rf"iter +2/{iters}")
        slurm.run(["scancel", "--signal=TERM", job])
        info = slurm.wait_job(job, timeout=240, min_restarts=1)
    finally:
        slurm.run(["scancel", job], check=False)  # a no-op once the job has ended
    text = out.read_text()

    # First attempt: the signal stopped training at iteration k with a complete checkpoint.
    m = re.search(r"signal received: saving checkpoint and exiting at iteration (\d+)", text)
    assert m, text[-4000:]
    k = int(m.group(1))
    assert 2 <= k < iters, text[-4000:]
    assert "stopped by a signal with a checkpoint; requeueing" in text
    assert complete_checkpoint(ckpt, k)
    # Second attempt (SLURM_RESTART_COUNT=1): resumed from k and finished; one log file for both.
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        f"{info}\n{text[-4000:]}"
    assert "restart 1 |" in text
    assert f"resumed from {ckpt / f'iter_{k:07d}'} at iteration {k}" in text, text[-4000:]
    assert f"done: iteration {iters} |" in text
    assert text.count(f"iter {k + 1:6d}/{iters}") == 1  # no step trained twice
    assert (ckpt / "latest").read_text().strip() == str(iters) and complete_checkpoint(ckpt, iters)


def test_sigterm_after_a_periodic_save_still_saves(slurm, tmp_path, prepared):
    """The same signal once periodic checkpoints exist (save_interval=2): the stop still saves, exit 0.

    One process (the bug needs no second rank, and one starts faster)."""
    out, ckpt = tmp_path / "job.out", tmp_path / "ckpt"
    job = slurm.sbatch([f"--chdir={REPO}", f"--output={out}", SBATCH, *overrides(tmp_path, prepared, 1000),
                        "--checkpoint.save_interval=2"], env=job_env(slurm, MOD_REQUEUE="0", NPROC_PER_NODE="1"))
    try:
        wait_for_progress(slurm, job, out, r"iter +5/1000")
        slurm.run(["scancel", "--signal=TERM", job])
        info = slurm.wait_job(job, timeout=120)
    finally:
        slurm.run(["scancel", job], check=False)
    text = out.read_text()
    m = re.search(r"signal received: saving checkpoint and exiting at iteration (\d+)", text)
    assert m, text[-4000:]
    k = int(m.group(1))
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-4000:]
    assert "not requeued (MOD_REQUEUE=0" in text
    assert (ckpt / "latest").read_text().strip() == str(k) and complete_checkpoint(ckpt, k)


def test_deepspeed_sbatch_trains_two_ranks_with_zero(slurm, tmp_path, prepared):
    """pretrain_deepspeed.sbatch: the DeepSpeed engine (ZeRO-2) over 2 ranks, to the end, checkpointed."""
    out = tmp_path / "job.out"
    script = os.path.join(REPO, "launch", "slurm", "pretrain_deepspeed.sbatch")
    job = slurm.sbatch([f"--chdir={REPO}", f"--output={out}", script, *overrides(tmp_path, prepared, iters=4),
                        "--train.zero_stage=2"], env=job_env(slurm, DS_ACCELERATOR="cpu"))
    info = slurm.wait_job(job, timeout=300)
    text = out.read_text() if out.exists() else ""
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{text[-4000:]}"
    assert "--train.engine=deepspeed" in text and "done: iteration 4 |" in text, text[-3000:]
    ckpt = tmp_path / "ckpt"
    assert complete_checkpoint(ckpt, 4)
    meta = json.loads((ckpt / "iter_0000004" / "mod_meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["zero_stage"] == 2 and meta["layout"]["dp"] == 2
    assert (ckpt / "iter_0000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
