"""Checkpoints: megatron-core dist_checkpointing, written atomically, found through a `latest` tracker.

Layout under checkpoint.dir:

    iter_0000100/          a complete checkpoint (dist-checkpoint shards + common.pt + mod_meta.json)
    iter_0000200.tmp/      one being written; never loaded, removed by the next save
    latest                 text file "200", replaced atomically after the rename of iter_0000200

Every rank writes into the `.tmp` directory; after a barrier rank 0 writes mod_meta.json (the
completion mark), renames the directory and only then moves `latest`. A crash at any point leaves
`latest` on the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

TRACKER = "latest"
META = "mod_meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading)
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


def save(root: str, iteration: int, chunks, optimizer, scheduler, meta: dict, keep_last: int = 2) -> str:
    """Write a complete checkpoint of every rank's state for `iteration`; return its directory."""
    from megatron.core import dist_checkpointing

    final = os.path.join(root, iter_dirname(iteration))
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    state = sharded_state_dict(chunks, optimizer)
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    dist_checkpointing.save(state, tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{_rank():05d}.pt"))
    _barrier()

    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        full_meta = dict(meta, iteration=iteration, world_size=world, format_version=FORMAT_VERSION)
        _write_atomic(os.path.join(tmp, META), json.dumps(full_meta, indent=2, sort_keys=True))
        if os.path.exists(final):  # an older complete save of the same iteration: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    done = sorted(complete_iterations(root))
    for it in done[:-keep_last]:
        shutil.rmtree(os.path.join(root, iter_dirname(it)), ignore_errors=True)
    for name in os.listdir(root):  # leftovers of crashed saves
        if name.endswith(".tmp") and name.startswith("iter_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


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


def check_compatible(meta: dict, model_cfg: dict, ckpt_dir: str) -> None:
    """Refuse a checkpoint of another model shape with one clear line."""
    saved = meta.get("config", {}).get("model", {})
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "normalization", "activation", "position_embedding", "untie_embeddings")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {model_cfg.get(k)!r}"
             for k in keys if k in saved and saved.get(k) != model_cfg.get(k)]
    if diffs:
        raise CheckpointError(f"{ckpt_dir} was saved for another model shape ({'; '.join(diffs)}); "
                              "point checkpoint.dir elsewhere or match the model config")


def load(ckpt_dir: str, chunks, optimizer=None, scheduler=None, load_rng: bool = True) -> dict:
    """Load model (and optimizer, scheduler, RNG) state in place; return the checkpoint's meta."""
    from megatron.core import dist_checkpointing

    meta = read_meta(ckpt_dir)
    template = sharded_state_dict(chunks, optimizer, is_loading=True)
    if scheduler is not None:
        template["scheduler"] = None
    state = dist_checkpointing.load(template, ckpt_dir)
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
