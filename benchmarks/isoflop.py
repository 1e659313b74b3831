"""isoFLOP comparison, dense GPT vs its MoD twin: `python benchmarks/isoflop.py [--parallel] --out DIR`.

For each compute budget (total training FLOPs, `--budgets`), trains the dense model and its MoD twin
with `mod-train` subprocesses, evaluates each checkpoint with `mod-eval` (top-k and causal routing,
valid and held-out), then prints a markdown table and writes DIR/results.json, DIR/results.md,
DIR/isoflop.png (when matplotlib is installed) and the subprocess logs under DIR/logs/.

The comparison (as in the MoD paper's isoFLOP analysis): both models have the same shape (default
8 layers, d=512, 8 heads, S=1024, 32 x 1024 tokens per step); the MoD twin routes every other layer
(layers 2, 4, ...) at capacity 0.125 with the aux router loss and the aux predictor on
(configs/gpt-125m-mod.yaml's settings). A MoD step costs fewer FLOPs, so at an equal budget MoD
trains proportionally more steps: iterations = round(budget / FLOPs per step), FLOPs per step from
mod_megatron/training/flops.py (matmul FLOPs, routed layers at k tokens, training = 3x forward).
Each run has its own warm-up (`--warmup-frac` of its steps) and cosine decay to min_lr over its steps.
`--match step` matches FLOPs per step instead, as the paper's isoFLOP-optimal MoD models do: the MoD
twin gets the (even) number of layers whose FLOPs per step come closest to the dense model's, and
both train the same steps on the same tokens in the same order.

Data: the debian-docs corpus (prepare it first on a CPU machine: `mod-preprocess --corpus debian-docs
--data-dir data`), valid = a fixed pseudo-random 5% of its documents, held-out = the KJV. Both models use the same
seed and corpus; megatron shuffles all epochs of a run together, so runs of different lengths see
the same data distribution but not the same sample order. The evaluation batches are identical.

`--parallel` runs the dense jobs on the first of `--devices` and the MoD jobs on the second at the
same time (CUDA_VISIBLE_DEVICES per subprocess); otherwise everything runs one job after the other.
`--smoke` is a CPU check of the whole pipeline in about a minute: a tiny model on the default
corpus (Shakespeare / KJV, vocab 4096) and two budgets of a few steps. `--dry-run` prints the plan.
`--eval-points N` evaluates valid and held-out loss N times during each run (the curves go to results.json
and the plot; the report says when MoD first reached each of the dense run's final losses).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import isoflop_report  # noqa: E402
from benchmarks.isoflop_report import LEGEND, format_table, plot, time_to_dense_loss  # noqa: E402,F401

MODELS = {  # name: (base config, overrides); the shapes come from the command line
    "dense": ("configs/gpt-125m-dense.yaml", ["--mod.enabled=false"]),
    "mod": ("configs/gpt-125m-mod.yaml", ["--mod.enabled=true", "--mod.capacity=0.125", "--mod.every=2",
                                          "--mod.first_routed=1", "--mod.aux_loss=true", "--mod.predictor=true"]),
}
assert tuple(MODELS) == isoflop_report.MODELS
SPLIT_TRAIN = 949 / 999  # the default data.split "949,50,1": train share of the documents


class IsoflopError(Exception):
    """A problem the user can fix; printed as one `error:` line."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="isoflop.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budgets", default="4e15,1.2e16", help="total training FLOPs per run, comma-separated")
    p.add_argument("--out", default="runs/isoflop-results", help="results.json/.md, isoflop.png, logs/")
    p.add_argument("--runs-dir", default="runs/isoflop", help="run directories (checkpoints, summaries)")
    p.add_argument("--data-dir", default="data", help="holds debian-docs/ (or the default corpus for --smoke)")
    p.add_argument("--parallel", action="store_true", help="dense and MoD jobs at the same time, one device each")
    p.add_argument("--devices", default="0,1", help="CUDA devices of the dense and the MoD lane with --parallel")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (micro = global batch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="warm-up steps as a share of each run's steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-iters", type=int, default=10, help="eval batches per split (training's and mod-eval's)")
    p.add_argument("--eval-points", type=int, default=10,
                   help="evaluations (valid and held-out, top-k) during each run, evenly spaced; 0: only at the end")
    p.add_argument("--match", choices=["total", "step"], default="total",
                   help="total: same shapes, MoD trains more steps; step: a deeper MoD with dense's FLOPs per step")
    p.add_argument("--cuda-graphs", action="store_true", help="train with --train.cuda_graphs=true (GPU)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline (~1 min)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, tokens, epochs) and stop")
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the table of an earlier run's results.json and stop")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.seq_length, args.batch = 2, 32, 2, 32, 4
        args.lr, args.min_lr, args.eval_iters, args.eval_points = 3e-3, 3e-4, 1, 2
    try:
        args.budget_list = [float(b) for b in args.budgets.split(",")] if not args.smoke else None
    except ValueError:
        p.error(f"--budgets: expected comma-separated numbers of FLOPs, e.g. 4e15,1.2e16, got {args.budgets!r}")
    if args.eval_points < 0:
        p.error("--eval-points must be >= 0")
    if args.budget_list is not None and (not args.budget_list or min(args.budget_list) <= 0):
        p.error("--budgets must be positive numbers of FLOPs")
    args.device_list = args.devices.split(",")
    if args.parallel and len(args.device_list) != 2:
        p.error(f"--devices needs two entries (dense lane, MoD lane), got {args.devices!r}")
    return args


# ----------------------------------------------------------------------------- plan

def data_paths(args) -> dict:
    """Tokenizer, train and held-out prefixes and the tokenizer's vocab size."""
    if args.smoke:
        from mod_megatron.data.preprocess import prepare_data

        vocab = 4096
        paths = dict(prepare_data(args.data_dir, vocab))  # cached: only checks the files when they exist
    else:
        from mod_megatron.data.debian_docs import debian_docs_paths

        vocab = 8192
        paths = debian_docs_paths(args.data_dir, vocab)
        needed = (paths["tokenizer_model"], paths["train_prefix"] + ".bin", paths["heldout_prefix"] + ".bin")
        missing = [p for p in needed if not os.path.isfile(p)]
        if missing:
            raise IsoflopError(f"{missing[0]} not found: prepare the corpus first with "
                               f"`mod-preprocess --corpus debian-docs --data-dir {args.data_dir}` on a Debian machine")
    paths["train_tokens"], paths["valid_tokens"] = split_tokens(paths["train_prefix"])
    paths["vocab_size"] = vocab
    return paths


def split_tokens(prefix) -> tuple[int, int]:
    """Tokens in the train and valid splits: megatron splits by document, the first 949/999 train."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    lengths = dataset.sequence_lengths.astype("int64")  # a copy: the index is unmapped with `dataset`
    del dataset
    n_train = int(round(SPLIT_TRAIN * len(lengths)))
    return int(lengths[:n_train].sum()), int(lengths[n_train:].sum())


def lane_data(paths, runs_dir, lane) -> dict:
    """The token files through a per-lane directory of symlinks: megatron caches its sample indices
    next to the data, and two lanes starting together must not write the same cache files."""
    d = os.path.join(runs_dir, "data", lane)
    os.makedirs(d, exist_ok=True)
    out = dict(paths)
    for key in ("train_prefix", "heldout_prefix"):
        for ext in (".bin", ".idx", ".json"):
            link, target = os.path.join(d, os.path.basename(paths[key]) + ext), os.path.abspath(paths[key] + ext)
            if os.path.lexists(link) and os.readlink(link) != target:
                os.remove(link)  # another --data-dir
            if not os.path.lexists(link):
                os.symlink(target, link)
        out[key] = os.path.join(d, os.path.basename(paths[key]))
    return out


def common_overrides(args, paths) -> list:
    o = [f"--model.num_layers={args.layers}", f"--model.hidden_size={args.hidden}",
         f"--model.num_attention_heads={args.heads}", f"--model.seq_length={args.seq_length}",
         f"--model.vocab_size={paths['vocab_size']}",
         f"--train.micro_batch_size={args.batch}", f"--train.global_batch_size={args.batch}",
         f"--train.lr={args.lr}", f"--train.min_lr={args.min_lr}", f"--train.seed={args.seed}",
         f"--train.eval_iters={args.eval_iters}",
         "--data.corpus=custom", f"--data.tokenizer_model={os.path.abspath(paths['tokenizer_model'])}",
         "--checkpoint.save_interval=0", "--checkpoint.load=false", "--checkpoint.keep_last=1",
         "--logging.progress_bar=false", "--logging.tensorboard=false"]
    if args.smoke:
        o.append("--train.device=cpu")
    elif args.cuda_graphs:
        o.append("--train.cuda_graphs=true")
    return o


def flops_per_step(model: str, overrides: list) -> float:
    from mod_megatron.config import load_config
    from mod_megatron.training.flops import train_flops_per_token

    config, extra = MODELS[model]
    # data.corpus=default: the data paths do not matter for the FLOPs
    cfg = load_config(os.path.join(REPO, config), overrides + extra + ["--data.corpus=default"])
    return train_flops_per_token(cfg) * cfg.train.global_batch_size * cfg.model.seq_length


def layers_for_equal_step(args, base, dense_per_step: float) -> int:
    """--match step: the even MoD depth (every other layer routed) whose FLOPs per step are nearest dense's."""
    depths = range(max(2, args.layers), 4 * args.layers + 1, 2)
    return min(depths, key=lambda n: abs(flops_per_step("mod", base + [f"--model.num_layers={n}"]) - dense_per_step))


def plan(args, paths) -> list:
    """One job per (budget, model): iterations matched to the budget, and its mod-train overrides."""
    base = common_overrides(args, paths)
    extra = {m: [] for m in MODELS}
    if args.match == "step":
        extra["mod"] = [f"--model.num_layers={layers_for_equal_step(args, base, flops_per_step('dense', base))}"]
    per_step = {m: flops_per_step(m, base + extra[m]) for m in MODELS}
    budgets = args.budget_list or [5 * per_step["dense"], 10 * per_step["dense"]]  # --smoke: a few steps
    jobs = []
    for b, budget in enumerate(budgets, start=1):
        for model in MODELS:
            # --match step: both train the dense model's steps (same tokens, same order)
            iters = max(1, round(budget / per_step["dense" if args.match == "step" else model]))
            name = f"b{b}-{model}"
            run_dir = os.path.join(args.runs_dir, name)
            data = lane_data(paths, args.runs_dir, model if args.parallel else "all")
            tokens = iters * args.batch * args.seq_length
            overrides = base + MODELS[model][1] + extra[model] + [
                f"--train.iters={iters}", f"--train.warmup_iters={max(1, round(args.warmup_frac * iters))}",
                f"--data.train_prefix={os.path.abspath(data['train_prefix'])}",
                f"--data.heldout_prefix={os.path.abspath(data['heldout_prefix'])}",
                f"--logging.log_interval={max(1, iters // 25)}",
                f"--train.eval_interval={math.ceil(iters / args.eval_points) if args.eval_points else 0}",
                f"--logging.dir={os.path.abspath(run_dir)}",
                f"--checkpoint.dir={os.path.abspath(os.path.join(run_dir, 'checkpoints'))}"]
            layers = int(extra[model][0].split("=")[1]) if extra[model] else args.layers
            jobs.append({"name": name, "budget_index": b, "budget": budget, "model": model, "iters": iters,
                         "layers": layers,
                         "flops_per_step": per_step[model], "total_flops": iters * per_step[model],
                         "tokens": tokens, "epochs": tokens / max(1, paths["train_tokens"]),
                         "config": MODELS[model][0], "overrides": overrides, "run_dir": run_dir})
    return jobs


# ----------------------------------------------------------------------------- running

def run_logged(cmd, log_path, env) -> tuple[int, float]:
    """Run cmd with stdout+stderr to log_path; (exit status, wall seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - t0


def last_error(log_path) -> str:
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1][:300]


def parse_curve(log_path) -> list:
    """[(iteration, train loss)] from mod-train's log lines `iter N/T | loss X | ...` (finite losses only)."""
    from mod_megatron.training.logger import step_losses

    with open(log_path, errors="replace") as f:
        return [(it, loss) for it, loss in step_losses(f.read()) if math.isfinite(loss)]


def parse_eval_curve(log_path) -> list:
    """[(iteration, valid loss, held-out loss)] of mod-train's evaluations (top-k routing), finite ones only."""
    from mod_megatron.training.logger import eval_losses

    with open(log_path, errors="replace") as f:
        return [list(e) for e in eval_losses(f.read()) if all(map(math.isfinite, e[1:]))]


def parse_eval(log_path) -> dict:
    """{mode: {"valid": loss, "heldout": loss}} from mod-eval's first table."""
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    header = next((line for line in lines if line.startswith("| mode |")), None)
    if header is None:
        return {}
    cols = [c.strip() for c in header.strip("|").split("|")]
    out = {}
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = {split: float(cells[cols.index(f"{split} loss")]) for split in ("valid", "heldout")}
    return out


def count_params(checkpoint: str):
    """(all, embedding) parameter counts from a checkpoint's tensor shapes (optimizer state excluded)."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - a count is nice to have, not worth failing the run
        return None, None
    total = embedding = 0
    for key, value in meta.items():
        size = getattr(value, "size", None)
        if size is None or key.startswith("optimizer.") or "_extra_state" in key:
            continue
        n = 1
        for s in size:
            n *= s
        total += n
        embedding += n if "embedding" in key or "output_layer" in key else 0
    return total, embedding


def base_row(job) -> dict:
    return {k: job[k] for k in ("name", "budget_index", "budget", "model", "layers", "iters", "flops_per_step",
                                "total_flops", "tokens", "epochs", "config")}


def run_job(job, env, log_dir) -> dict:
    """Train, then evaluate one job; the result row (with "error" set if a step failed)."""
    res = base_row(job)
    shutil.rmtree(job["run_dir"], ignore_errors=True)  # a fresh run, never a resume
    train_log = os.path.join(log_dir, f"{job['name']}.train.log")
    cmd = [sys.executable, "-m", "mod_megatron.training.cli", "--config", job["config"], *job["overrides"]]
    rc, res["train_wall_s"] = run_logged(cmd, train_log, env)
    res["curve"] = parse_curve(train_log)
    res["eval_curve"] = parse_eval_curve(train_log)
    if rc != 0:
        res["error"] = f"mod-train exited with {rc}: {last_error(train_log)} (log: {train_log})"
        return res
    try:
        with open(os.path.join(job["run_dir"], "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        res["error"] = f"mod-train wrote no readable summary.json ({e}); log: {train_log}"
        return res
    res.update(tokens_per_s=summary.get("tokens_per_s"), mfu=summary.get("mfu"),
               train_loss=summary.get("train_loss"), valid_loss=summary.get("valid_loss"),
               heldout_loss=summary.get("heldout_loss"))
    res["params"], res["embedding_params"] = count_params(summary["checkpoint"])
    eval_log = os.path.join(log_dir, f"{job['name']}.eval.log")
    cmd = [sys.executable, "-m", "mod_megatron.inference.evaluate", "--checkpoint",
           os.path.join(job["run_dir"], "checkpoints")]
    rc, res["eval_wall_s"] = run_logged(cmd, eval_log, env)
    res["eval"] = parse_eval(eval_log)
    if rc != 0 or "topk" not in res["eval"]:
        res["error"] = f"mod-eval exited with {rc}: {last_error(eval_log)} (log: {eval_log})"
    return res


def run_all(jobs, args, on_result, print_lock) -> None:
    """Sequentially, or (--parallel) one lane per model on its own device; on_result(row) after each job."""
    lanes = {m: [j for j in jobs if j["model"] == m] for m in MODELS} if args.parallel else {"all": jobs}
    log_dir = os.path.join(args.out, "logs")
    os.makedirs(log_dir, exist_ok=True)

    def lane(name, lane_jobs, device):
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
            if args.smoke:
                env["OMP_NUM_THREADS"] = "1"  # two CPU lanes share the cores
        for job in lane_jobs:
            with print_lock:
                print(f"[{name}] {job['name']}: {job['iters']} steps, {job['total_flops']:.3g} FLOPs", flush=True)
            try:
                row = run_job(job, env, log_dir)
            except Exception as e:  # noqa: BLE001 - this run's error; the other lane goes on
                row = dict(base_row(job), error=f"{type(e).__name__}: {e}")
            on_result(row)

    threads = [threading.Thread(target=lane, args=(name, lj, args.device_list[i] if args.parallel else None))
               for i, (name, lj) in enumerate(lanes.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ----------------------------------------------------------------------------- report: isoflop_report.py

def gpu_name():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return sorted(set(out.stdout.split("\n")) - {""}) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report:
        with open(args.report) as f:
            rows = json.load(f)["runs"]
        print("\n".join([format_table(rows), "", LEGEND, "", *time_to_dense_loss(rows)]))
        return 0
    from mod_megatron.config import ConfigError
    from mod_megatron.data.common import DataError

    try:
        paths = data_paths(args)
        jobs = plan(args, paths)
    except (IsoflopError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train/valid split: {paths['train_tokens']:,} / {paths['valid_tokens']:,} tokens; {len(jobs)} runs "
          f"({'parallel lanes on devices ' + args.devices if args.parallel else 'one after the other'})")
    for j in jobs:
        print(f"  {j['name']:<9} {j['layers']:>3} layers {j['iters']:>6} steps  {j['total_flops']:.3e} FLOPs"
              f"  {j['tokens'] / 1e6:8.1f}M tokens"
              f"  {j['epochs']:.2f} epochs")
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "seq_length", "batch", "lr", "min_lr",
                                              "warmup_frac", "seed", "eval_iters", "smoke", "parallel", "devices",
                                              "cuda_graphs", "match")}
    settings.update(budgets=sorted({j["budget"] for j in jobs}), gpus=gpu_name(), data={
        k: os.path.abspath(v) if isinstance(v, str) else v for k, v in paths.items()})
    rows, lock = [], threading.Lock()

    def on_result(row):
        with lock:
            rows.append(row)
            if row.get("error"):
                print(f"error: {row['name']}: {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"  {row['name']} done: train {row['train_wall_s']:.0f} s, eval "
                      f"{row['eval_wall_s']:.0f} s, valid {row['eval']['topk']['valid']:.4f}", flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:  # after every job: partial results survive
                json.dump({"settings": settings, "runs": rows}, f, indent=2)

    t0 = time.time()
    run_all(jobs, args, on_result, lock)
    table = format_table(rows)
    reach = "\n".join(time_to_dense_loss(rows))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n\n" + LEGEND + "\n\n" + reach + "\n")
    print(f"\n{table}\n\n{LEGEND}\n\n{reach}\n\ntotal wall {time.time() - t0:.0f} s; "
          f"results: {os.path.join(args.out, 'results.json')}")
    print(plot(rows, os.path.join(args.out, "isoflop.png")))
    failed = [r["name"] for r in rows if r.get("error")]
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} runs failed ({', '.join(failed)}); see {args.out}/logs/",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
