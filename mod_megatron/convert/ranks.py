"""Run a conversion step on every rank of a parallel layout: forked CPU processes over gloo.

    results = run_ranks(fn, world_size=2, overrides=["--parallel.tp=2", ...])

Each rank builds the config from `overrides`, starts gloo and megatron-core's model-parallel groups
(`training.distributed.initialize`), calls `fn(cfg, layout)` and sends the return value back; the
results come back in rank order. A conversion needs no launcher: `mod-convert reshard --tp 2` starts
its two ranks itself.

The ranks are forks of this process (cheap: torch and megatron-core are already imported), unless
this process already holds a torch.distributed group (a fork cannot start a new one then); they are
forked from a clean fork server instead, so `fn` must be picklable (a module-level function or a
functools.partial of one). Every rank computes with one thread: a fork of a process that has run
multi-threaded torch ops cannot use OpenMP again. A rank that raises stops all of them; a
ConversionError / CheckpointError / ConfigError keeps its one-line message.
"""
from __future__ import annotations

import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mod_megatron.convert.deepspeed import ConversionError

PRELOAD = ["mod_megatron.training.builder", "mod_megatron.convert.reshard", "mod_megatron.convert.dense_to_mod"]
ONE_LINE_ERRORS = ("ConversionError", "CheckpointError", "ConfigError")
EXIT_GRACE = 30.0  # seconds a rank that sent its result gets to exit on its own


def run_ranks(fn: Callable, world_size: int, overrides: Sequence[str], timeout: float = 3600.0) -> list[Any]:
    """`fn(cfg, layout)` on `world_size` ranks; their results in rank order."""
    from megatron.core import parallel_state as ps

    method = "fork"
    if dist.is_initialized() or ps.model_parallel_is_initialized():
        method = "forkserver"
        mp.get_context(method).set_forkserver_preload(PRELOAD)
    ctx = mp.get_context(method)
    port = _free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_main, args=(fn, list(overrides), rank, world_size, port, child_end),
                        name=f"convert-rank{rank}")  # not daemonic: the checkpoint writer forks
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    ok = False
    try:
        results = _collect(procs, conns, timeout)
        ok = True
        return results
    finally:
        for p in procs:
            p.join(timeout=EXIT_GRACE if ok else 0)
            _kill_group(p)
        for c in conns:
            c.close()


def _kill_group(p) -> None:
    """End a rank and whatever it started (megatron's checkpoint writer keeps a helper process that
    ignores SIGTERM when started by the Trainer): every rank leads its own process group."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if p.is_alive():
        p.kill()
    p.join(timeout=5)


def _collect(procs, conns, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    results, failures = {}, {}
    waiting = {c: rank for rank, c in enumerate(conns)}
    while waiting and time.monotonic() < deadline and not failures:
        for conn in multiprocessing.connection.wait(list(waiting), timeout=max(0.0, deadline - time.monotonic())):
            rank = waiting.pop(conn)
            try:
                status, payload = conn.recv()
            except EOFError:
                procs[rank].join(timeout=5)
                status, payload = "error", ("RuntimeError", f"rank {rank} died (exit code {procs[rank].exitcode})", "")
            (results if status == "ok" else failures)[rank] = payload
    if failures:
        rank = min(failures)
        kind, message, trace = failures[rank]
        if kind in ONE_LINE_ERRORS:
            raise ConversionError(message)
        raise RuntimeError(f"rank {rank} of {len(procs)} failed: {kind}: {message}\n{trace}")
    if waiting:
        raise ConversionError(f"ranks {sorted(waiting.values())} did not finish within {timeout:.0f}s")
    return [results[r] for r in range(len(procs))]


def _rank_main(fn, overrides, rank: int, world_size: int, port: int, conn) -> None:
    os.setpgid(0, 0)  # see _kill_group
    torch.set_num_threads(1)  # before any torch op: see the module docstring
    try:
        from mod_megatron.config import load_config
        from mod_megatron.training.distributed import initialize

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cfg = load_config(None, overrides)
        layout = initialize(cfg)
        result = fn(cfg, layout)
        dist.barrier()  # rank 0 holds the TCP store: nobody leaves while others still use it
        conn.send(("ok", result))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        message = (str(e).strip().splitlines() or [""])[0]
        conn.send(("error", (type(e).__name__, message, traceback.format_exc())))
    finally:
        conn.close()
    # Everything is written (and fsynced) and reported: leave at once, without the slow teardown of
    # gloo and of the checkpoint writer's helper process; the parent ends what is left (_kill_group).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
