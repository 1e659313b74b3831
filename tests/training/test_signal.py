"""Preemption: SIGTERM to one rank of a 2-process run stops both ranks with a complete checkpoint."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from test_train_cli import SMALL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_on_one_rank_saves_and_exits_zero(tmp_path, prepared):
    port = _free_port()
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "mod_megatron.training.cli", "--config", "configs/tiny-cpu.yaml", *SMALL,
            "--train.iters=5000", "--train.eval_interval=0", "--train.micro_batch_size=4", f"--data.data_dir={prepared['data_dir']}",
            f"--logging.dir={tmp_path}", f"--checkpoint.dir={ckpt}"]
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
        log = open(tmp_path / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while "iter      3/5000" not in (tmp_path / "rank0.log").read_text():
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "rank0.log").read_text()[-2000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # only rank 1 is signalled; rank 0 must follow
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    out0 = (tmp_path / "rank0.log").read_text()
    assert codes == [0, 0], out0[-3000:]
    assert "signal received: saving checkpoint and exiting" in out0
    it = int((ckpt / "latest").read_text())
    assert 3 <= it < 5000
    assert (ckpt / f"iter_{it:07d}" / "mod_meta.json").is_file()
    assert f"stopped by signal: iteration {it}" in out0
