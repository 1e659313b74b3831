"""benchmarks/ab.py: ABBA order, the per-config summary, and a CPU smoke run in which each tree's runs
really import that tree's package (the base: a copy of this one)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks.ab import format_rows, order, summarise

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rounds_alternate_which_tree_goes_first():
    assert order(3) == [(1, "base"), (1, "new"), (2, "new"), (2, "base"), (3, "base"), (3, "new")]


def test_summary_takes_medians_and_the_range_of_paired_ratios():
    def run(tree, rnd, config, tps):
        return {"tree": tree, "round": rnd, "config": config, "tokens_per_s": tps}

    results = [run("base", 1, "gpt-125m-dense", 100.0), run("new", 1, "gpt-125m-dense", 110.0),
               run("new", 2, "gpt-125m-dense", 104.0), run("base", 2, "gpt-125m-dense", 100.0),
               run("base", 3, "gpt-125m-dense", 90.0), run("new", 3, "gpt-125m-dense", 99.0),
               run("base", 1, "gpt-125m-mod", 150.0), run("new", 1, "gpt-125m-mod", 180.0),
               {"tree": "new", "round": 1, "config": "mode-staged-125m", "error": "out of memory"}]
    dense, mod, mode = summarise(results)
    assert (dense["base"], dense["new"]) == (100.0, 104.0) and dense["ratio"] == pytest.approx(1.04)
    assert (dense["low"], dense["high"]) == pytest.approx((1.04, 1.1))  # per round: 1.10, 1.04, 1.10
    assert mod["ratio"] == pytest.approx(1.2) and mode["ratio"] is None and mode["errors"] == ["new round 1: out of memory"]
    text = format_rows([dense, mod, mode])
    assert "| gpt-125m-dense | 100 | 104 | 1.040 | 1.040 - 1.100 |" in text
    assert "| mode-staged-125m | failed: new round 1: out of memory |" in text
    assert "gpt-125m-mod vs gpt-125m-dense: base 1.500x, new 1.731x" in text


def test_smoke_runs_each_tree_from_its_own_package(tmp_path):
    base = tmp_path / "base"
    for part in ("mod_megatron", "benchmarks", "configs"):
        shutil.copytree(os.path.join(REPO, part), base / part, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "ab.py"), "--smoke", f"--base={base}",
                           "--configs", "gpt-125m-dense", "--rounds=1", "--warmup=1", "--iters=1", f"--json={out}"],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert [(r["round"], r["tree"]) for r in runs] == [(1, "base"), (1, "new")]
    assert [os.path.realpath(r["package"]) for r in runs] == [os.path.realpath(base), os.path.realpath(REPO)]
    assert any(line.startswith("| gpt-125m-dense | ") for line in proc.stdout.splitlines())


def test_a_missing_base_is_one_line_with_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "ab.py"), f"--base={tmp_path}",
                           "--configs", "gpt-125m-dense"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "git archive REV | tar -x -C DIR" in proc.stderr.strip().splitlines()[-1]
