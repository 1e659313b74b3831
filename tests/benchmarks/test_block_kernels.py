"""benchmarks/block_kernels.py: the per-step kernel summary on synthetic traces; the GPU run itself is
a device benchmark, and without CUDA the script says so in one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.block_kernels import report, summarise

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_per_step_count_sum_span_and_ranking():
    kernels = [("norm", 12.0, 14.0), ("gemm", 0.0, 10.0), ("gemm", 20.0, 30.0), ("norm", 32.0, 34.0),
               ("copy", 40.0, 41.0)]  # two steps, out of order on purpose
    s = summarise(kernels, steps=2, top=2)
    assert s["kernels"] == 2.5 and s["sum_us"] == pytest.approx(12.5) and s["span_us"] == pytest.approx(20.5)
    assert s["top"] == [("gemm", 1.0, 10.0), ("norm", 1.0, 2.0)]  # per step, largest first, cut at top
    text = report("0.125", 30.0, s)
    assert text.splitlines()[0] == ("## 0.125: wall 30.0 us/step, 2 kernels/step, kernel sum 12.5 us, "
                                    "traced span 20.5 us")
    assert "10.0 us  x1   gemm" in text


def test_an_empty_trace_is_an_error():
    with pytest.raises(ValueError, match="no GPU kernels"):
        summarise([], steps=1)


def test_smoke_runs_and_a_cpu_run_is_refused_in_one_line():
    script = os.path.join(REPO, "benchmarks", "block_kernels.py")
    smoke = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=120)
    assert smoke.returncode == 0 and smoke.stdout.startswith("## smoke:"), smoke.stderr
    import torch

    if torch.cuda.is_available():
        return
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr.strip().splitlines()[-1]
