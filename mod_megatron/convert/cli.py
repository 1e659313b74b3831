"""`mod-convert SUBCOMMAND ...`: checkpoint conversions, each checked by comparing outputs in tests.

    mod-convert from-deepspeed --checkpoint runs/x/checkpoints/iter_0000100 --output runs/x/native
    mod-convert to-hf --checkpoint runs/x/checkpoints --output runs/x/hf
    mod-convert from-hf --input runs/x/hf --output runs/x/from_hf
    mod-convert reshard --checkpoint runs/x/checkpoints --output runs/x/tp1 --tp 1 --pp 1
    mod-convert dense-to-mod --checkpoint runs/dense/checkpoints --output runs/x/mod --mod.capacity=0.5

Bad input ends with one `error:` line and exit status 2; no partial output is left behind.
"""
from __future__ import annotations

import argparse
import sys
import warnings


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(prog="mod-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ds = sub.add_parser("from-deepspeed", help="a DeepSpeed (ZeRO 0/1/2, tp=1) checkpoint of this stack -> "
                                               "the stack's own format (model-only, fp32)")
    ds.add_argument("--checkpoint", required=True, help="the iter_NNNNNNN directory written by the deepspeed engine")
    ds.add_argument("--output", required=True, help="checkpoint root to write (iter_NNNNNNN/ + latest)")
    th = sub.add_parser("to-hf", help="a dense/MoD checkpoint -> a HuggingFace folder (trust_remote_code)")
    th.add_argument("--checkpoint", required=True, help="checkpoint root (with `latest`) or an iter_* directory")
    th.add_argument("--output", required=True, help="HuggingFace folder to write (must not exist)")
    th.add_argument("--tokenizer", help="SentencePiece model (default: the one recorded in the checkpoint)")
    fh = sub.add_parser("from-hf", help="a folder written by to-hf -> the stack's own format (model-only)")
    fh.add_argument("--input", required=True, help="the HuggingFace folder")
    fh.add_argument("--output", required=True, help="checkpoint root to write (must not exist)")
    rs = sub.add_parser("reshard", help="a checkpoint of one TP/PP/EP layout -> the same weights saved for "
                                        "another layout (model-only: the optimizer state is dropped)",
                        description="Load CHECKPOINT at the target layout in forked CPU/gloo ranks and save it "
                                    "again. The result is model-only: optimizer moments and RNG states are "
                                    "dropped; mod-train continues from it with a fresh optimizer at the same "
                                    "iteration and data position (to keep the optimizer, resume the source "
                                    "checkpoint at the new layout directly).")
    rs.add_argument("--checkpoint", required=True, help="checkpoint root (with `latest`) or an iter_* directory")
    rs.add_argument("--output", required=True, help="checkpoint root to write (must hold no checkpoint)")
    rs.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    rs.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    rs.add_argument("--ep", type=int, default=1, help="target expert-parallel size (MoE models; default 1)")
    rs.add_argument("--tokenizer", help="refuse unless this SentencePiece model is the one the checkpoint records")
    dm = sub.add_parser("dense-to-mod", help="a dense checkpoint -> a MoD model that starts as the dense one "
                                             "(model-only, iteration 0)",
                        description="Copy every weight of a dense checkpoint into a MoD model with the routed "
                                    "layers chosen by --mod.*; routers start at 0 with mod.router_weight=2sigmoid "
                                    "(r = 1), so at capacity 1.0 the model equals the dense one (checked). "
                                    "Train on with the printed --mod.* overrides, e.g. plus "
                                    "--mod.capacity_warmup_iters=N.")
    dm.add_argument("--checkpoint", required=True, help="dense checkpoint root (with `latest`) or an iter_* directory")
    dm.add_argument("--output", required=True, help="checkpoint root to write (must hold no checkpoint)")
    dm.add_argument("--tokenizer", help="refuse unless this SentencePiece model is the one the checkpoint records")
    from mod_megatron.config import MoDConfig

    for name, f in MoDConfig.__dataclass_fields__.items():  # the router starts at 0 whatever router_init_std says
        if name not in ("enabled", "router_init_std"):
            dm.add_argument(f"--mod.{name}", dest=f"mod_{name}", metavar=type(f.default).__name__.upper(),
                            help="default: 2sigmoid" if name == "router_weight" else
                            f"default: the checkpoint's saved mod.{name} ({f.default} unless changed)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from mod_megatron.convert.deepspeed import ConversionError, from_deepspeed
    from mod_megatron.training.checkpoint import CheckpointError

    try:
        if args.command == "from-deepspeed":
            out = from_deepspeed(args.checkpoint, args.output)
            print(f"wrote {out}")
        elif args.command == "to-hf":
            from mod_megatron.convert.hf import to_hf

            print(f"wrote {to_hf(args.checkpoint, args.output, args.tokenizer)}")
        elif args.command == "from-hf":
            from mod_megatron.convert.hf import from_hf

            print(f"wrote {from_hf(args.input, args.output)}")
        elif args.command == "reshard":
            from mod_megatron.convert.reshard import reshard

            print(f"wrote {reshard(args.checkpoint, args.output, args.tp, args.pp, args.ep, args.tokenizer)}")
        elif args.command == "dense-to-mod":
            from mod_megatron.convert.dense_to_mod import dense_to_mod

            mod = [f"--mod.{k[4:]}={v}" for k, v in vars(args).items() if k.startswith("mod_") and v is not None]
            res = dense_to_mod(args.checkpoint, args.output, mod, args.tokenizer)
            print(f"wrote {res['dir']}\ncheck: at capacity 1.0 max |logit - dense logit| = "
                  f"{res['max_abs_logit_diff_capacity_1']:.2e}\ntrain on with: {' '.join(res['train_overrides'])}")
    except (ConversionError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
