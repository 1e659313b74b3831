"""Multi-GPU checks on one node through NCCL: `python benchmarks/multigpu.py all --out runs/multigpu`.

Every run goes through launch/local.sh (torchrun --standalone, one process per GPU), the path a user
takes on one node. Three parts, each printing a markdown table:

  equivalence  a small MoD GPT (and a staged MoDE GPT) for 20 steps on 1 GPU, then at TP=2, TP=2+SP,
               PP=2, DP=2 (and EP=2, TP=2+SP for MoDE) on 2 GPUs, every run starting from the same
               weights (`--train.iters=0` writes them, `--checkpoint.init_from` loads them at any
               layout): max |Δloss| per step against the 1-GPU run.
  launch       train at DP=2 to step 20 (checkpoint), resume at TP=2 to step 40; compare steps 21-40
               with an uninterrupted DP=2 run.
  scaling      a ~1.2B MoD GPT (24 layers, d=2048, S=2048, every other layer at 12.5%) on 1 GPU and
               on 2 GPUs as TP=2, PP=2 and DP=2: tokens/s, per-GPU MFU, scaling efficiency.
               Layout `dp-after` is DP with the gradient all-reduce after the backward instead of
               overlapped with it (`--parallel.overlap_grad_reduce=false`); `--extra` adds overrides
               to every scaling run (e.g. `--extra=--train.cuda_graphs=true`).

`--gpus N` sets the multi-GPU width (default 2; the layouts scale with it: TP=N, PP=N, DP=N, EP=N).
NCCL's NVLink multicast is kept off (NCCL_NVLS_ENABLE=0) unless the environment already sets it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mod_megatron.training.logger import step_losses  # noqa: E402  (after the path line)
LOCAL = os.path.join(REPO, "launch", "local.sh")

SMALL = ["--model.num_layers=4", "--model.hidden_size=256", "--model.num_attention_heads=8",
         "--model.seq_length=256", "--model.vocab_size=4096", "--mod.capacity=0.25", "--mod.every=2",
         "--mod.first_routed=1", "--train.global_batch_size=16", "--train.lr=1e-3", "--train.warmup_iters=5",
         "--train.eval_interval=0", "--train.eval_iters=2", "--logging.log_interval=1"]
MODE = ["--moe.num_experts=4", "--moe.topk=2", "--moe.aux_loss_coeff=0.01"]
BIG = ["--model.num_layers=24", "--model.hidden_size=2048", "--model.num_attention_heads=16",
       "--model.seq_length=2048", "--model.vocab_size=8192", "--mod.capacity=0.125", "--mod.every=2",
       "--mod.first_routed=1", "--train.global_batch_size=16", "--train.micro_batch_size=4",
       "--train.lr=3e-4", "--train.min_lr=3e-5",  # tiny-cpu.yaml's 2e-3 diverges at 1.2B (throughput alike)
       "--train.warmup_iters=2", "--train.eval_interval=0", "--train.eval_iters=1", "--logging.log_interval=3",
       "--checkpoint.save_final=false"]


def launch(out: str, name: str, nproc: int, args: list[str], ckpt: str | None = None, load: bool = False) -> dict:
    """One run through launch/local.sh; returns its summary, per-step losses and wall time."""
    run_dir = os.path.join(out, name)
    if not load:
        shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    ckpt = ckpt or os.path.join(run_dir, "ckpt")
    cmd = [LOCAL, "--config", "configs/tiny-cpu.yaml", *args, f"--logging.dir={run_dir}",
           f"--checkpoint.dir={ckpt}", f"--checkpoint.load={str(load).lower()}", "--logging.progress_bar=false"]
    env = dict(os.environ, NPROC=str(nproc), MOD_LOG_DIR=os.path.join(out, "logs"), PYTHONWARNINGS="ignore")
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    with open(os.path.join(run_dir, "stdout.log"), "w") as f:
        f.write(proc.stdout)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("error:") or "Error" in ln]
        tail = "\n".join(errors[:5] or proc.stdout.splitlines()[-25:])
        raise RuntimeError(f"{name} failed with status {proc.returncode}:\n{tail}")
    losses = dict(step_losses(proc.stdout))
    summary = {}
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    resumed = re.search(r"resumed from \S+ at iteration (\d+)", proc.stdout)
    return {"name": name, "losses": losses, "summary": summary, "wall_s": wall,
            "resumed_at": int(resumed.group(1)) if resumed else None}


def _max_delta(a: dict, b: dict, steps) -> float:
    missing = [s for s in steps if s not in a or s not in b]
    if missing:
        raise RuntimeError(f"loss of step(s) {missing[:5]} missing from a run's output")
    return max(abs(a[s] - b[s]) for s in steps)


def equivalence(out: str, n: int, steps: int = 20, families: str = "MoD,MoDE", only: str = "") -> list[dict]:
    common = SMALL + [f"--train.iters={steps}", "--train.micro_batch_size=8"]
    rows = []
    for family, extra, layouts in (
            ("MoD", [], [(f"TP={n}", [f"--parallel.tp={n}"]), (f"TP={n}+SP", [f"--parallel.tp={n}", "--parallel.sp=true"]),
                         (f"PP={n}", [f"--parallel.pp={n}"]), (f"DP={n}", [f"--train.micro_batch_size={16 // n}"])]),
            ("MoDE", MODE, [(f"EP={n}", [f"--moe.ep={n}", f"--train.micro_batch_size={16 // n}"]),
                            (f"TP={n}+SP", [f"--parallel.tp={n}", "--parallel.sp=true"])])):
        if family not in families.split(","):
            continue
        layouts = [(name, args) for name, args in layouts if not only or name in only.split(",")]
        # megatron's initialisation depends on the layout (a pipeline stage or expert rank draws its weights
        # from its own RNG stream): write the initial weights once and start every layout from them.
        init = launch(out, f"eq-{family}-init", 1, common + extra + ["--train.iters=0"])
        extra = extra + [f"--checkpoint.init_from={os.path.join(out, init['name'], 'ckpt')}"]
        ref = launch(out, f"eq-{family}-1gpu", 1, common + extra)
        rows.append({"family": family, "layout": "1 GPU", "gpus": 1, "max_dloss": 0.0,
                     "final_loss": ref["losses"][steps], "wall_s": ref["wall_s"]})
        _print_eq(rows[-1])
        for name, args in layouts:
            r = launch(out, f"eq-{family}-{name}", n, common + extra + args)
            rows.append({"family": family, "layout": name, "gpus": n,
                         "max_dloss": _max_delta(ref["losses"], r["losses"], range(1, steps + 1)),
                         "final_loss": r["losses"][steps], "wall_s": r["wall_s"]})
            _print_eq(rows[-1])
    return rows


def _print_eq(row: dict) -> None:
    print(f"[eq] {row['family']:<5} {row['layout']:<9} max|Δloss| {row['max_dloss']:.2e} "
          f"final {row['final_loss']:.4f} ({row['wall_s']:.0f}s)", flush=True)


def launch_resume(out: str, n: int) -> dict:
    """DP=n to 20 -> checkpoint -> resume at TP=n to 40, against an uninterrupted DP=n run to 40."""
    common = SMALL + ["--train.iters=40", f"--train.micro_batch_size={16 // n}"]
    straight = launch(out, "resume-straight", n, common)
    ckpt = os.path.join(out, "resume-split", "ckpt")
    first = launch(out, "resume-split", n, common + ["--train.exit_interval=20"], ckpt=ckpt)
    second = launch(out, "resume-split", n, SMALL + ["--train.iters=40", "--train.micro_batch_size=8",
                                                     f"--parallel.tp={n}"], ckpt=ckpt, load=True)
    res = {"first_run_last_step": max(first["losses"]), "resumed_at": second["resumed_at"],
           "max_dloss_21_40": _max_delta(straight["losses"], second["losses"], range(21, 41)),
           "final_loss_straight": straight["losses"][40], "final_loss_resumed": second["losses"][40]}
    print(f"[launch] {res}", flush=True)
    return res


SCALING_LAYOUTS = {  # name -> (row label, overrides) at width n
    "tp": lambda n: (f"TP={n}", [f"--parallel.tp={n}"]),
    "pp": lambda n: (f"PP={n}", [f"--parallel.pp={n}"]),
    "dp": lambda n: (f"DP={n}", []),
    "dp-after": lambda n: (f"DP={n}, all-reduce after the backward", ["--parallel.overlap_grad_reduce=false"]),
}


def scaling(out: str, n: int, iters: int = 12, layouts: str = "tp,pp,dp", extra: tuple = ()) -> list[dict]:
    rows = []
    unknown = [k for k in layouts.split(",") if k not in SCALING_LAYOUTS]
    if unknown:
        raise RuntimeError(f"unknown scaling layout(s) {unknown}; choose from {', '.join(SCALING_LAYOUTS)}")
    runs = [("1 GPU", 1, [])] + [(label, n, args) for label, args in (SCALING_LAYOUTS[k](n) for k in layouts.split(","))]
    for name, nproc, args in runs:
        tag = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        r = launch(out, f"scale-{tag}", nproc, BIG + [f"--train.iters={iters}", *extra] + args)
        s = r["summary"]
        rows.append({"layout": name, "gpus": nproc, "tokens_per_s": s.get("tokens_per_s"), "mfu": s.get("mfu"),
                     "loss": s.get("train_loss"), "wall_s": r["wall_s"]})
        print(f"[scale] {rows[-1]}", flush=True)
    base = rows[0]["tokens_per_s"] or 0.0
    for row in rows:
        row["efficiency"] = (row["tokens_per_s"] / (row["gpus"] * base)) if base and row["tokens_per_s"] else None
    return rows


def tables(res: dict) -> str:
    lines = []
    if "equivalence" in res:
        n = res.get("steps", 20)
        lines += [f"| model | layout | GPUs | max abs dloss ({n} steps) | loss at step {n} | wall s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['family']} | {r['layout']} | {r['gpus']} | {r['max_dloss']:.2e} | {r['final_loss']:.4f} | "
                  f"{r['wall_s']:.0f} |" for r in res["equivalence"]]
        lines.append("")
    if "launch" in res:
        r = res["launch"]
        lines += ["| launch check | value |", "| --- | --- |",
                  f"| first run stopped at step | {r['first_run_last_step']} |",
                  f"| resumed (other TP) at step | {r['resumed_at']} |",
                  f"| max abs dloss, steps 21-40 vs uninterrupted | {r['max_dloss_21_40']:.2e} |",
                  f"| loss at 40: uninterrupted / resumed | {r['final_loss_straight']:.4f} / "
                  f"{r['final_loss_resumed']:.4f} |", ""]
    if "scaling" in res:
        lines += ["| layout | GPUs | tokens/s | MFU per GPU | scaling efficiency | wall s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in res["scaling"]:
            tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
            eff = f"{r['efficiency']:.0%}" if r["efficiency"] else "-"
            lines.append(f"| {r['layout']} | {r['gpus']} | {tps} | {mfu} | {eff} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["equivalence", "launch", "scaling", "all"])
    p.add_argument("--out", default="runs/multigpu")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="equivalence steps")
    p.add_argument("--scaling-iters", type=int, default=12)
    p.add_argument("--layouts", default="tp,pp,dp", help="scaling: comma-separated subset of " + ",".join(SCALING_LAYOUTS))
    p.add_argument("--extra", action="append", default=[], help="scaling: an override added to every run (repeatable)")
    p.add_argument("--families", default="MoD,MoDE", help="equivalence: MoD and/or MoDE")
    p.add_argument("--only", default="", help="equivalence: only these layouts, e.g. 'TP=2+SP,EP=2'")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    try:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        count = torch.cuda.device_count()
    except Exception:
        name, count = "unknown", 0
    res = {"device": name, "device_count": count, "steps": a.steps}
    print(f"device: {name} x{count}", flush=True)
    parts = ["equivalence", "launch", "scaling"] if a.part == "all" else [a.part]
    rc = 0
    for part in parts:
        try:
            if part == "equivalence":
                res[part] = equivalence(a.out, a.gpus, a.steps, a.families, a.only)
            elif part == "launch":
                res[part] = launch_resume(a.out, a.gpus)
            else:
                res[part] = scaling(a.out, a.gpus, a.scaling_iters, a.layouts, tuple(a.extra))
                res["scaling_extra"] = a.extra
        except RuntimeError as e:
            print(f"error: {part}: {e}", file=sys.stderr, flush=True)
            rc = 1
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(res, f, indent=2)
    print(f"\n{res['device']} x{res['device_count']}\n")
    print(tables(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
