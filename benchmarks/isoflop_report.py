"""The report of benchmarks/isoflop.py: the markdown table, the time-to-dense-loss lines and the plot,
from the result rows (one per run) that isoflop.py writes to results.json."""
from __future__ import annotations

MODELS = ("dense", "mod")  # the two runs of a budget, in table order (isoflop.MODELS' keys)


def _num(x, fmt="{:.4f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def format_table(rows) -> str:
    lines = ["| budget | model | params | iters | total FLOPs | wall s | tokens/s | valid (topk) | "
             "held-out (topk) | held-out (causal) | epochs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["budget_index"], MODELS.index(r["model"]))):
        ev = r.get("eval") or {}
        causal = ev.get("causal-predictor") or ev.get("causal-router") or {}
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        lines.append(
            f"| {r['budget']:.2e} | {r['model']} | {params} | {r['iters']} | {r['total_flops']:.3e} | "
            f"{_num(r.get('train_wall_s'), '{:.0f}')} | {_num(r.get('tokens_per_s'), '{:,.0f}')} | "
            f"{_num(ev.get('topk', {}).get('valid'))} | {_num(ev.get('topk', {}).get('heldout'))} | "
            f"{_num(causal.get('heldout'))} | {r['epochs']:.2f} |")
    return "\n".join(lines)


LEGEND = ("wall s: the whole mod-train subprocess (start-up, training, final eval, checkpoint); tokens/s: "
          "training steady state (summary.json). Losses from mod-eval on the same batches for every run; "
          "causal = the MoD causal-predictor routing (dense: no routing, '-'). epochs: training tokens / "
          "train-split tokens.")


def time_to_dense_loss(rows) -> list[str]:
    """Per budget and loss: when MoD first reached the dense run's final value, in steps and in steady-state
    training seconds (step x tokens per step / tokens/s), against the dense run's own time. The training loss
    comes from the logged steps ("curve"); valid and held-out from the evaluations during training
    ("eval_curve", top-k routing), where both runs have them."""
    lines = []
    for b in sorted({r["budget_index"] for r in rows}):
        pair = {r["model"]: r for r in rows if r["budget_index"] == b and r.get("curve") and r.get("tokens_per_s")}
        if set(pair) != set(MODELS):
            continue
        dense, mod = pair["dense"], pair["mod"]
        seconds = lambda r, steps: steps * r["tokens"] / r["iters"] / r["tokens_per_s"]  # noqa: E731
        series = [("train", "", lambda r: [(it, loss) for it, loss in r["curve"]])]
        if dense.get("eval_curve") and mod.get("eval_curve"):
            series += [(split, " (evaluated during training)", lambda r, i=i: [(e[0], e[i]) for e in r["eval_curve"]])
                       for i, split in ((1, "valid"), (2, "held-out"))]
        for what, note, points in series:
            d_it, target = points(dense)[-1]
            step = next((it for it, loss in points(mod) if loss <= target), None)
            reached = (f"MoD reached it at step {step} of {mod['iters']}, {seconds(mod, step):.1f} s"
                       if step is not None else f"MoD did not reach it in its {mod['iters']} steps")
            lines.append(f"budget {dense['budget']:.2e}: dense final {what} loss{note} {target:.4f} after "
                         f"{seconds(dense, d_it):.1f} s of training; {reached}")
    return lines


def plot(rows, path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (results.json has the numbers)"
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    for model, color in zip(MODELS, ("tab:blue", "tab:red")):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["total_flops"])
        for r in mine:
            if r.get("curve"):
                x = [it * r["flops_per_step"] for it, _ in r["curve"]]
                left.plot(x, [loss for _, loss in r["curve"]], color=color, label=f"{model} b{r['budget_index']}",
                          linestyle="-" if r is mine[-1] else ":")
            for i, split, style in ((1, "valid", "-"), (2, "held-out", "--")):
                if r.get("eval_curve") and r is mine[-1]:
                    mid.plot([e[0] * r["flops_per_step"] for e in r["eval_curve"]], [e[i] for e in r["eval_curve"]],
                             style, marker=".", color=color, label=f"{model} b{r['budget_index']} {split}")
        done = [r for r in mine if "topk" in (r.get("eval") or {})]
        for split, style in (("valid", "o-"), ("heldout", "s--")):
            right.plot([r["total_flops"] for r in done], [r["eval"]["topk"][split] for r in done], style,
                       color=color, label=f"{model} {split} (top-k)")
    left.set(xscale="log", xlabel="training FLOPs", ylabel="train loss", title="training loss vs FLOPs")
    mid.set(xscale="log", xlabel="training FLOPs", ylabel="loss (top-k)",
            title="valid and held-out during training (largest budget)")
    right.set(xscale="log", xlabel="total training FLOPs (budget)", ylabel="loss", title="final loss vs budget")
    for ax in (left, mid, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
