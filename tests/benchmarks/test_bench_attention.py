"""benchmarks/bench_attention.py on a CPU: one row per shape and backend, FLOPs from the timings,
and a backend that cannot run the shape gets its reason in the row instead of a crash."""
from __future__ import annotations

from benchmarks import bench_attention as ba


def test_rows_and_table_on_cpu():
    row = ba.measure((1, 2, 16, 8), "MATH", "cpu", iters=1, warmup=0)
    assert row["fwd_ms"] > 0 and row["step_ms"] > 0
    assert abs(row["fwd_tflops"] - 4 * 2 * 16 * 16 * 8 / 2 / row["fwd_ms"] / 1e9) < 1e-12
    refused = ba.measure((1, 2, 16, 8), "CUDNN_ATTENTION", "cpu", iters=1, warmup=0)
    assert "error" in refused and "fwd_ms" not in refused  # no cuDNN kernel for CPU tensors
    text = ba.table([row, refused])
    assert text.count("\n") == 3 and "| MATH |" in text and "CUDNN_ATTENTION | - |" in text


def test_main_prints_the_table(capsys):
    assert ba.main(["--shapes", "1,2,16,8", "--backends", "MATH", "--iters", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "cpu (fp32)" in out and "| [1, 2, 16, 8] | MATH |" in out
