"""benchmarks/multigpu.py's scaling plan without GPUs: which runs it launches (1 GPU first, then each
layout at width n with its overrides and the --extra ones), the efficiency it computes from their
tokens/s, the table, and one clear error for an unknown layout."""
from __future__ import annotations

import pytest

from benchmarks import multigpu


def test_scaling_runs_layouts_with_their_overrides_and_computes_efficiency(monkeypatch):
    launched = []

    def fake_launch(out, name, nproc, args):
        launched.append((name, nproc, args))
        tokens = {"scale-1-GPU": 100.0, "scale-DP-4": 300.0}.get(name, 250.0)
        return {"summary": {"tokens_per_s": tokens, "mfu": 0.3, "train_loss": 7.0}, "wall_s": 1.0}

    monkeypatch.setattr(multigpu, "launch", fake_launch)
    rows = multigpu.scaling("unused", 4, iters=6, layouts="dp,dp-after,tp", extra=("--train.fused_optimizer=off",))
    assert [(name, n) for name, n, _ in launched] == [
        ("scale-1-GPU", 1), ("scale-DP-4", 4), ("scale-DP-4-all-reduce-after-the-backward", 4), ("scale-TP-4", 4)]
    for _, _, args in launched:
        assert "--train.iters=6" in args and "--train.fused_optimizer=off" in args
    assert "--parallel.overlap_grad_reduce=false" in launched[2][2]
    assert not any(a.startswith("--parallel.") for a in launched[1][2])  # DP is the launch width alone
    assert "--parallel.tp=4" in launched[3][2]
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.75, 0.625, 0.625])
    text = multigpu.tables({"scaling": rows})
    assert "| DP=4, all-reduce after the backward | 4 | 250 | 30.0% | 62% |" in text


def test_an_unknown_layout_is_one_error_naming_the_choices():
    with pytest.raises(RuntimeError, match="unknown scaling layout.*dq.*tp, pp, dp, dp-after"):
        multigpu.scaling("unused", 2, layouts="dp,dq")
