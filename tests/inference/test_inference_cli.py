"""End to end on CPU: mod-train with aux losses and capacity warm-up, then mod-eval and mod-generate on
its checkpoint (real subprocesses), the prompt errors, and the decode benchmark at a tiny size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--model.num_layers=4", "--model.hidden_size=64", "--model.num_attention_heads=4",
         "--model.seq_length=64", "--mod.capacity=0.25", "--train.micro_batch_size=8",
         "--train.global_batch_size=8", "--train.lr=3e-3", "--train.warmup_iters=2", "--train.eval_iters=1",
         "--train.eval_interval=0", "--logging.log_interval=1", "--logging.progress_bar=false",
         "--train.iters=6", "--mod.capacity_warmup_iters=4"]


def _run(module, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    run = tmp_path_factory.mktemp("inference") / "run"
    proc = _run("mod_megatron.training.cli", "--config", "configs/tiny-cpu.yaml", *SMALL,
                f"--data.data_dir={prepared['data_dir']}", f"--logging.dir={run}", f"--checkpoint.dir={run / 'ckpt'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run


def _scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_train_logs_aux_losses_predictor_quality_and_capacity_warmup(trained):
    for layer in ("layer02", "layer04"):  # the MoD layers (megatron numbers layers from 1)
        for name in ("aux_bce", "predictor_loss", "predictor_accuracy", "predictor_recall",
                     "router_causal_accuracy"):
            values = _scalars(trained, f"routing/{layer}/{name}")
            assert len(values) == 6 and all(0.0 <= v < 5.0 for v in values), (name, values)
        # capacity 1.0 -> 0.25 over 4 steps; k = ceil(c * 64) follows it, then stays at 16 of 64
        assert _scalars(trained, f"routing/{layer}/capacity") == [1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25]
        assert _scalars(trained, f"routing/{layer}/fraction_routed") == [1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25]
    # at capacity 1.0 every token is in the top k: recall and accuracy are the share it routes
    acc = _scalars(trained, "routing/layer02/predictor_accuracy")
    recall = _scalars(trained, "routing/layer02/predictor_recall")
    assert acc[0] == pytest.approx(recall[0], abs=1e-6)


def test_mod_eval_prints_all_three_modes(trained):
    proc = _run("mod_megatron.inference.evaluate", "--checkpoint", str(trained / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for mode in ("topk", "causal-router", "causal-predictor"):
        cells = [c.strip() for c in rows[mode].split("|")[2:-1]]
        assert len(cells) == 4 and all(float(c) > 0 for c in cells)  # valid/held-out loss and ppl
    assert "| mode | valid loss | valid ppl | heldout loss | heldout ppl |" in out
    # the top-k loss is the training-time evaluation of the same batches
    summary = json.loads((trained / "summary.json").read_text())
    assert float(rows["topk"].split("|")[2]) == pytest.approx(summary["valid_loss"], abs=1e-4)
    assert "fraction of tokens routed per MoD layer" in out and "| 2 | 25.0% |" in out
    assert "| 2 | predictor |" in out and "| 4 | router |" in out


def test_mod_generate_batched_prompts(trained):
    proc = _run("mod_megatron.inference.generate", "--checkpoint", str(trained / "ckpt"),
                "--prompt", "To be, or not", "--prompt", "In the beginning God", "--max-new-tokens", "5",
                "--seed", "3", "--top-k", "20", "--top-p", "0.9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    heads = [line for line in proc.stdout.splitlines() if line.startswith("=== prompt:")]
    assert len(heads) == 2 and all("new tokens)" in h for h in heads)
    assert "To be, or not" in proc.stdout and "In the beginning God" in proc.stdout
    assert "routing causal-predictor" in proc.stderr


@pytest.mark.parametrize("prompt, needle", [("", "prompt 1 is empty"), ("word " * 200, "more than model.seq_length=64")])
def test_mod_generate_bad_prompt_is_one_error_line(trained, capsys, prompt, needle):
    from mod_megatron.inference.generate import main

    assert main(["--checkpoint", str(trained / "ckpt"), "--prompt", prompt, "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_mod_generate_missing_checkpoint(tmp_path, capsys):
    from mod_megatron.inference.generate import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")


def test_bench_decode_runs_tiny(megatron_single_rank, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_decode
    finally:
        sys.path.pop(0)
    assert bench_decode.main(["--layers", "2", "--hidden", "32", "--heads", "2", "--vocab", "64",
                              "--prompt-len", "4", "--new-tokens", "6", "--repeats", "1", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    dense = [l for l in out.splitlines() if l.startswith("| dense |")]
    mod = [l for l in out.splitlines() if l.startswith("| MoD |")]
    assert len(dense) == len(mod) == 1 and "| 1.00x |" in dense[0]
    # dense caches every token of every layer: 2 layers x 2 sequences x (4 + 5) tokens
    assert dense[0].split("|")[5].strip() == "36"
    assert int(mod[0].split("|")[5].strip()) < 36
