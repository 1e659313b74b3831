"""`mod-convert SUBCOMMAND ...`: checkpoint conversions, each checked by comparing outputs in tests.

    mod-convert from-deepspeed --checkpoint runs/x/checkpoints/iter_0000100 --output runs/x/native

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
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from mod_megatron.convert.deepspeed import ConversionError, from_deepspeed
    from mod_megatron.training.checkpoint import CheckpointError

    try:
        if args.command == "from-deepspeed":
            out = from_deepspeed(args.checkpoint, args.output)
            print(f"wrote {out}")
    except (ConversionError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
