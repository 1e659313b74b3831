"""Plot a `benchmarks/bench_block.py --cuda-graph` table: speed-up over dense vs capacity, per width.

    python tools/plot_block.py block.txt docs/img/block.png

Reads the markdown table bench_block prints (the lines starting with `| `), draws one line per
hidden size for eager and for CUDA-graph timings (a step's later micro-batches, and, in tables that have
the column, its first), and the ideal 1/c. Needs matplotlib (optional,
not a dependency of the package).
"""
from __future__ import annotations

import argparse
import re


def parse(text: str) -> dict:
    """{d: {"c": [...], "eager": [...], "graph": [...], "first": [...]}} from the table rows of MoD layers
    ("first": the graphed first micro-batch's speed-ups, empty for tables without that column)."""
    out: dict = {}
    title = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("# ")), "")
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not cells[0].isdigit() or not cells[1].startswith("MoD c="):
            continue
        row = out.setdefault(int(cells[0]), {"c": [], "eager": [], "graph": [], "first": []})
        row["c"].append(float(cells[1][len("MoD c="):]))
        row["eager"].append(float(cells[3].rstrip("x")))
        for key, i in (("graph", 5), ("first", 7)):
            if i == 7 and len(cells) < 9:
                continue
            ratio = cells[i].rstrip("x")
            row[key].append(float(ratio) if re.fullmatch(r"[0-9.]+", ratio) else None)
    return {"title": title, "rows": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="bench_block.py --cuda-graph output")
    p.add_argument("png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = parse(open(args.table).read())
    if not data["rows"]:
        raise SystemExit(f"error: no MoD rows in {args.table}; give the output of bench_block.py --cuda-graph")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    caps = sorted({c for r in data["rows"].values() for c in r["c"]})
    ax.plot(caps, [1 / c for c in caps], "k:", label="ideal 1/c")
    for i, (d, r) in enumerate(sorted(data["rows"].items())):
        color = f"C{i}"
        if r["first"]:
            ax.plot(r["c"], r["first"], "^-", color=color, label=f"d={d}, CUDA graphs, 1st micro-batch")
        ax.plot(r["c"], r["graph"], "o-", color=color, alpha=0.8 if r["first"] else 1,
                label=f"d={d}, CUDA graphs" + (", later micro-batches" if r["first"] else ""))
        ax.plot(r["c"], r["eager"], "s--", color=color, alpha=0.6, label=f"d={d}, eager")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("capacity c (share of tokens routed)")
    ax.set_ylabel("speed-up over the dense block (fwd+bwd)")
    ax.set_title(data["title"][:90], fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=130)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
