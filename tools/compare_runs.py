"""Print a table comparing finished runs: `python tools/compare_runs.py runs/a runs/b ...`.

Reads each run's summary.json (written by mod-train at the end) and prints tokens/s, MFU and the
final losses, with each run's tokens/s relative to the first run's.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv=None) -> int:
    runs = (argv if argv is not None else sys.argv[1:])
    if not runs:
        print("usage: python tools/compare_runs.py RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    rows = []
    for run in runs:
        path = os.path.join(run, "summary.json")
        try:
            with open(path) as f:
                rows.append((os.path.basename(os.path.normpath(run)), json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
    base = rows[0][1].get("tokens_per_s") or 0.0
    fmt = "| {:<22} | {:>6} | {:>10} | {:>7} | {:>6} | {:>7} | {:>7} | {:>8} |"
    print(fmt.format("run", "iters", "tokens/s", "vs 1st", "MFU", "train", "valid", "held-out"))
    print("|" + "|".join("-" * (w + 2) for w in (22, 6, 10, 7, 6, 7, 7, 8)) + "|")
    for name, s in rows:
        tps = s.get("tokens_per_s") or 0.0
        mfu = s.get("mfu")
        print(fmt.format(name, s.get("iteration", "?"), f"{tps:,.0f}", f"{tps / base:.2f}x" if base else "-",
                         f"{mfu:.1%}" if mfu else "-", _f(s.get("train_loss")), _f(s.get("valid_loss")),
                         _f(s.get("heldout_loss"))))
    return 0


def _f(x):
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


if __name__ == "__main__":
    sys.exit(main())
