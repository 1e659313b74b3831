"""mod-convert dense-to-mod: a dense checkpoint becomes a MoD model that starts at the dense model.

The dense source is trained for 40 steps on the synthetic Markov chain (held-out loss ~3.23). Measured
on CPU/fp32 after conversion (routers zero, r = 2*sigmoid(0) = 1), on 8 held-out sequences:
- capacity 1.0: max |logit - dense logit| ~1e-6, identical loss; a plain sigmoid router (r = 0.5)
  would be 0.40 off in the logits;
- capacity 0.5 (layers 2 and 4 routed): loss +0.051 over the dense model (bound asserted: 0.1);
- training on from the converted checkpoint with capacity warm-up starts at the dense model's loss.
"""
from __future__ import annotations

import json
from functools import partial

import pytest

from mod_megatron.convert.cli import main
from tests.convert.convert_helpers import (
    DENSE, checkpoint_overrides, make_checkpoint, rank_dense_vs_mod, rank_loss_on, run_layout)

LOSS_BOUND_HALF_CAPACITY = 0.1  # |loss(MoD at capacity 0.5) - loss(dense)| right after conversion
LOGIT_TOL = 1e-5  # capacity 1.0: the converted model is the dense model
DENSE_ITERS = 40


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2m")
    dense = make_checkpoint(root / "dense", *DENSE, iters=DENSE_ITERS)
    rc = main(["dense-to-mod", "--checkpoint", str(dense), "--output", str(root / "mod"), "--mod.capacity=0.5",
               "--mod.predictor=true", "--tokenizer", str(root / "dense" / "tokenizer.model")])
    assert rc == 0
    return {"root": root, "dense": dense, "mod": root / "mod"}


def test_converted_model_starts_at_the_dense_model(converted, capsys):
    out = run_layout(partial(rank_dense_vs_mod, dense_dir=str(converted["dense"]), mod_dir=str(converted["mod"])),
                     1, overrides=checkpoint_overrides(converted["dense"]))[0]
    print({k: round(v, 7) for k, v in out.items()})
    assert out["2sigmoid@1.0 logits"] < LOGIT_TOL
    assert abs(out["2sigmoid@1.0"] - out["dense"]) < LOGIT_TOL
    assert abs(out["2sigmoid@0.5"] - out["dense"]) < LOSS_BOUND_HALF_CAPACITY
    assert out["sigmoid@1.0 logits"] > 100 * LOGIT_TOL  # the r = 1 init is what makes it exact


def test_converted_checkpoint_meta(converted):
    root = converted["mod"]
    assert (root / "latest").read_text().strip() == "0"
    meta = json.loads((root / "iter_0000000" / "mod_meta.json").read_text())
    src = json.loads((converted["dense"] / f"iter_{DENSE_ITERS:07d}" / "mod_meta.json").read_text())
    assert meta["iteration"] == 0 and meta["source_iteration"] == DENSE_ITERS and meta["model_only"]
    assert meta["converted_from"] == str(converted["dense"] / f"iter_{DENSE_ITERS:07d}")
    assert meta["consumed_samples"] == src["consumed_samples"] == DENSE_ITERS * 8
    assert meta["tokenizer_sha256"] == src["tokenizer_sha256"]
    mod = meta["config"]["mod"]
    assert mod["enabled"] and mod["capacity"] == 0.5 and mod["router_weight"] == "2sigmoid" and mod["predictor"]
    assert meta["conversion"]["routed_layers"] == [2, 4]
    assert meta["conversion"]["max_abs_logit_diff_capacity_1"] < LOGIT_TOL
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1, "ep": 1, "vpp": None}


def test_training_continues_from_the_dense_models_loss(converted):
    """mod-train's Trainer resumes the converted checkpoint (fresh optimizer, data where the dense run
    stopped); with capacity warm-up its first step runs at capacity 1.0, i.e. on the dense model."""
    losses = []
    mod_flags = ["--mod.enabled=true", "--mod.capacity=0.5", "--mod.router_weight=2sigmoid", "--mod.predictor=true",
                 "--mod.capacity_warmup_iters=10"]
    make_checkpoint(converted["root"] / "cont", *mod_flags, iters=2, ckpt_dir=converted["mod"], losses=losses)
    start = DENSE_ITERS * 8
    dense_loss = run_layout(partial(rank_loss_on, ckpt_dir=str(converted["dense"]), start=start, n=8), 1,
                            overrides=checkpoint_overrides(converted["dense"]))[0]
    assert len(losses) == 2  # iterations 1 and 2 of the MoD run
    assert abs(losses[0] - dense_loss) < 1e-4, (losses, dense_loss)
    assert (converted["mod"] / "iter_0000002" / "mod_meta.json").is_file()
