"""benchmarks/bench_wgrad.py on a GPU: one table row per weight and token count (its refusal on a CPU: test_gpu_only.py)."""
from __future__ import annotations

import re

import pytest
import torch

from benchmarks import bench_wgrad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_it_prints_a_row_per_shape(capsys):
    bench_wgrad.main(["--weights", "96,64", "64,96", "--tokens", "40", "72"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d+x\d+ \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["96x64", "96x64", "64x96", "64x96"]
    assert all(float(r.split("|")[5]) > 0 for r in rows)
