"""What every conversion checks about its input and guarantees about its output.

Input: a complete, verified checkpoint of this stack (format version, every file present with the
recorded size and sha256), written by the megatron engine, with its config in mod_meta.json and, when
the caller names a tokenizer, the same tokenizer it was trained with. Anything else is refused with a
one-line `ConversionError` before anything is written.

Output: a fresh checkpoint root (no `latest`, no complete checkpoint in it yet), written model-only
through `iter_NNNNNNN.tmp` and renamed at the end (checkpoint.begin / publish); a failure part-way
removes what it wrote, so the output root is left as it was (or absent).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Optional

import yaml

from mod_megatron.config import padded_vocab, ModelConfig
from mod_megatron.data.common import sha256_file
from mod_megatron.convert.deepspeed import ConversionError
from mod_megatron.training import checkpoint as ckpt

MODEL_SECTIONS = ("model", "mod", "moe")  # the sections that define the weights


def open_source(path: str, tokenizer: Optional[str] = None) -> tuple[str, dict]:
    """(checkpoint directory, its meta) for a checkpoint root or iter_NNNNNNN directory, all checked."""
    ckpt_dir = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(ckpt_dir)  # CheckpointError on a wrong format_version or missing meta
    problem = ckpt.verify(ckpt_dir, hashes=True)
    if problem is not None:
        raise ConversionError(f"{ckpt_dir} is damaged: {problem}")
    engine = meta.get("engine", "megatron")
    if engine != "megatron":
        raise ConversionError(f"{ckpt_dir} was written by the {engine} engine; convert it with "
                              "`mod-convert from-deepspeed` first")
    if not isinstance(meta.get("config"), dict) or "model" not in meta["config"]:
        raise ConversionError(f"{ckpt_dir}/{ckpt.META} has no saved model config")
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, ckpt_dir)
    return ckpt_dir, meta


def check_tokenizer(meta: dict, tokenizer: str, ckpt_dir: str) -> None:
    """Refuse when `tokenizer` is not the model file the checkpoint was trained with."""
    if not os.path.isfile(tokenizer):
        raise ConversionError(f"tokenizer model not found: {tokenizer}")
    saved = meta.get("tokenizer_sha256")
    if saved is None:
        raise ConversionError(f"{ckpt_dir} records no tokenizer hash; leave --tokenizer out to convert it")
    got = sha256_file(tokenizer)
    if got != saved:
        raise ConversionError(f"tokenizer mismatch: {tokenizer} has sha256 {got[:12]}..., the checkpoint was "
                              f"trained with {saved[:12]}... ({meta.get('tokenizer_model', 'path unknown')})")


def check_output(out_root: str, src_dir: str) -> None:
    """Refuse an output root that already holds a checkpoint, or that is the source's own root."""
    out, src_root = os.path.abspath(out_root), os.path.dirname(os.path.abspath(src_dir))
    if out in (src_root, os.path.abspath(src_dir)):
        raise ConversionError(f"--output {out_root} is the source checkpoint's directory; choose a new one")
    if os.path.exists(os.path.join(out, ckpt.TRACKER)) or ckpt.complete_iterations(out):
        raise ConversionError(f"--output {out_root} already holds a checkpoint; choose a new directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--output {out_root} exists and is not a directory")


def saved_layout(meta: dict) -> dict:
    """{"tp", "pp", "ep"} the checkpoint was saved at (meta `layout`, else its config's parallel section)."""
    cfg = meta["config"]
    layout = meta.get("layout") or {}
    return {"tp": int(layout.get("tp") or cfg.get("parallel", {}).get("tp", 1)),
            "pp": int(layout.get("pp") or cfg.get("parallel", {}).get("pp", 1)),
            "ep": int(layout.get("ep") or cfg.get("moe", {}).get("ep", 1))}


def model_config(section: dict) -> ModelConfig:
    known = {k: v for k, v in section.items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**known)


def vocab_divisor(meta: dict, tp: int) -> int:
    """make_vocab_size_divisible_by that keeps the saved embedding's padded rows at tensor-parallel `tp`.

    The embedding is padded to a multiple of make_vocab_size_divisible_by * tp, so a TP change can
    change its row count (vocab 100, divisor 128: 256 rows at TP=2, 128 at TP=1) and with it the
    softmax. The saved divisor is kept when the rows stay the same; else it becomes rows / tp."""
    m = model_config(meta["config"]["model"])
    rows = padded_vocab(m, saved_layout(meta)["tp"])
    if padded_vocab(m, tp) == rows:
        return m.make_vocab_size_divisible_by
    if rows % tp:
        raise ConversionError(f"tp={tp} cannot hold the checkpoint's padded vocabulary of {rows} rows "
                              f"(not divisible by {tp}); choose a tp that divides {rows}")
    return rows // tp


def overrides_from(config: dict, sections=MODEL_SECTIONS) -> list[str]:
    """`--section.key=value` overrides that rebuild these sections of a saved config."""
    return [f"--{section}.{key}={yaml_value(value)}" for section in sections
            for key, value in (config.get(section) or {}).items()]


def yaml_value(value) -> str:
    """A value as it is written on the command line (--mod.predictor=false, --model.num_query_groups=null)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@contextlib.contextmanager
def output_guard(out_root: str):
    """Remove whatever a failing conversion wrote under `out_root` (and the root if it made it)."""
    existed = os.path.exists(out_root)
    before = set(os.listdir(out_root)) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out_root, ignore_errors=True)
        elif os.path.isdir(out_root):
            for name in set(os.listdir(out_root)) - before:
                path = os.path.join(out_root, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise


def load_weights(ckpt_dir: str, chunks) -> dict:
    """All ranks: load a checkpoint's model weights into `chunks`; a damaged file is a one-line error.

    A multi-rank load reports damage as torch's CheckpointException, a BaseException that
    checkpoint.load's `except Exception` lets through; its first cause becomes the message."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return ckpt.load(ckpt_dir, chunks, load_rng=False)
    except CheckpointException as e:
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        first = (str(causes[0]).strip().splitlines() or [""])[0][:200] if causes else ""
        raise ConversionError(f"cannot load {ckpt_dir}: {type(causes[0]).__name__ if causes else ''}: "
                              f"{first}") from None


def save_model_only(out_root: str, iteration: int, chunks, meta: dict) -> str:
    """All ranks: write the chunks' weights as a model-only checkpoint; return its directory."""
    from megatron.core import dist_checkpointing

    tmp = ckpt.begin(out_root, iteration)
    state = ckpt.sharded_state_dict(chunks)
    state["iteration"] = iteration
    dist_checkpointing.save(state, tmp)
    return ckpt.publish(out_root, iteration, tmp, dict(meta, model_only=True), keep_last=10 ** 6)
