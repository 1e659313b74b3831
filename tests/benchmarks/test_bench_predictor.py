"""benchmarks/bench_predictor.py on a GPU: a row per shape and a sweep (its refusal on a CPU: test_gpu_only.py)."""
from __future__ import annotations

import re

import pytest
import torch

from benchmarks import bench_predictor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_it_prints_a_row_per_shape_and_restores_the_launch_shape(capsys):
    from mod_megatron.kernels import predictor_triton as K

    default = dict(K.FWD)
    bench_predictor.main(["--shapes", "200x256", "72x512", "--iters", "2", "--sweep"])
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if re.match(r"\| (200|72) \| (256|512) \| [0-9.]+ \|", line)]
    assert [r.split("|")[1:3] for r in rows][:2] == [[" 200 ", " 256 "], [" 72 ", " 512 "]]
    assert all(float(r.split("|")[4]) > 0 for r in rows[:2])
    assert sum(1 for line in out if re.match(r"\| (200|72) \| (256|512) \| \d+ \| \d+ \|", line)) == 2 * 24
    assert K.FWD == default
