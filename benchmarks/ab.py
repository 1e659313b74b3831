"""Same-card A/B of two source trees: `python benchmarks/ab.py --base DIR --configs NAME ...`.

Cards of one kind differ by a few percent (docs/benchmarks.md), and so do repeated runs on one card;
a change worth 1-2% shows only against its baseline measured on the same card, interleaved. This
runs bench_model.py's worker (the real Trainer on random tokens, one subprocess per run) for each
config from the base tree (another checkout of the project, e.g. made with
`git archive REV | tar -x -C scratch/base`) and from this tree, round after round in ABBA order
(base first in odd rounds, this tree first in even ones, so that a drifting card favours neither),
and prints per config the median tokens/s of each tree, their ratio and its range over the rounds,
then each tree's MoD-vs-dense ratios:

    | config | base tokens/s | new tokens/s | new / base | range over rounds |

Config overrides (`--train.cuda_graphs=true`) apply to both trees. `--smoke` runs the tiny CPU
versions of the configs (a CI check of the tool itself).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import REPO, SMOKE, TWINS, run_worker, save_results  # noqa: E402


def order(rounds: int) -> list:
    """(round, tree) in ABBA order: base first in rounds 1, 3, ...; new first in rounds 2, 4, ..."""
    return [(r, tree) for r in range(1, rounds + 1) for tree in (("base", "new") if r % 2 else ("new", "base"))]


def summarise(results: list) -> list:
    """results: {"tree", "round", "config", "tokens_per_s" | "error"} -> one row per config (in first-seen
    order): median tokens/s per tree, the ratio of the medians, and the per-round ratios' range."""
    rows = []
    for config in dict.fromkeys(r["config"] for r in results):
        per = {t: {r["round"]: r["tokens_per_s"] for r in results
                   if r["config"] == config and r["tree"] == t and "tokens_per_s" in r} for t in ("base", "new")}
        row = {"config": config, "base": None, "new": None, "ratio": None, "low": None, "high": None,
               "errors": [f"{r['tree']} round {r['round']}: {r['error']}" for r in results
                          if r["config"] == config and "error" in r]}
        if per["base"] and per["new"]:
            row["base"], row["new"] = statistics.median(per["base"].values()), statistics.median(per["new"].values())
            row["ratio"] = row["new"] / row["base"]
            paired = [per["new"][k] / per["base"][k] for k in per["base"] if k in per["new"]]
            row["low"], row["high"] = (min(paired), max(paired)) if paired else (None, None)
        rows.append(row)
    return rows


def format_rows(rows: list) -> str:
    out = ["| config | base tokens/s | new tokens/s | new / base | range over rounds |", "|---|---|---|---|---|"]
    for r in rows:
        if r["ratio"] is None:
            out.append(f"| {r['config']} | failed: {'; '.join(r['errors'])[:200]} | | | |")
            continue
        spread = f"{r['low']:.3f} - {r['high']:.3f}" if r["low"] is not None else "-"
        out.append(f"| {r['config']} | {r['base']:,.0f} | {r['new']:,.0f} | {r['ratio']:.3f} | {spread} |")
    by_name = {r["config"]: r for r in rows}
    for r in rows:
        twin = by_name.get(TWINS.get(r["config"], ""))
        if twin is not None and twin is not r and r["ratio"] is not None and twin["ratio"] is not None:
            out.append(f"\n{r['config']} vs {twin['config']}: base {r['base'] / twin['base']:.3f}x, "
                       f"new {r['new'] / twin['new']:.3f}x")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the baseline source tree (a directory with benchmarks/ and mod_megatron/)")
    p.add_argument("--configs", nargs="+", required=True, choices=sorted(TWINS))
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs every config from both trees)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--smoke", action="store_true", help="the tiny CPU versions of the configs")
    p.add_argument("--json", help="also write every run's result to this file")
    args, overrides = p.parse_known_args(argv)
    base = os.path.abspath(args.base)
    if not os.path.isfile(os.path.join(base, "benchmarks", "bench_model.py")):
        p.error(f"--base {args.base}: no benchmarks/bench_model.py there (make one with "
                "`git archive REV | tar -x -C DIR`)")
    if os.path.samefile(base, REPO):
        p.error("--base is this tree; point it at a checkout of the baseline")
    trees = {"base": base, "new": REPO}
    extra = [f"--warmup={args.warmup}", f"--iters={args.iters}", *(SMOKE if args.smoke else []), *overrides]
    results = []
    for rnd, tree in order(args.rounds):
        for config in args.configs:
            script = os.path.join(trees[tree], "benchmarks", "bench_model.py")
            r = dict(run_worker(script, config, extra, args.timeout, tree=trees[tree]), tree=tree, round=rnd)
            results.append(r)
            print(f"# round {rnd} {tree} {config}: "
                  + (f"failed: {r['error']}" if "error" in r else f"{r['tokens_per_s']:,.0f} tokens/s"), flush=True)
    card = next((r["card"] for r in results if "card" in r), "?")
    print(f"\n# {card}; base {base}; {args.rounds} rounds, {args.warmup} warm-up + {args.iters} timed steps per run"
          + (f"; overrides {' '.join(overrides)}" if overrides else ""))
    print(format_rows(summarise(results)), flush=True)
    return save_results(results, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
