"""mod-train end to end on CPU: loss falls, TensorBoard events, checkpoints, resume, bad input.

Each run is a real `python -m mod_megatron.training.cli` subprocess on the default corpus
(prepared once per session), so process groups, data, checkpoints and logging are the real ones.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--model.num_layers=4", "--model.hidden_size=64", "--model.num_attention_heads=4",
         "--model.seq_length=64", "--mod.capacity=0.25", "--train.micro_batch_size=8",
         "--train.global_batch_size=8", "--train.lr=3e-3", "--train.warmup_iters=5", "--train.eval_iters=2",
         "--logging.log_interval=1", "--logging.progress_bar=false"]


def run_train(tmp_path, prepared, *overrides, run="run", check=True):
    args = [sys.executable, "-m", "mod_megatron.training.cli", "--config", "configs/tiny-cpu.yaml", *SMALL,
            f"--data.data_dir={prepared['data_dir']}", f"--logging.dir={tmp_path / run}",
            f"--checkpoint.dir={tmp_path / run / 'ckpt'}", *overrides]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"mod-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, prepared, run: str, *overrides, nproc: int = 2):
    """Start nproc ranks of mod-train with launcher variables; wait; return the log dir."""
    args = [sys.executable, "-m", "mod_megatron.training.cli", "--config", "configs/tiny-cpu.yaml", *SMALL,
            f"--data.data_dir={prepared['data_dir']}", f"--logging.dir={tmp_path / run}",
            f"--checkpoint.dir={tmp_path / run / 'ckpt'}", *overrides]
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * nproc, outs[0][-3000:]
    return tmp_path / run


def scalars(log_dir, tag):
    """[(step, value)] of one TensorBoard scalar, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(log_dir, "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_short_run_lowers_loss_and_logs(tmp_path, prepared):
    proc = run_train(tmp_path, prepared, "--train.iters=40", "--train.eval_interval=20")
    log_dir = tmp_path / "run"
    setup = re.search(r"setup ([0-9.]+) s: interpreter and imports ([0-9.]+) \| process groups ([0-9.]+) \| "
                      r"data ([0-9.]+) \| model, optimizer, checkpoint ([0-9.]+)", proc.stdout)
    assert setup, proc.stdout[:2000]
    total, *parts = map(float, setup.groups())
    assert total > 0 and abs(sum(parts) - total) < 0.35  # the phases add up (each rounded to 0.1 s)
    train = scalars(log_dir, "train/loss")
    assert [s for s, _ in train] == list(range(1, 41))
    assert sum(v for _, v in train[-5:]) / 5 < sum(v for _, v in train[:5]) / 5 - 1.0
    valid = scalars(log_dir, "eval/valid_loss")
    assert [s for s, _ in valid] == [20, 40] and valid[1][1] < valid[0][1]
    assert len(scalars(log_dir, "eval/heldout_loss")) == 2
    # MoD layers (1 and 3 of 4; megatron numbers layers from 1) log their routing.
    frac = scalars(log_dir, "routing/layer02/fraction_routed")
    assert frac and all(abs(v - 0.25) < 1e-6 for _, v in frac)
    assert scalars(log_dir, "routing/layer04/router_weight_std")
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["iteration"] == 40 and summary["valid_loss"] == pytest.approx(valid[1][1], rel=1e-6)
    ckpt = log_dir / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "40"
    assert (ckpt / "iter_0000040" / "mod_meta.json").is_file()


def test_resume_matches_uninterrupted_run(tmp_path, prepared):
    """N steps, stop, resume N more == 2N straight: every per-step loss within 1e-6."""
    common = ["--train.iters=16", "--train.eval_interval=0"]
    run_train(tmp_path, prepared, *common, run="straight")
    first = run_train(tmp_path, prepared, *common, "--train.exit_interval=8", run="split")
    assert (tmp_path / "split" / "ckpt" / "latest").read_text().strip() == "8"
    assert "iter      8/16" in first.stdout and "iter      9/16" not in first.stdout
    second = run_train(tmp_path, prepared, *common, run="split")
    assert "resumed from" in second.stdout and "iteration 8" in second.stdout
    straight = dict(scalars(tmp_path / "straight", "train/loss"))
    split = dict(scalars(tmp_path / "split", "train/loss"))
    assert sorted(split) == sorted(straight) == list(range(1, 17))
    diffs = [abs(straight[i] - split[i]) for i in straight]
    assert max(diffs) <= 1e-6, diffs


def test_stale_partial_checkpoint_is_ignored(tmp_path, prepared):
    """A save that died mid-write (an iter_*.tmp dir) is never loaded; `latest` decides."""
    run_train(tmp_path, prepared, "--train.iters=4", "--train.eval_interval=0", run="r")
    ckpt = tmp_path / "r" / "ckpt"
    bogus = ckpt / "iter_0000006.tmp"
    bogus.mkdir()
    (bogus / "common.pt").write_bytes(b"half-written")
    proc = run_train(tmp_path, prepared, "--train.iters=6", "--train.eval_interval=0", run="r")
    assert "resumed from" in proc.stdout and "iter_0000004" in proc.stdout
    assert (ckpt / "latest").read_text().strip() == "6"
    assert not bogus.exists()  # cleaned up by the next complete save


@pytest.mark.parametrize("override, needle", [
    ("--mod.capcity=0.5", "unknown key 'mod.capcity'"),
    ("--mod.capacity=1.5", "mod.capacity must be in (0, 1]"),
    ("--model.num_attention_heads=3", "must divide model.hidden_size"),
    ("--parallel.sp=true", "parallel.sp=true needs parallel.tp > 1"),
])
def test_bad_config_is_one_clear_line(tmp_path, prepared, override, needle):
    proc = run_train(tmp_path, prepared, override, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], proc.stderr


def test_checkpoint_of_another_shape_is_refused(tmp_path, prepared):
    run_train(tmp_path, prepared, "--train.iters=2", "--train.eval_interval=0", run="r")
    proc = run_train(tmp_path, prepared, "--train.iters=4", "--model.hidden_size=128", run="r", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "another model shape" in err[0] and "hidden_size" in err[0], proc.stderr


def test_profile_steps_write_a_trace_and_a_table(tmp_path, prepared):
    """logging.profile_steps=[2,3]: rank 0 traces iterations 2 and 3 only (one `iteration#N` range each
    in the Chrome trace), ranks its ops in a table, and says where it wrote them."""
    proc = run_train(tmp_path, prepared, "--train.iters=4", "--train.eval_interval=0",
                     "--logging.profile_steps=[2,3]")
    out_dir = tmp_path / "run" / "profile"
    assert sorted(os.listdir(out_dir)) == ["rank0.json", "rank0.txt"]
    trace = json.loads((out_dir / "rank0.json").read_text())
    steps = sorted({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("iteration#")})
    assert steps == ["iteration#2", "iteration#3"], steps
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])  # the model's matmuls are in it
    table = (out_dir / "rank0.txt").read_text()
    assert table.startswith("# steps 2-3, rank 0") and "aten::" in table
    assert f"profile: iterations 2-3 traced -> {out_dir / 'rank0.json'}" in proc.stdout + proc.stderr
