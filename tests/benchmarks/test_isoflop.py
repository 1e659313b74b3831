"""benchmarks/isoflop.py end to end on CPU (`--smoke`: tiny model, two budgets of a few steps, real
mod-train and mod-eval subprocesses) and its one-line error when the corpus is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "isoflop.py")


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_smoke_writes_results_and_table(tmp_path, prepared):
    out = tmp_path / "out"
    proc = run("--smoke", "--parallel", f"--data-dir={prepared['data_dir']}", f"--out={out}",
               f"--runs-dir={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["name"] for r in runs) == ["b1-dense", "b1-mod", "b2-dense", "b2-mod"]
    by = {r["name"]: r for r in runs}
    for r in runs:
        assert "error" not in r
        assert abs(r["total_flops"] - r["budget"]) <= r["flops_per_step"] / 2  # matched to the budget
        assert r["curve"][-1][0] == r["iters"] and r["params"] > 0
        assert set(r["eval"]["topk"]) == {"valid", "heldout"}
        assert abs(r["eval"]["topk"]["valid"] - r["valid_loss"]) < 1e-3  # mod-eval agrees with training's eval
        # --eval-points 2 (smoke): one evaluation during training, one at the end, both splits
        assert len(r["eval_curve"]) == 2 and r["eval_curve"][-1][0] == r["iters"]
        assert r["eval_curve"][-1][1:] == [round(r["valid_loss"], 4), round(r["heldout_loss"], 4)]
    for b in ("b1", "b2"):
        dense, mod = by[f"{b}-dense"], by[f"{b}-mod"]
        assert mod["flops_per_step"] < dense["flops_per_step"] and mod["iters"] >= dense["iters"]
        assert set(mod["eval"]) == {"topk", "causal-router", "causal-predictor"} and set(dense["eval"]) == {"topk"}
        assert mod["params"] > dense["params"]  # router + predictor
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| budget | model | params | iters | total FLOPs | wall s | tokens/s | valid (topk)")
    assert len(table) == 2 + 4 and (out / "results.md").read_text().startswith(table[0])
    assert sorted(os.listdir(out / "logs")) == sorted(f"{n}.{step}.log" for n in by for step in ("train", "eval"))


def test_missing_corpus_is_one_error_line(tmp_path):
    proc = run(f"--data-dir={tmp_path}", "--dry-run", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "mod-preprocess --corpus debian-docs" in proc.stderr


def test_match_step_gives_a_deeper_mod_with_the_dense_steps(prepared):
    """--match step: MoD made deeper to dense's FLOPs per step; both the same steps (the plan only)."""
    proc = run("--smoke", "--match", "step", "--dry-run", f"--data-dir={prepared['data_dir']}", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[0].startswith("b") and parts[2] == "layers":
            plan[parts[0]] = {"layers": int(parts[1]), "steps": int(parts[3]), "flops": float(parts[5])}
    assert sorted(plan) == ["b1-dense", "b1-mod", "b2-dense", "b2-mod"]
    for b in ("b1", "b2"):
        dense, mod = plan[f"{b}-dense"], plan[f"{b}-mod"]
        assert mod["steps"] == dense["steps"] and mod["layers"] > dense["layers"] and mod["layers"] % 2 == 0
        assert abs(mod["flops"] - dense["flops"]) / dense["flops"] < 0.25  # nearest depth (smoke: 2 layers)


def test_time_to_dense_loss_reads_the_curves():
    from benchmarks.isoflop import time_to_dense_loss

    def row(model, iters, curve, tokens_per_s, budget_index=1):
        return {"model": model, "budget_index": budget_index, "budget": 4e15, "iters": iters, "curve": curve,
                "tokens": iters * 1000, "tokens_per_s": tokens_per_s}

    rows = [row("dense", 100, [[50, 4.0], [100, 3.0]], 10_000),  # 1000 tokens/step at 10k/s: 0.1 s a step
            row("mod", 200, [[50, 3.5], [100, 2.9], [200, 2.5]], 20_000)]  # 0.05 s a step
    (line,) = time_to_dense_loss(rows)
    assert line == ("budget 4.00e+15: dense final train loss 3.0000 after 10.0 s of training; "
                    "MoD reached it at step 100 of 200, 5.0 s")
    rows[1]["curve"] = [[200, 3.1]]
    assert time_to_dense_loss(rows)[0].endswith("; MoD did not reach it in its 200 steps")
    assert time_to_dense_loss(rows[:1]) == []  # no MoD run for the budget: nothing to compare


def test_time_to_dense_loss_reads_the_evaluations():
    from benchmarks.isoflop import time_to_dense_loss

    rows = [{"model": "dense", "budget_index": 1, "budget": 4e15, "iters": 100, "curve": [[100, 3.0]],
             "eval_curve": [[50, 4.0, 6.0], [100, 3.2, 5.0]], "tokens": 100_000, "tokens_per_s": 10_000},
            {"model": "mod", "budget_index": 1, "budget": 4e15, "iters": 200, "curve": [[200, 2.5]],
             "eval_curve": [[100, 3.1, 5.5], [150, 3.0, 5.1], [200, 2.9, 5.2]], "tokens": 200_000,
             "tokens_per_s": 20_000}]
    train, valid, heldout = time_to_dense_loss(rows)
    assert train.endswith("MoD reached it at step 200 of 200, 10.0 s")
    assert valid == ("budget 4.00e+15: dense final valid loss (evaluated during training) 3.2000 after 10.0 s "
                     "of training; MoD reached it at step 100 of 200, 5.0 s")
    assert heldout.startswith("budget 4.00e+15: dense final held-out loss (evaluated during training) 5.0000")
    assert heldout.endswith("MoD did not reach it in its 200 steps")  # 5.1 at best: never <= 5.0
    del rows[0]["eval_curve"]
    assert len(time_to_dense_loss(rows)) == 1  # only the training loss where a run has no evaluations


def test_report_reprints_a_stored_run():
    proc = run("--report", os.path.join(REPO, "docs", "data", "isoflop-h200-fused.json"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 4 and "| 1.20e+16 | mod | 29.5M | 2699 |" in proc.stdout
    assert "budget 4.00e+15: dense final train loss 3.5929 after 15.7 s of training; " \
           "MoD reached it at step 396 of 900, 9.3 s" in proc.stdout
