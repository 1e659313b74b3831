"""launch/local.sh: torchrun --standalone with 2 CPU processes; SIGTERM to the script = save and exit 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from test_slurm import REPO, complete_checkpoint, overrides

LOCAL = os.path.join(REPO, "launch", "local.sh")


def test_sigterm_to_local_sh_saves_and_exits_zero(tmp_path, prepared):
    logs = tmp_path / "logs"
    env = dict(os.environ, NPROC="2", MOD_LOG_DIR=str(logs), PYTHONWARNINGS="ignore")
    env.pop("PYTHON", None)
    out = tmp_path / "stdout"
    with open(out, "w") as f:
        proc = subprocess.Popen([LOCAL, "--config", "configs/tiny-cpu.yaml", *overrides(tmp_path, prepared, 500)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while not re.search(r"iter +2/500", out.read_text()):
                assert time.time() < deadline and proc.poll() is None, out.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)  # to the script only: it passes it to the training processes
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = out.read_text()
    assert rc == 0, text[-3000:]
    assert "[local.sh] 2 process(es)" in text and "[local.sh] training exited with status 0" in text
    m = re.search(r"signal received: saving checkpoint and exiting at iteration (\d+)", text)
    assert m, text[-3000:]
    k = int(m.group(1))
    assert 2 <= k < 500
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == str(k) and complete_checkpoint(ckpt, k)
    # The log file has what was shown, the training's last lines included.
    (log,) = logs.glob("local-*.log")
    assert log.read_text() == text


def test_deepspeed_launcher_two_processes(tmp_path, prepared):
    """launch/deepspeed.sh: DeepSpeed's own launcher, 2 CPU processes, ZeRO-1, to the end."""
    logs = tmp_path / "logs"
    env = dict(os.environ, NPROC="2", MOD_LOG_DIR=str(logs), PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu",
               MASTER_PORT=str(_free_port()))
    for key in ("PYTHON", "VIRTUAL_ENV"):  # as CI runs it: the script finds <repo>/.venv itself
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(REPO))
    proc = subprocess.run([os.path.join(REPO, "launch", "deepspeed.sh"), "--config", "configs/tiny-cpu.yaml",
                           *overrides(tmp_path, prepared, 3)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "done: iteration 3 |" in proc.stdout and "training exited with status 0" in proc.stdout
    ckpt = tmp_path / "ckpt"
    assert complete_checkpoint(ckpt, 3)
    assert (ckpt / "iter_0000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # 2 ZeRO ranks
    (log,) = logs.glob("deepspeed-*.log")
    assert "done: iteration 3 |" in log.read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
