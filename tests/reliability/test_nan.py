"""NaN/Inf in the loss or gradients: found on the step it happens, never applied, never saved.

The NaN comes from the MOD_TEST_INJECT_NAN test hook ("ITERS@LAYER": decoder layer LAYER's output
times NaN in those iterations), so loss and gradients really are non-finite."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from reliability_helpers import latest, run, scalars

TINY = ["--model.num_layers=4", "--model.hidden_size=32", "--model.num_attention_heads=4", "--model.seq_length=16",
        "--model.vocab_size=100", "--train.micro_batch_size=2", "--train.global_batch_size=4"]


class _Tokens:
    """A fixed synthetic dataset: sample i is a deterministic token sequence."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, 100, (17,), generator=g)
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(16),
                "position_ids": torch.arange(16)}


@pytest.mark.parametrize("fused", ["off", "on"], ids=["host-decides", "fused-adamw-skips-on-device"])
def test_skipped_step_changes_no_parameter_and_no_optimizer_state(megatron_single_rank, tmp_path, monkeypatch, fused):
    """With torch's fused AdamW the update is queued before the host reads the finiteness flag, and the
    kernel itself must leave everything as it was (training/optimizer_step.py, `deferrable`)."""
    from mod_megatron.config import load_config
    from mod_megatron.training import optimizer_step
    from mod_megatron.training.distributed import Layout
    from mod_megatron.training.trainer import Trainer

    cfg = load_config(None, TINY + ["--checkpoint.load=false", f"--logging.dir={tmp_path}",
                                    "--logging.tensorboard=false", "--logging.progress_bar=false",
                                    f"--train.fused_optimizer={fused}"])
    layout = Layout(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                    device=torch.device("cpu"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        trainer = Trainer(cfg, layout, _Tokens(), None, None)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert optimizer_step.deferrable(trainer.optimizer) == (fused == "on")
    it = trainer._iterators("train", 0)
    out = trainer.train_step(it)  # one good step: Adam state exists
    assert not out["skipped"] and out["grad_norm"] > 0  # clip_grad=1.0: the norm is computed and reported
    trainer.iteration = 1
    params = [p.detach().clone() for p in trainer.chunks[0].parameters()]
    moments = [v.clone() for st in trainer.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    lr_steps = trainer.scheduler.num_steps

    monkeypatch.setenv("MOD_TEST_INJECT_NAN", "2@3")
    out = trainer.train_step(it)
    assert out["skipped"] and math.isnan(out["loss"])
    assert out["nonfinite"] == "first non-finite output at decoder layer 3 (FusedTransformerLayer), micro-batch 0"
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.chunks[0].parameters()))
    after = [v for st in trainer.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(moments, after)) and trainer.scheduler.num_steps == lr_steps

    trainer.iteration = 2  # the hook is for iteration 2 only: the next step is finite and applied
    out = trainer.train_step(it)
    assert not out["skipped"] and math.isfinite(out["loss"])
    assert not all(torch.equal(a, b) for a, b in zip(params, trainer.chunks[0].parameters()))
    trainer.log.close()


def test_skip_policy_counts_and_stops_after_max_consecutive(prepared, tmp_path):
    """NaN at 3 (skipped), 4 fine, 5 and 6 skipped (2 in a row), 7: 3 in a row > max_skipped_steps=2."""
    proc = run(prepared, tmp_path / "log", tmp_path / "ckpt", "--train.max_skipped_steps=2",
               extra_env={"MOD_TEST_INJECT_NAN": "3,5,6,7@2"})
    assert proc.returncode == 3, proc.stdout[-3000:]
    for it, row in ((3, 1), (5, 1), (6, 2)):
        assert (f"iteration {it}: non-finite loss (first non-finite output at decoder layer 2 "
                f"(MoDTransformerLayer), micro-batch 0); update skipped ({row} in a row") in proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert errors == ["error: iteration 7: non-finite loss (first non-finite output at decoder layer 2 "
                      "(MoDTransformerLayer), micro-batch 0); 3 non-finite steps in a row > "
                      "train.max_skipped_steps=2; stopped, the last checkpoint is kept"]
    assert dict(scalars(tmp_path / "log", "train/skipped_steps")) == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3}
    train = dict(scalars(tmp_path / "log", "train/loss"))
    assert all(math.isfinite(train[s]) for s in (1, 2, 4)) and math.isnan(train[5])
    assert latest(tmp_path / "ckpt") == 4  # saved at 4 (finite params), nothing after


def test_stop_policy_names_step_and_layer(prepared, tmp_path):
    proc = run(prepared, tmp_path / "log", tmp_path / "ckpt", "--train.nan_policy=stop",
               extra_env={"MOD_TEST_INJECT_NAN": "6@3"})
    assert proc.returncode == 3, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert errors == ["error: iteration 6: non-finite loss (first non-finite output at decoder layer 3 "
                      "(FusedTransformerLayer), micro-batch 0); stopped before applying the update "
                      "(train.nan_policy=stop); rerun to resume from the last checkpoint"]
    assert latest(tmp_path / "ckpt") == 4
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000004", "latest"]
