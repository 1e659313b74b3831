"""benchmarks/step_timeline.py: the trace analysis (busy = union of kernel intervals, idle gaps with
their neighbours, kernel categories) on synthetic traces; the GPU run itself is a device benchmark."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.step_timeline import analyse, category, format_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_busy_is_the_union_and_gaps_name_their_neighbours():
    events = [  # (name, start us, duration us), out of order on purpose
        ("triton_poi_fused_gelu_0", 5.0, 10.0),  # overlaps the GEMM (another stream)
        ("nvjet_sm90_tst_256x128", 0.0, 10.0),
        ("Memcpy DtoH (Device -> Pageable)", 15.0, 1.0),
        ("multi_tensor_apply_kernel<FusedAdam>", 36.0, 4.0),  # 20 us idle before it
        ("cudnn_sdpa_flash_fprop", 40.0, 10.0),
        ("void at::native::FillFunctor", 53.0, 2.0),  # 3 us idle before it
    ]
    r = analyse(events, steps=1)
    assert r["span_ms"] == pytest.approx(55e-3)
    assert r["busy_ms"] == pytest.approx(32e-3)  # 0-16, 36-50, 53-55
    assert r["idle_ms"] == pytest.approx(23e-3)
    assert r["categories_ms"] == pytest.approx({"gemm": 10e-3, "attention": 10e-3, "compiled": 10e-3,
                                                 "optimizer": 4e-3, "other": 3e-3})
    first, second = r["gaps"]
    assert first["us"] == 20.0 and first["after"].startswith("Memcpy DtoH") and "FusedAdam" in first["before"]
    assert second["us"] == 3.0 and second["after"] == "cudnn_sdpa_flash_fprop"
    want = {"<10us": [1, 3e-3], "10-50us": [1, 20e-3], "50-200us": [0, 0], ">=200us": [0, 0]}
    assert list(r["idle_by_gap_size"]) == list(want)
    assert all(r["idle_by_gap_size"][k] == pytest.approx(v) for k, v in want.items())
    two = analyse(events + [(n, s + 300.0, d) for n, s, d in events], steps=2)  # per step; 245 us between the two
    assert two["busy_ms"] == pytest.approx(32e-3) and len(two["gaps"]) == 5
    assert two["idle_by_gap_size"][">=200us"] == pytest.approx([0.5, 245e-3 / 2])
    boundary, recurring = two["idle_by_neighbours"][:2]  # ranked by idle time per step
    assert (boundary["gaps"], boundary["after"], boundary["ms"]) == (0.5, "void at::native::FillFunctor", pytest.approx(0.1225))
    assert (recurring["gaps"], recurring["after"][:11], recurring["before"]) == (  # 20 us before each optimizer step
        1.0, "Memcpy DtoH", "multi_tensor_apply_kernel<FusedAdam>")
    assert recurring["ms"] == pytest.approx(20e-3) and sum(p["gaps"] for p in two["idle_by_neighbours"]) == 2.5


def test_categories_and_empty_trace():
    assert [category(n) for n in ("nvjet_sm90", "cutlass_80_tensorop", "cudnn_generated_fort_native_sdpa",
                                  "triton_per_fused_native_layer_norm", "multi_tensor_apply_kernel", "Memset (Device)")] == \
        ["gemm", "gemm", "attention", "compiled", "optimizer", "other"]
    with pytest.raises(ValueError, match="no GPU kernels"):
        analyse([], steps=1)


def test_report_and_smoke_run():
    r = {"config": "x", "ms_per_step": 1.0, **analyse([("nvjet", 0.0, 10.0), ("triton_a", 30.0, 10.0)], steps=1)}
    text = format_report([r, {"config": "y", "error": "timed out after 5 s"}])
    assert "| x | 1.00 | 0.04 | 0.02 | 0.02 | 0.01 | 0.00 | 0.01 | 0.00 | 0.00 |" in text
    assert "| y | failed: timed out after 5 s |" in text and "# x: idle 20 us after nvjet | before triton_a" in text
    assert "# x: idle per step by gap size: <10us 0 gaps 0.00 ms, 10-50us 1 gaps 0.02 ms," in text
    out = subprocess.run([sys.executable, "benchmarks/step_timeline.py", "--smoke"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and "| synthetic |" in out.stdout, out.stderr
