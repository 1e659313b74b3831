"""Load a trained model from a checkpoint for single-process evaluation or generation (TP = PP = 1).

The model is rebuilt from the config saved in the checkpoint (mod_meta.json "config"); a YAML
`--config` may replace the sections that do not define the model (data, train, ...), and
`--section.key=value` overrides come last.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import yaml

from mod_megatron.training import checkpoint as ckpt
from mod_megatron.training.checkpoint import CheckpointError, resolve_checkpoint

MODEL_SECTIONS = ("model", "mod", "moe")  # always taken from the checkpoint


def checkpoint_config(ckpt_dir: str, config_path: Optional[str] = None, overrides=()):
    """The validated Config of a checkpoint, single process (parallel settings reset)."""
    from mod_megatron.config import load_config

    saved = dict(ckpt.read_meta(ckpt_dir).get("config") or {})
    if not saved:
        raise CheckpointError(f"{ckpt_dir}/{ckpt.META} has no saved config")
    if config_path is not None:
        with open(config_path) as f:
            user = yaml.safe_load(f) or {}
        saved.update({k: v for k, v in user.items() if k not in MODEL_SECTIONS})
    saved.pop("parallel", None)  # one process: TP = PP = 1, no SP
    if isinstance(saved.get("moe"), dict):
        saved["moe"] = dict(saved["moe"], ep=1)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(saved, f)
        tmp = f.name
    try:
        return load_config(tmp, list(overrides))
    finally:
        os.unlink(tmp)


def load_model(checkpoint: str, config_path: Optional[str] = None, overrides=()):
    """(cfg, model in eval mode, meta, checkpoint dir). Starts a 1-process group if none is running."""
    from mod_megatron.training.builder import build_model_chunks
    from mod_megatron.training.distributed import initialize

    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt_dir, config_path, overrides)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    layout = initialize(cfg)
    chunks, _ = build_model_chunks(cfg, layout.device, wrap_ddp=False)
    meta = ckpt.load(ckpt_dir, chunks, load_rng=False)
    model = chunks[0]
    model.eval()
    return cfg, model, meta, ckpt_dir
