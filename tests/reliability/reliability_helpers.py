"""Helpers for the fault-injection tests (tests/reliability): real `mod-train` processes on the session-prepared corpus.

Faults are real: SIGKILL of a running process, truncated or overwritten files, a NaN injected through
the tiny test hooks MOD_TEST_INJECT_NAN / MOD_TEST_KILL_IN_SAVE (see numerics.py / checkpoint.py).
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("_train_cli_tests", os.path.join(REPO, "tests", "training",
                                                                                  "test_train_cli.py"))
_cli_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli_tests)
SMALL = _cli_tests.SMALL  # 4 layers, hidden 64, seq 64, batch 8
scalars = _cli_tests.scalars

ITERS = 16  # every run here has the same LR schedule, so losses are comparable step by step
COMMON = [f"--train.iters={ITERS}", "--train.eval_interval=0", "--checkpoint.save_interval=4"]


def train_args(prepared, log_dir, ckpt_dir, *overrides):
    return [sys.executable, "-m", "mod_megatron.training.cli", "--config", "configs/tiny-cpu.yaml", *SMALL,
            f"--data.data_dir={prepared['data_dir']}", f"--logging.dir={log_dir}", f"--checkpoint.dir={ckpt_dir}",
            *COMMON, *overrides]


def env(**extra):
    return dict(os.environ, PYTHONWARNINGS="ignore", **extra)


class Result:
    def __init__(self, returncode: int, output: str):
        self.returncode, self.stdout, self.stderr = returncode, output, output


def _spawn(prepared, log_dir, ckpt_dir, overrides, extra_env, log_file):
    # Own session: kill_group() can then reap what a killed trainer leaves behind (megatron's checkpoint
    # writer starts a multiprocessing Manager process that outlives a SIGKILLed parent).
    with open(log_file, "w") as out:
        return subprocess.Popen(train_args(prepared, log_dir, ckpt_dir, *overrides), cwd=REPO,
                                env=env(**(extra_env or {})), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run(prepared, log_dir, ckpt_dir, *overrides, extra_env=None, timeout=300) -> Result:
    """One mod-train process to its end (stdout and stderr together in LOG_DIR.out); not checked."""
    log_file = f"{log_dir}.out"
    proc = _spawn(prepared, log_dir, ckpt_dir, overrides, extra_env, log_file)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    return Result(code, open(log_file).read())


def popen(prepared, log_dir, ckpt_dir, *overrides, extra_env=None, log_file=None, env_vars=None):
    return _spawn(prepared, log_dir, ckpt_dir, overrides, dict(extra_env or {}, **(env_vars or {})), log_file)


def wait_for_line(proc, log_file, needle, timeout=180):
    """Block until `needle` is in the log (the process must still be running). A guard, not a timing."""
    import time

    deadline = time.time() + timeout
    while needle not in open(log_file).read():
        text = open(log_file).read()
        assert proc.poll() is None, f"process ended before {needle!r}:\n{text[-3000:]}"
        assert time.time() < deadline, f"no {needle!r} after {timeout}s:\n{text[-3000:]}"
        time.sleep(0.05)


def kill9(proc) -> int:
    """SIGKILL the process (a crashed node / OOM kill), then reap its leftover helpers."""
    os.kill(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=60)
    kill_group(proc)
    return code


def latest(ckpt_dir) -> int:
    return int(open(os.path.join(ckpt_dir, "latest")).read())


def losses(log_dir) -> dict:
    return dict(scalars(log_dir, "train/loss"))


def max_dloss(a: dict, b: dict, steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)


def resumed_at(stdout: str) -> int:
    m = re.search(r"resumed from \S+ at iteration (\d+)", stdout)
    assert m, stdout[-3000:]
    return int(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
