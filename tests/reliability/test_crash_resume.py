"""kill -9 mid-training and mid-save: the restart resumes from the last complete checkpoint and
reproduces the uninterrupted run's per-step losses (same data order, RNG, optimizer state)."""
from __future__ import annotations

import os

from reliability_helpers import ITERS, kill9, latest, losses, max_dloss, popen, resumed_at, run, wait_for_line


def test_kill9_mid_training_resumes_same_losses(prepared, straight, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "first.log"
    proc = popen(prepared, tmp_path / "first", ckpt, log_file=log)
    wait_for_line(proc, log, "iter      6/")  # the save at 4 is done by then
    assert kill9(proc) == -9
    last = latest(ckpt)
    assert 4 <= last < ITERS and last % 4 == 0
    again = run(prepared, tmp_path / "second", ckpt)
    assert again.returncode == 0, again.stdout[-3000:]
    assert resumed_at(again.stdout) == last
    resumed = losses(tmp_path / "second")
    steps = list(range(last + 1, ITERS + 1))
    assert sorted(resumed) == steps
    delta = max_dloss(resumed, straight["losses"], steps)
    print(f"kill -9 at/after iteration 6, resumed from {last}: max |dloss| over {len(steps)} steps = {delta:.3g}")
    assert delta <= 1e-6


def test_kill9_during_save_keeps_previous_checkpoint(prepared, straight, tmp_path):
    """MOD_TEST_KILL_IN_SAVE=8: rank 0 SIGKILLs itself after the shards of iteration 8 are written,
    before mod_meta.json and the rename; `latest` stays on 4 and the restart reproduces the losses."""
    ckpt = tmp_path / "ckpt"
    first = run(prepared, tmp_path / "first", ckpt, extra_env={"MOD_TEST_KILL_IN_SAVE": "8"})
    assert first.returncode == -9, first.stdout[-2000:]
    partial = ckpt / "iter_0000008.tmp"
    assert any(n.endswith(".distcp") for n in os.listdir(partial))  # the kill really hit mid-save
    assert not (partial / "mod_meta.json").exists() and not (ckpt / "iter_0000008").exists()
    assert latest(ckpt) == 4
    again = run(prepared, tmp_path / "second", ckpt)
    assert again.returncode == 0, again.stdout[-3000:]
    assert resumed_at(again.stdout) == 4
    assert not partial.exists() and latest(ckpt) == ITERS  # the leftover is removed by the next save
    resumed = losses(tmp_path / "second")
    delta = max_dloss(resumed, straight["losses"], range(5, ITERS + 1))
    print(f"kill -9 inside the save of iteration 8, resumed from 4: max |dloss| = {delta:.3g}")
    assert delta <= 1e-6
