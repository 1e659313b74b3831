"""Fixtures of the fault-injection tests; the helpers are in reliability_helpers.py."""
from __future__ import annotations

import shutil

import pytest

from reliability_helpers import losses, run


@pytest.fixture(scope="session")
def straight(prepared, tmp_path_factory):
    """An uninterrupted ITERS-step run: its log dir (TensorBoard losses) and checkpoint dir."""
    root = tmp_path_factory.mktemp("straight")
    proc = run(prepared, root / "log", root / "ckpt")
    assert proc.returncode == 0, proc.stdout[-3000:]
    return {"log": root / "log", "ckpt": root / "ckpt", "losses": losses(root / "log")}


@pytest.fixture
def ckpt_copy(straight, tmp_path):
    """A private copy of the straight run's checkpoint directory (iterations 12 and 16, latest 16)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(straight["ckpt"], dst)
    return dst
