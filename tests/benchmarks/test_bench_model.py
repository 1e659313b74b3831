"""benchmarks/bench_model.py --smoke on the CPU: tiny dense, MoD and MoDE configs through the real Trainer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_model.py"), "--smoke",
                           "--warmup=1", "--iters=2", f"--json={out}"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["config"] for r in results] == ["gpt-125m-dense", "gpt-125m-mod", "mode-staged-125m"]
    for r in results:
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 and r["card"] == "CPU" and r["mfu"] is None
    dense, mod, mode = results
    assert mod["flops_per_token"] < dense["flops_per_token"]  # routed layers count only their k tokens
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| config | tokens/s | model TFLOP/s | MFU | peak memory GiB | vs dense |"
    assert len(table) == 5 and table[2].endswith("| 1.00x |")


def test_tokens_per_step_sets_each_configs_global_batch():
    import pytest

    from benchmarks.bench_model import batch_override

    # 0.5M tokens: 256 sequences of 2048 (16 micro-batches of 16) / 512 of 1024 for the 125M config
    assert batch_override("gpt-368m-dense", 524288, []) == "--train.global_batch_size=256"
    assert batch_override("gpt-1.3b-mod", 524288, []) == "--train.global_batch_size=256"
    assert batch_override("gpt-125m-dense", 524288, ["--model.seq_length=2048"]) == "--train.global_batch_size=256"
    with pytest.raises(SystemExit, match="not a whole number of gpt-368m-dense's micro-batches .16 x 2048"):
        batch_override("gpt-368m-dense", 500000, [])
