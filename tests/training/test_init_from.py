"""`--train.iters=0` writes the initialised model; `--checkpoint.init_from` starts any layout from it.

megatron-core's initialisation depends on the layout (a pipeline stage draws its layers from its own
RNG stream), so a PP=2 run from the seed alone is a different model from the 1-rank run. Starting
both from one written initialisation makes them the same run (fp32, CPU, gloo).
"""
from __future__ import annotations

import pytest

from tests.training.test_train_cli import run_ranks, run_train, scalars


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, prepared):
    tmp = tmp_path_factory.mktemp("init")
    proc = run_train(tmp, prepared, "--train.iters=0", run="init")
    ckpt = tmp / "init" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "0", proc.stdout[-2000:]
    assert (ckpt / "iter_0000000" / "mod_meta.json").is_file()
    return ckpt


def _losses(log_dir):
    return [v for _, v in scalars(log_dir, "train/loss")]


def test_init_from_carries_the_weights_to_any_layout(tmp_path, prepared, init_ckpt):
    steps = ["--train.iters=2", "--train.eval_interval=0"]
    run_train(tmp_path, prepared, *steps, run="plain")
    plain = _losses(tmp_path / "plain")
    # Another initialisation distribution, same shape: only the loaded weights can make it match.
    run_train(tmp_path, prepared, *steps, "--model.init_method_std=0.2", f"--checkpoint.init_from={init_ckpt}",
              run="loaded")
    loaded = _losses(tmp_path / "loaded")
    run_train(tmp_path, prepared, *steps, "--model.init_method_std=0.2", run="other")
    other = _losses(tmp_path / "other")
    assert len(plain) == 2 and loaded == pytest.approx(plain, abs=1e-6)
    assert abs(other[0] - plain[0]) > 1e-2  # the other initialisation really is another model

    pp_seed = _losses(run_ranks(tmp_path, prepared, "pp_seed", *steps, "--parallel.pp=2"))
    pp_init = _losses(run_ranks(tmp_path, prepared, "pp_init", *steps, "--parallel.pp=2",
                                f"--checkpoint.init_from={init_ckpt / 'iter_0000000'}"))
    assert pp_init == pytest.approx(plain, abs=1e-5)
    assert abs(pp_seed[0] - plain[0]) > 1e-4  # from the seed alone, PP=2 starts from other weights


def test_init_from_a_missing_checkpoint_is_one_clear_line(tmp_path, prepared):
    proc = run_train(tmp_path, prepared, "--train.iters=1", f"--checkpoint.init_from={tmp_path / 'nothing'}",
                     check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "init_from" in err[0], proc.stderr


def test_other_router_weight_kind_is_refused(tmp_path, prepared, init_ckpt):
    """A checkpoint's routers read with another logit -> r map would silently change the model."""
    proc = run_train(tmp_path, prepared, "--train.iters=1", "--mod.router_weight=linear",
                     f"--checkpoint.init_from={init_ckpt}", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "mod.router_weight: checkpoint 'sigmoid' vs config 'linear'" in err[0], proc.stderr
