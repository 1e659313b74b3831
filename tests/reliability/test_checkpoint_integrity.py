"""Checkpoint integrity: sizes + sha256 recorded at save and checked at load; a truncated or corrupt
checkpoint is passed over for the previous valid one (named, with the reason); pruning keeps `latest`
and its fallback; non-finite parameters are never saved."""
from __future__ import annotations

import json
import os

import pytest
import torch

from reliability_helpers import ITERS, losses, max_dloss, resumed_at, run

TINY = ["--model.num_layers=2", "--model.hidden_size=32", "--model.num_attention_heads=4", "--model.seq_length=16",
        "--model.vocab_size=100"]


@pytest.fixture(scope="module")
def model(megatron_single_rank):
    from mod_megatron.config import load_config
    from mod_megatron.training.builder import build_model_chunks, build_optimizer

    cfg = load_config(None, TINY)
    chunks, _ = build_model_chunks(cfg, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(cfg, chunks, torch.float32)
    return chunks, optimizer, scheduler


def _save(model, root, iteration, keep_last=2):
    from mod_megatron.training import checkpoint as ckpt

    chunks, optimizer, scheduler = model
    return ckpt.save(str(root), iteration, chunks, optimizer, scheduler, {"consumed_samples": iteration}, keep_last)


def _shard(path):
    return os.path.join(path, sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0])


def test_save_records_size_and_sha256_of_every_file(model, tmp_path):
    import hashlib

    path = _save(model, tmp_path, 1)
    files = json.load(open(os.path.join(path, "mod_meta.json")))["files"]
    assert sorted(files) == sorted(n for n in os.listdir(path) if n != "mod_meta.json")
    for name, rec in files.items():
        data = open(os.path.join(path, name), "rb").read()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_truncated_latest_falls_back_to_previous(model, tmp_path):
    from mod_megatron.training import checkpoint as ckpt

    _save(model, tmp_path, 1)
    p2 = _save(model, tmp_path, 2)
    shard = _shard(p2)
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2)
    path, notes = ckpt.select(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "iter_0000001")
    assert notes == [f"iter_0000002 unusable: {os.path.basename(shard)} is truncated ({size // 2} bytes, "
                     f"recorded {size})"]


def test_flipped_byte_is_caught_by_sha256(model, tmp_path):
    from mod_megatron.training import checkpoint as ckpt

    _save(model, tmp_path, 1)
    shard = _shard(_save(model, tmp_path, 2))
    with open(shard, "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(shard) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    path, notes = ckpt.select(str(tmp_path))
    assert path.endswith("iter_0000001") and "sha256" in notes[0] and "iter_0000002" in notes[0]
    assert ckpt.select(str(tmp_path), hashes=False)[0].endswith("iter_0000002")  # sizes alone can't see it


def test_unreadable_tracker_and_all_corrupt(model, tmp_path):
    from mod_megatron.training import checkpoint as ckpt

    _save(model, tmp_path, 1)
    (tmp_path / "latest").write_text("garbage")
    path, notes = ckpt.select(str(tmp_path))
    assert path.endswith("iter_0000001") and "not an iteration" in notes[0]
    os.remove(os.path.join(path, "common.pt"))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.select(str(tmp_path))
    assert "no usable checkpoint" in str(e.value) and "common.pt is missing" in str(e.value)
    assert "\n" not in str(e.value)


def test_prune_keeps_latest_and_its_fallback(model, tmp_path):
    from mod_megatron.training import checkpoint as ckpt

    for it in (1, 2, 3):
        _save(model, tmp_path, it)
    assert sorted(ckpt.complete_iterations(str(tmp_path))) == [2, 3]
    # A fresh run in the same directory (checkpoint.load=false) saves iteration 1: `latest` is 1 now; the
    # newer 2 and 3 belong to the earlier run and are left alone, 1 itself is kept.
    _save(model, tmp_path, 1)
    assert (tmp_path / "latest").read_text().strip() == "1"
    assert sorted(ckpt.complete_iterations(str(tmp_path))) == [1, 2, 3]
    _save(model, tmp_path, 4, keep_last=1)
    assert sorted(ckpt.complete_iterations(str(tmp_path))) == [4]


def test_save_refuses_non_finite_parameters(model, tmp_path):
    from mod_megatron.training import checkpoint as ckpt

    _save(model, tmp_path, 1)
    before = sorted(os.listdir(tmp_path))
    param = next(model[0][0].parameters())
    keep = param.detach().clone()
    param.data.view(-1)[0] = float("nan")
    try:
        with pytest.raises(ckpt.CheckpointError, match="refusing to save iteration 2: parameter .* not finite"):
            _save(model, tmp_path, 2)
    finally:
        param.data.copy_(keep)
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "latest").read_text().strip() == "1"


def test_truncated_checkpoint_run_resumes_from_previous(prepared, straight, ckpt_copy, tmp_path):
    """End to end: truncate a shard of `latest` (16); the run says so, resumes from 12 and reproduces
    the straight run's losses 13..16."""
    shard = _shard(str(ckpt_copy / f"iter_{ITERS:07d}"))
    os.truncate(shard, 1000)
    proc = run(prepared, tmp_path / "log", ckpt_copy)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"checkpoint fallback: iter_{ITERS:07d} unusable: {os.path.basename(shard)} is truncated" in proc.stdout
    assert resumed_at(proc.stdout) == ITERS - 4
    delta = max_dloss(losses(tmp_path / "log"), straight["losses"], range(ITERS - 3, ITERS + 1))
    print(f"fallback resume: max |dloss| = {delta:.3g}")
    assert delta <= 1e-6
    assert os.path.getsize(shard) > 1000  # the damaged checkpoint was replaced by the new save
