"""A real one-node Slurm on localhost for tests: munged + slurmctld + slurmd under one temp directory.

    cluster = SlurmCluster.start(cpus=4)      # ready when `sinfo` reports the node idle
    job = cluster.sbatch([...], env=...)       # client commands get SLURM_CONF from cluster.env()
    info = cluster.wait_job(job)               # scontrol show job fields, once the job has ended
    cluster.stop()                             # cancels jobs, stops the daemons by their pid files

Set up as seen working on a Debian 12 host (Slurm 22.05, no systemd, no cgroups): munge gets a generated key
and its own socket; slurm.conf uses proctrack/linuxproc, task/none, no accounting, and
`SlurmdParameters=config_overrides` so that the node can declare more CPUs than the host has. The
controller and node daemon listen on ports picked free at start (not the default 6817/6818), so a
system Slurm or a second test session on the same host does not collide with this one; job ids start
at a random number, so that ports derived from job ids (pretrain.sbatch's rendezvous port) differ
between sessions too.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional, Sequence

SERVER_BINARIES = ("munged", "slurmctld", "slurmd")
CLIENT_BINARIES = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")

SLURM_CONF = """\
ClusterName=modtest
FirstJobId={first_job_id}
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    """Slurm/munge programs that are not installed (the tests skip when any is missing)."""
    return [b for b in SERVER_BINARIES + CLIENT_BINARIES if shutil.which(b) is None
            and not os.path.exists(os.path.join("/usr/sbin", b))]


def _which(name: str) -> str:
    return shutil.which(name) or os.path.join("/usr/sbin", name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 4):
        self.root = root
        self.cpus = cpus
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_dir = os.path.join(root, "munge")
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        self.pid_files = {"slurmd": os.path.join(root, "slurmd.pid"),
                          "slurmctld": os.path.join(root, "slurmctld.pid"),
                          "munged": os.path.join(self.munge_dir, "munged.pid")}

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, root: Optional[str] = None, cpus: int = 4, timeout: float = 30.0) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd; return once the node is idle. On failure, stop and raise."""
        # A unix socket path must stay short (108 bytes): a fresh /tmp directory keeps it so.
        cluster = cls(root or tempfile.mkdtemp(prefix="mod-slurm-"), cpus)
        try:
            cluster._start(timeout)
        except Exception as e:
            logs = cluster.daemon_logs()
            cluster.stop()
            raise SlurmError(f"one-node Slurm did not start: {e}\n{logs}") from e
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout: float) -> None:
        for d in ("state", "spool"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        os.makedirs(self.munge_dir, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)  # munged refuses a socket directory writable by others
        key = os.path.join(self.munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                        f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir}/munged.log",
                        f"--seed-file={self.munge_dir}/munged.seed"],
                       check=True, capture_output=True, timeout=30)
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(root=self.root, munge_socket=self.munge_socket, cpus=self.cpus,
                                      ctld_port=_free_port(), slurmd_port=_free_port(),
                                      first_job_id=random.randint(1000, 900000)))
        env = self.env()
        # Both daemonise; their pid files are how stop() finds them.
        subprocess.run([_which("slurmctld"), "-f", self.conf], env=env, check=True, capture_output=True, timeout=30)
        subprocess.run([_which("slurmd"), "-f", self.conf, "-N", "localhost"], env=env, check=True,
                       capture_output=True, timeout=30)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            proc = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise SlurmError(f"node not idle after {timeout:.0f} s (sinfo: {state!r})")

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by their pid files; remove the root."""
        ctld = self._read_pid("slurmctld")
        if ctld is not None and _pid_alive(ctld):
            self.run(["scancel", "--full", "--user=root"], check=False, timeout=10)
            deadline = time.time() + 15
            while time.time() < deadline and self.run(["squeue", "-h"], check=False, timeout=10).stdout.strip():
                time.sleep(0.3)
        self._terminate("slurmd", "slurmctld")
        self._terminate("munged")  # last: the Slurm daemons authenticate through it until they exit
        shutil.rmtree(self.root, ignore_errors=True)

    def _terminate(self, *names: str, timeout: float = 10.0) -> None:
        """SIGTERM the daemons named, by pid file; SIGKILL any still running after timeout."""
        pids = []
        for name in names:
            pid = self._read_pid(name)
            if pid is not None and _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
                except ProcessLookupError:
                    pass
        deadline = time.time() + timeout
        while any(_pid_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _read_pid(self, name: str) -> Optional[int]:
        try:
            with open(self.pid_files[name]) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def daemon_logs(self, tail: int = 2000) -> str:
        out = []
        for path in (f"{self.root}/slurmctld.log", f"{self.root}/slurmd.log", f"{self.munge_dir}/munged.log"):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {path}\n{f.read()[-tail:]}")
        return "\n".join(out)

    # ------------------------------------------------------------------ clients
    def env(self, base: Optional[dict] = None, **extra: str) -> dict:
        """An environment for client commands (and so for the jobs they submit): SLURM_CONF set."""
        env = dict(os.environ if base is None else base)
        # A job started from inside another Slurm job would otherwise pick up the outer job's settings.
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del env[k]
        env["SLURM_CONF"] = self.conf
        env.update(extra)
        return env

    def run(self, args: Sequence[str], env: Optional[dict] = None, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        env = self.env() if env is None else dict(env, SLURM_CONF=self.conf)
        proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: Sequence[str], env: Optional[dict] = None, timeout: float = 60) -> str:
        """`sbatch --parsable ARGS`; returns the job id."""
        proc = self.run(["sbatch", "--parsable", *args], env=env, timeout=timeout)
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        proc = self.run(["scontrol", "-o", "show", "job", job_id], check=False, timeout=10)
        return dict(item.partition("=")[::2] for item in proc.stdout.split() if "=" in item)

    def wait_job(self, job_id: str, timeout: float = 300, min_restarts: int = 0, poll: float = 0.25) -> dict:
        """Poll until the job has ended (after at least min_restarts requeues); return its job_info.

        Polls faster than `sbatch --wait` (which backs off to 10 s). A job that ended with fewer restarts
        is returned after 20 s (a requeue shows up within ~6 s), so a missing requeue fails fast.
        """
        deadline, ended_since = time.time() + timeout, None
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                if int(info.get("Restarts", "0")) >= min_restarts:
                    return info
                ended_since = ended_since or time.time()
                if time.time() - ended_since > 20:
                    return info
            else:
                ended_since = None
            if time.time() > deadline:
                raise SlurmError(f"job {job_id} still not finished after {timeout:.0f} s: {info}")
            time.sleep(poll)
