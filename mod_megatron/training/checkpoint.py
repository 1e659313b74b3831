"""Checkpoints: megatron-core dist_checkpointing, written atomically, found through a `latest` tracker.

Layout under checkpoint.dir:

    iter_0000100/          a complete checkpoint (dist-checkpoint shards + common.pt + mod_meta.json)
    iter_0000200.tmp/      one being written; never loaded, removed by the next save
    latest                 text file "200", replaced atomically after the rename of iter_0000200

Every rank writes into the `.tmp` directory; after a barrier rank 0 writes mod_meta.json (the
completion mark), renames the directory and only then moves `latest`. A crash at any point leaves
`latest` on the previous complete checkpoint.

Integrity: mod_meta.json records the size and sha256 of every other file of the checkpoint (each rank
hashes a share of the files). `select` checks them before loading and falls back to the newest older
checkpoint that passes, saying which one it used and why; `save` refuses non-finite parameters.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Optional

import torch
import torch.distributed as dist

from mod_megatron.data.common import sha256_file
from mod_megatron.training import fused_adam

TRACKER = "latest"
META = "mod_meta.json"
FORMAT_VERSION = 1
# Test hook (tests/reliability): rank 0 SIGKILLs itself in the save of this iteration, after every rank
# wrote its shards and before mod_meta.json / the rename, i.e. a deterministic kill -9 mid-save.
TEST_KILL_IN_SAVE_ENV = "MOD_TEST_KILL_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(items: list) -> list:
    """Every rank's list items, concatenated in rank order, on every rank."""
    if _world() == 1:
        return list(items)
    out = [None] * _world()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def sharded_state_dict(chunks, optimizer=None, is_loading: bool = False) -> dict:
    """The sharded state of the model chunks (and optimizer) of this rank."""
    sd = {_model_key(i, len(chunks)): _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}
    if optimizer is not None:
        # The distributed optimizer's state in the canonical per-parameter form (gathered on DP rank 0 when
        # saving), so it reshards to any layout like the model; megatron-core's default for it,
        # 'fully_sharded_model_space', cannot be saved by its own dist_checkpointing (flattened_range).
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return sd


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(state["tracker"])


def begin(root: str, iteration: int) -> str:
    """All ranks: a fresh, empty `iter_NNNNNNN.tmp` directory to write a checkpoint into."""
    tmp = os.path.join(root, iter_dirname(iteration)) + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    return tmp


def save(root: str, iteration: int, chunks, optimizer, scheduler, meta: dict, keep_last: int = 2) -> str:
    """Write a complete checkpoint of every rank's state for `iteration`; return its directory."""
    from megatron.core import dist_checkpointing

    _refuse_non_finite(chunks, iteration, root)
    tmp = begin(root, iteration)
    state = sharded_state_dict(chunks, optimizer)
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    dist_checkpointing.save(state, tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{_rank():05d}.pt"))
    _barrier()
    return publish(root, iteration, tmp, meta, keep_last)


def _prune(root: str, keep_last: int, latest: int) -> None:
    """Keep `latest` and the keep_last-1 newest complete checkpoints below it (the fallbacks).

    Checkpoints newer than `latest` (left by an earlier run of this directory) are never touched."""
    older = sorted((i for i in complete_iterations(root) if i < latest), reverse=True)
    for it in older[keep_last - 1:]:
        shutil.rmtree(os.path.join(root, iter_dirname(it)), ignore_errors=True)
    for name in os.listdir(root):  # leftovers of crashed saves
        if name.endswith(".tmp") and name.startswith("iter_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _digests(ckpt_dir: str) -> dict:
    """{file: {"size", "sha256"}} of every file in ckpt_dir but mod_meta.json; ranks share the hashing."""
    names = sorted(n for n in os.listdir(ckpt_dir) if n != META)
    mine = [(n, {"size": os.path.getsize(os.path.join(ckpt_dir, n)), "sha256": sha256_file(os.path.join(ckpt_dir, n))})
            for n in names[_rank()::_world()]]
    return dict(_gather(mine))


def _file_problem(ckpt_dir: str, name: str, want: dict, hashes: bool) -> Optional[str]:
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != want["size"]:
        kind = "truncated" if size < want["size"] else "the wrong size"
        return f"{name} is {kind} ({size} bytes, recorded {want['size']})"
    if hashes and sha256_file(path) != want["sha256"]:
        return f"{name} is corrupt (sha256 differs from the one recorded at save)"
    return None


def verify(ckpt_dir: str, hashes: bool = True) -> Optional[str]:
    """None when ckpt_dir is complete and its files match mod_meta.json; else one line saying why not.

    Sizes are always compared, sha256 when `hashes`; each rank checks a share of the files and all
    ranks get the same answer. Checkpoints saved before integrity records only need mod_meta.json."""
    try:
        files = sorted(read_meta(ckpt_dir).get("files", {}).items())
        problems = []
    except CheckpointError as e:
        files, problems = [], [str(e)]
    problems += [p for p in (_file_problem(ckpt_dir, n, w, hashes) for n, w in files[_rank()::_world()]) if p]
    problems = _gather(problems)
    return problems[0] if problems else None


def select(root: str, hashes: bool = True) -> tuple[Optional[str], list[str]]:
    """(checkpoint directory to resume from, notes on the ones passed over); (None, []) = start fresh.

    Tries the one `latest` names, then older complete ones, newest first; the first that verifies
    wins. CheckpointError when `latest` exists but no checkpoint verifies (nothing is overwritten)."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        return None, []
    done = sorted(complete_iterations(root), reverse=True)
    text = open(tracker).read().strip()
    notes = []
    try:
        latest = int(text)
        candidates = [latest] + [i for i in done if i < latest]
    except ValueError:
        notes.append(f"{tracker} holds {text[:40]!r}, not an iteration")
        candidates = done
    for it in candidates:
        path = os.path.join(root, iter_dirname(it))
        reason = verify(path, hashes)
        if reason is None:
            return path, notes
        notes.append(f"{iter_dirname(it)} unusable: {reason}")
    raise CheckpointError(f"no usable checkpoint in {root} ({'; '.join(notes) or 'none complete'}); repair or "
                          "move the directory away to start fresh")


def _refuse_non_finite(chunks, iteration: int, root: str) -> None:
    """CheckpointError on every rank if any rank holds a NaN/Inf parameter: garbage is never saved."""
    bad = []
    for chunk in chunks:
        for name, p in _unwrap(chunk).named_parameters():
            if not torch.isfinite(p.detach()).all():
                bad.append(name)
                break
    bad = _gather(bad[:1])
    if bad:
        raise CheckpointError(f"refusing to save iteration {iteration}: parameter {bad[0]} is not finite "
                              f"(NaN/Inf); the checkpoints in {root} are left as they were")


def complete_iterations(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("iter_") and not name.endswith(".tmp") and os.path.isfile(os.path.join(root, name, META)):
            try:
                out.append(int(name[len("iter_"):]))
            except ValueError:
                continue
    return out


def latest_iteration(root: str) -> Optional[int]:
    """The iteration `latest` points to, or None when there is no checkpoint yet."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}; "
                              "delete the file to start fresh or write the iteration to resume") from None
    ckpt = os.path.join(root, iter_dirname(iteration))
    if not os.path.isfile(os.path.join(ckpt, META)):
        raise CheckpointError(f"{path} names iteration {iteration} but {ckpt} is missing or incomplete")
    return iteration


def resolve_checkpoint(path: str) -> str:
    """A checkpoint root (with a `latest` tracker) or one iter_NNNNNNN directory -> that directory."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    it = latest_iteration(path)
    if it is None:
        raise CheckpointError(f"{path} holds no checkpoint (no `latest` tracker and no {META})")
    return os.path.join(path, iter_dirname(it))


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is not a complete mod_megatron checkpoint ({META} missing)") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupt (not JSON)") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir}: checkpoint format {meta.get('format_version')} is not the "
                              f"supported {FORMAT_VERSION}")
    return meta


def check_compatible(meta: dict, model_cfg: dict, ckpt_dir: str, mod_cfg: Optional[dict] = None) -> None:
    """Refuse a checkpoint of another model shape (or other MoD routing structure) with one clear line.

    The routing keys matter as much as the shapes: which layers hold routers, and how a router logit
    becomes the weight r (a `dense-to-mod` checkpoint needs router_weight=2sigmoid; read as sigmoid it
    would silently halve every routed layer's update). The capacity may change (warm-up, schedules)."""
    saved = meta.get("config", {}).get("model", {})
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "normalization", "activation", "position_embedding", "untie_embeddings")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {model_cfg.get(k)!r}"
             for k in keys if k in saved and saved.get(k) != model_cfg.get(k)]
    saved_mod = meta.get("config", {}).get("mod", {})
    if mod_cfg is not None and saved_mod.get("enabled") and mod_cfg.get("enabled"):
        diffs += [f"mod.{k}: checkpoint {saved_mod.get(k)!r} vs config {mod_cfg.get(k)!r}"
                  for k in ("every", "first_routed", "router_weight")
                  if k in saved_mod and saved_mod.get(k) != mod_cfg.get(k)]
    if diffs:
        raise CheckpointError(f"{ckpt_dir} was saved for another model shape ({'; '.join(diffs)}); "
                              "point checkpoint.dir elsewhere or match the model config")


def load(ckpt_dir: str, chunks, optimizer=None, scheduler=None, load_rng: bool = True) -> dict:
    """Load model (and optimizer, scheduler, RNG) state in place; return the checkpoint's meta."""
    from megatron.core import dist_checkpointing

    meta = read_meta(ckpt_dir)
    if optimizer is not None:
        fused_adam.ensure_state(optimizer)  # the distributed optimizer's template needs AdamW's `step`
    template = sharded_state_dict(chunks, optimizer, is_loading=True)
    if scheduler is not None:
        template["scheduler"] = None
    try:
        state = dist_checkpointing.load(template, ckpt_dir)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a damaged file that passed the checks (torch's CheckpointException
        # from a multi-rank load is a BaseException, not an Exception)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot load {ckpt_dir}: {type(e).__name__}: {first}") from e
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(state[_model_key(i, len(chunks))], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_path = os.path.join(ckpt_dir, f"rng_rank{_rank():05d}.pt")
    if load_rng and os.path.exists(rng_path) and meta.get("world_size") == (
            dist.get_world_size() if dist.is_initialized() else 1):
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return meta


def publish(root: str, iteration: int, tmp: str, meta: dict, keep_last: int = 2) -> str:
    """All ranks: seal a fully written `iter_NNNNNNN.tmp` (integrity record, rename, move `latest`).

    Every rank must have finished writing into `tmp` (megatron's dist checkpoint, DeepSpeed's files)
    before this is called. mod_meta.json is written last inside `tmp`, then the directory is renamed,
    then `latest` moves: a crash at any point leaves `latest` on the previous complete checkpoint."""
    final = os.path.join(root, iter_dirname(iteration))
    files = _digests(tmp)
    if _rank() == 0:
        if os.environ.get(TEST_KILL_IN_SAVE_ENV) == str(iteration):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook, see TEST_KILL_IN_SAVE_ENV
        full_meta = dict(meta, iteration=iteration, world_size=_world(), format_version=FORMAT_VERSION,
                         files=files)
        _write_atomic(os.path.join(tmp, META), json.dumps(full_meta, indent=2, sort_keys=True))
        if os.path.exists(final):  # an older complete save of the same iteration: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
        _prune(root, keep_last, iteration)
    _barrier()
    return final
