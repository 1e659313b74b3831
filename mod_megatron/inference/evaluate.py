"""`mod-eval --checkpoint DIR [--config FILE] [--section.key=value ...]`

Evaluates a trained checkpoint on the valid and held-out sets in each routing mode:

  topk              the training routing (looks at the whole sequence: not usable for sampling)
  causal-router     a token is routed iff sigmoid(router logit) > 0.5
  causal-predictor  a token is routed iff the auxiliary predictor's logit > 0

and prints one table: loss / perplexity per mode and split, the fraction of tokens each MoD layer
routed in each mode, and how well the causal decisions (router and predictor) match top-k per layer.
The batches are the first `train.eval_iters * train.global_batch_size` samples of each split, the
same ones training evaluates on. Bad input ends with one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch

from mod_megatron.model.mod_layer import ROUTING_MODES, mod_layers, set_routing_mode
from mod_megatron.model.predictor import rates


def _batches(dataset, num_samples: int, micro_batch_size: int, device):
    for start in range(0, num_samples, micro_batch_size):
        idx = range(start, min(start + micro_batch_size, num_samples))
        samples = [dataset[i % len(dataset)] for i in idx]
        yield {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
               for k in ("tokens", "labels", "loss_mask", "position_ids")}


@torch.no_grad()
def evaluate_mode(model, dataset, mode: str, num_samples: int, micro_batch_size: int) -> dict:
    """Masked mean token loss, per-layer fraction routed and (top-k mode) causal-decision confusion."""
    set_routing_mode([model], mode)
    layers = mod_layers([model])
    device = next(model.parameters()).device
    loss_sum = tokens = 0.0
    routed = [0.0] * len(layers)
    seen = 0
    conf = {kind: [torch.zeros(4) for _ in layers] for kind in ("router", "predictor")}
    for batch in _batches(dataset, num_samples, micro_batch_size, device):
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float()
        mask = batch["loss_mask"].float()
        loss_sum += float((losses * mask).sum())
        tokens += float(mask.sum())
        seen += batch["tokens"].numel()
        for i, layer in enumerate(layers):
            r = layer.last_routing
            routed[i] += float(r.valid.sum()) if r.valid is not None else r.index.numel()
            for kind in conf:
                if f"{kind}_confusion" in layer.last_aux:
                    conf[kind][i] += layer.last_aux[f"{kind}_confusion"].cpu()
    set_routing_mode([model], "topk")
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "fraction_routed": [r / max(seen, 1) for r in routed],
            "layers": [layer.layer_number for layer in layers],
            "router": [rates(c) for c in conf["router"]], "predictor": [rates(c) for c in conf["predictor"]]}


def available_modes(model) -> list[str]:
    layers = mod_layers([model])
    if not layers:
        return ["topk"]  # a dense model: every mode is the same
    return [m for m in ROUTING_MODES if m != "causal-predictor" or all(l.predictor is not None for l in layers)]


def evaluate(model, datasets: dict, num_samples: int, micro_batch_size: int) -> dict:
    """{split: {mode: evaluate_mode(...)}} for every split with data and every usable mode."""
    return {split: {mode: evaluate_mode(model, ds, mode, num_samples, micro_batch_size)
                    for mode in available_modes(model)}
            for split, ds in datasets.items() if ds is not None}


def _pct(x) -> str:
    return f"{x:.1%}" if x is not None else "n/a"


def format_table(results: dict) -> str:
    """The mod-eval report: one loss table, then per-layer routing tables."""
    splits = list(results)
    modes = list(results[splits[0]])
    lines = ["| mode | " + " | ".join(f"{s} loss | {s} ppl" for s in splits) + " |",
             "| --- |" + " --- | --- |" * len(splits)]
    for mode in modes:
        cells = " | ".join(f"{results[s][mode]['loss']:.4f} | {results[s][mode]['ppl']:.2f}" for s in splits)
        lines.append(f"| {mode} | {cells} |")
    first = results[splits[0]]
    layers = first[modes[0]]["layers"]
    if layers:
        lines += ["", f"fraction of tokens routed per MoD layer ({splits[0]}):",
                  "| layer | " + " | ".join(modes) + " |", "| --- |" + " --- |" * len(modes)]
        for i, n in enumerate(layers):
            lines.append(f"| {n} | " + " | ".join(_pct(first[m]["fraction_routed"][i]) for m in modes) + " |")
        lines += ["", f"causal decisions vs top-k membership per MoD layer ({splits[0]}, top-k forward):",
                  "| layer | decider | accuracy | precision | recall |", "| --- | --- | --- | --- | --- |"]
        topk = first["topk"]
        for i, n in enumerate(layers):
            for kind in ("predictor", "router"):
                r = topk[kind][i]
                if r["accuracy"] is not None:
                    lines.append(f"| {n} | {kind} | {_pct(r['accuracy'])} | {_pct(r['precision'])} | "
                                 f"{_pct(r['recall'])} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mod-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint root (with `latest`) or an iter_* directory")
    p.add_argument("--config", help="YAML whose non-model sections (data, train.eval_iters, ...) replace the checkpoint's")
    from mod_megatron.training.cli import parse_with_overrides

    return parse_with_overrides(p, argv)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from mod_megatron.config import ConfigError
    from mod_megatron.data.common import DataError
    from mod_megatron.training.checkpoint import CheckpointError

    try:
        from mod_megatron.inference.loading import load_model
        from mod_megatron.training.cli import prepare_inputs
        from mod_megatron.training.distributed import Layout

        cfg, model, meta, ckpt_dir = load_model(args.checkpoint, args.config, overrides)
        device = next(model.parameters()).device
        layout = Layout(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, device=device)
        (_, valid_ds, heldout_ds), _ = prepare_inputs(cfg, layout)
        t = cfg.train
        results = evaluate(model, {"valid": valid_ds, "heldout": heldout_ds},
                           max(1, t.eval_iters) * t.global_batch_size, t.micro_batch_size)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint {ckpt_dir} (iteration {meta.get('iteration')})")
    print(format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
