"""Run a function on every rank of a parallel layout: forked CPU processes, gloo, megatron's parallel state.

    results = run_layout(fn, world_size=4, tp=2, pp=2, overrides=["--model.num_layers=4"])

Each rank builds the config (`overrides` plus the layout), starts gloo and megatron-core's model-parallel
groups through `mod_megatron.training.distributed.initialize`, calls `fn(cfg, layout)` and sends its
return value back; `run_layout` returns the values in rank order. Tensors in the result come back as
numpy arrays.

Why fork: torch and megatron-core are imported once here, in the parent, and every rank is a fork of
it, so a layout costs well under a second instead of the ~10 s of a torchrun start-up. Two catches:
- a process that has already run multi-threaded torch ops (OpenMP) cannot use OpenMP again in a
  forked child (it deadlocks), so each rank switches to one intra-op thread before any torch compute;
  with several ranks on a 2-core machine that is also the fastest setting;
- a fork of a process that holds a torch.distributed process group (e.g. after the 1-rank fixture of
  tests/conftest.py ran in this pytest process) cannot start a new one: tearing the inherited group
  down segfaults, since its gloo threads did not survive the fork. Then the ranks are forked from a
  clean fork server instead (multiprocessing's "forkserver": a fresh interpreter that imports torch
  and megatron once, ~5 s, and forks every later rank). That is why `fn` must be picklable: a
  module-level function or a functools.partial of one.

Failures are loud: a rank that raises makes `run_layout` kill the other ranks and raise `RankError`
with that rank's traceback; a rank that dies silently or a layout that does not finish within
`timeout` seconds (e.g. a hung collective) is killed and reported, so a broken layout fails a test
instead of hanging CI.
"""
from __future__ import annotations

import multiprocessing.connection
import os
import socket
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state as ps

from mod_megatron.config import load_config, validate
from mod_megatron.training import distributed as mdist

DEFAULT_TIMEOUT = 120.0
ERROR_GRACE = 2.0  # seconds the other ranks get to report their own error after the first one
# What the fork server imports once (the rest of a rank's imports happen in each rank).
FORKSERVER_PRELOAD = ["mod_megatron.training.builder", "megatron.core.pipeline_parallel", "tests.distributed.spawn"]


class RankError(RuntimeError):
    """A rank raised, died or timed out; the message names the rank and carries its traceback."""


def layout_overrides(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, sp: bool = False,
                     dp_opt: bool = False, ep: int = 1) -> list[str]:
    """The config overrides that select a parallel layout (dp = world_size / (tp * pp) is implied;
    ep, the expert-parallel size of MoE models, comes out of tp * dp)."""
    return [f"--parallel.tp={tp}", f"--parallel.pp={pp}", f"--parallel.vpp={vpp}", f"--parallel.sp={sp}",
            f"--train.distributed_optimizer={dp_opt}", "--train.device=cpu"] + ([f"--moe.ep={ep}"] if ep != 1 else [])


def run_layout(fn: Callable, world_size: int, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
               sp: bool = False, dp_opt: bool = False, overrides: Sequence[str] = (),
               timeout: float = DEFAULT_TIMEOUT, ep: int = 1) -> list[Any]:
    """Run `fn(cfg, layout)` on `world_size` forked ranks; return the per-rank results in rank order."""
    args = list(overrides) + layout_overrides(tp, pp, vpp, sp, dp_opt, ep)
    validate(load_config(None, args), world_size=world_size)  # a bad config fails here, in the parent
    port = _free_port()
    ctx = mp.get_context(start_method())
    procs, conns = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_main, args=(fn, args, rank, world_size, port, timeout, child_end),
                        name=f"rank{rank}", daemon=True)
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    try:
        return _collect(procs, conns, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        for c in conns:
            c.close()


def start_method() -> str:
    """'fork' from this process while it holds no process group, else a clean fork server."""
    if dist.is_initialized() or ps.model_parallel_is_initialized():
        mp.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
        return "forkserver"
    return "fork"


def _collect(procs, conns, timeout: float) -> list[Any]:
    """Read every rank's (status, payload) message, until all are in, a rank fails or time is up.

    After the first failure the others get ERROR_GRACE seconds to report theirs (a rank that fails
    because its peer died should not hide the peer's traceback); then all are killed by the caller.
    """
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    waiting = {c: rank for rank, c in enumerate(conns)}
    while waiting and time.monotonic() < deadline:
        for conn in multiprocessing.connection.wait(list(waiting), timeout=deadline - time.monotonic()):
            rank = waiting.pop(conn)
            try:
                status, payload = conn.recv()
            except EOFError:
                procs[rank].join(timeout=5)
                status, payload = "error", f"died without a result (exit code {procs[rank].exitcode})\n"
            if status == "error":
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + ERROR_GRACE)
            else:
                results[rank] = payload
    if errors:
        which = f"rank {next(iter(errors))}" if len(errors) == 1 else f"ranks {sorted(errors)}"
        text = "".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
        raise RankError(f"{which} of {len(procs)} failed; the other ranks were killed.\n{text}")
    if waiting:
        raise RankError(f"ranks {sorted(waiting.values())} of {len(procs)} did not finish within {timeout:.0f}s "
                        "(hung collective or deadlock?); all ranks were killed")
    return [results[r] for r in range(len(procs))]


def _rank_main(fn, args, rank: int, world_size: int, port: int, timeout: float, conn) -> None:
    torch.set_num_threads(1)  # before any torch op: see the module docstring
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if world_size == 1:  # initialize() then rendezvous in memory: no port needed
            del os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        cfg = load_config(None, args)
        layout = mdist.initialize(cfg, timeout_minutes=timeout / 60.0)
        result = to_plain(fn(cfg, layout))
        dist.barrier()  # nobody tears down gloo (or the TCP store on rank 0) while others still use it
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def to_plain(obj):
    """Tensors (also inside dicts, lists and tuples) to numpy arrays, so results pickle cheaply."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["run_layout", "layout_overrides", "RankError", "to_plain"]
