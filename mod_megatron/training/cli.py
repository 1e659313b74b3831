"""`mod-train --config configs/tiny-cpu.yaml [--section.key=value ...]`

Loads and validates the config, starts the process groups, prepares the data (the default corpus is
downloaded, tokenized and cached on first use, by rank 0 while the others wait), then trains,
evaluates and checkpoints. Launch one process, or many with torchrun / srun / the deepspeed launcher.
Bad input (config, data, checkpoint) ends with one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mod-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config value can be overridden: --train.iters=50 --mod.capacity=0.25")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    return parse_with_overrides(p, argv)


def parse_with_overrides(parser: argparse.ArgumentParser, argv):
    """Parse known options; the rest must be config overrides (--section.key=value) or it is an error."""
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "." not in o.split("=", 1)[0]]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (overrides look like --section.key=value)")
    return args, overrides


def prepare_inputs(cfg, layout):
    """Tokenizer and datasets for this run (rank 0 builds caches first, the others wait)."""
    import torch.distributed as dist

    from mod_megatron.data.datasets import build_datasets
    from mod_megatron.data.preprocess import data_paths, prepare_data
    from mod_megatron.data.tokenizer import SPTokenizer
    from mod_megatron.data.common import DataError

    d = cfg.data
    if d.corpus == "default":
        if layout.rank == 0:
            prepare_data(d.data_dir, cfg.model.vocab_size)
        dist.barrier()
        paths = data_paths(d.data_dir, cfg.model.vocab_size)
    else:
        paths = {"tokenizer_model": d.tokenizer_model, "train_prefix": d.train_prefix,
                 "heldout_prefix": d.heldout_prefix or d.train_prefix}
    if not os.path.isfile(paths["tokenizer_model"]):
        raise DataError(f"tokenizer model not found: {paths['tokenizer_model']} (make one with mod-preprocess)")
    tokenizer = SPTokenizer(paths["tokenizer_model"])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer {paths['tokenizer_model']} has {tokenizer.vocab_size} tokens but "
                        f"model.vocab_size={cfg.model.vocab_size}; set --model.vocab_size={tokenizer.vocab_size}")
    t = cfg.train
    num_samples = (t.iters * t.global_batch_size, max(1, t.eval_iters) * t.global_batch_size,
                   max(1, t.eval_iters) * t.global_batch_size)
    datasets = build_datasets(paths["train_prefix"], paths["heldout_prefix"], cfg.model.seq_length, t.seed,
                              tokenizer, num_samples=num_samples, split=d.split)
    meta = {"tokenizer_sha256": tokenizer.sha256, "tokenizer_model": os.path.abspath(paths["tokenizer_model"])}
    return datasets, meta


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from mod_megatron.config import ConfigError, load_config
    from mod_megatron.data.common import DataError
    from mod_megatron.training.checkpoint import CheckpointError
    from mod_megatron.training.numerics import NumericalError
    from torch.distributed import DistError

    t_main = time.time()
    import torch.distributed as dist

    owns_groups = not dist.is_initialized()  # an in-process caller (tests) may hold its own groups
    try:
        cfg = load_config(args.config, overrides)
        from mod_megatron.training.distributed import initialize, shutdown

        layout = initialize(cfg)
        t_groups = time.time()
        (train_ds, valid_ds, heldout_ds), meta = prepare_inputs(cfg, layout)
        t_data = time.time()
        if cfg.train.engine == "deepspeed":
            from mod_megatron.training.ds_engine import DeepSpeedTrainer as Trainer
        else:
            from mod_megatron.training.trainer import Trainer

        trainer = Trainer(cfg, layout, train_ds, valid_ds, heldout_ds, meta=meta)
        if layout.is_logger:  # where a process's start-up goes (imports, groups, data, model + checkpoint)
            t_model, t_proc = time.time(), _process_start(t_main)
            print(f"setup {t_model - t_proc:.1f} s: interpreter and imports {t_main - t_proc:.1f} | process groups "
                  f"{t_groups - t_main:.1f} | data {t_data - t_groups:.1f} | model, optimizer, checkpoint "
                  f"{t_model - t_data:.1f}", flush=True)
        summary = trainer.run()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        _quiet_shutdown(owns_groups)
        return 2
    except NumericalError as e:  # NaN/Inf (train.nan_policy): nothing applied, nothing saved
        print(f"error: {e}", file=sys.stderr)
        _quiet_shutdown(owns_groups)
        return 3
    except (DistError, RuntimeError) as e:  # a rank died or hung (train.dist_timeout_minutes): fail, don't hang
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if not isinstance(e, DistError) and not any(m in first for m in _PEER_LOST):
            raise
        print(f"error: rank {os.environ.get('RANK', '0')} lost contact with the other ranks ({type(e).__name__}: "
              f"{first}); rerun the job to resume from the last checkpoint", file=sys.stderr)
        return 1
    if layout.is_logger:
        if summary.get("interrupted"):
            print(f"stopped by signal: iteration {summary['iteration']} | checkpoint {summary['checkpoint']}",
                  flush=True)
        else:
            print(f"done: iteration {summary['iteration']} | train {_f(summary['train_loss'])} | "
                  f"valid {_f(summary['valid_loss'])} | held-out {_f(summary['heldout_loss'])} | "
                  f"checkpoint {summary['checkpoint']}", flush=True)
    shutdown()
    return 0


def _process_start(fallback: float) -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return fallback


def _quiet_shutdown(owns_groups: bool) -> None:
    """Tear the process groups down after a clean error (every rank raised it), so that the exit status
    is the error's: left up, gloo's threads can abort the interpreter at exit ("terminate called
    without an active exception", status -6). Not after a lost peer: a collective teardown could hang.
    Only groups this call started: an in-process caller's own groups stay up."""
    if not owns_groups:
        return
    try:
        from mod_megatron.training.distributed import shutdown

        shutdown()
    except Exception:
        pass


# How gloo / NCCL report a dead or hung peer (they raise plain RuntimeErrors).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
              "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


if __name__ == "__main__":
    sys.exit(main())
