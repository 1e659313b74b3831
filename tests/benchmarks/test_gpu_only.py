"""The GPU-only benchmarks stop with one clear error line on a machine without CUDA."""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_predictor, bench_wgrad


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("bench", [bench_wgrad, bench_predictor], ids=lambda m: m.__name__.split(".")[-1])
def test_without_a_gpu_it_stops_with_one_line(bench):
    with pytest.raises(SystemExit, match=r"^error: \S+\.py needs a CUDA GPU \(.+\)$"):
        bench.main([])
