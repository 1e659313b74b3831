"""DeepSpeed (ZeRO 0/1/2) checkpoint of this stack -> the stack's own dist-checkpoint format.

The result is a model-only checkpoint (fp32 weights consolidated from the ZeRO partitions where
the model was trained in bf16): `mod-train` continues from it with a fresh optimizer at the same
iteration and data position, `mod-eval` / `mod-generate` load it like any other. Written
atomically next to nothing else: into `<out>/iter_NNNNNNN.tmp`, renamed, then `latest`.
"""
from __future__ import annotations

import os

import torch

from mod_megatron.training import checkpoint as ckpt


class ConversionError(RuntimeError):
    """A conversion that cannot be done; the message is one line."""


def consolidated_fp32_state_dict(ds_dir: str, zero_stage: int) -> dict:
    """fp32 weights of a DeepSpeed checkpoint directory (the iter_NNNNNNN folder of this stack)."""
    model_file = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(model_file):
        raise ConversionError(f"{ds_dir}: mp_rank_00_model_states.pt missing (not a DeepSpeed checkpoint?)")
    if os.path.exists(os.path.join(ds_dir, "mp_rank_01_model_states.pt")):
        raise ConversionError(f"{ds_dir}: tensor-parallel DeepSpeed checkpoints (tp > 1) are not supported yet; "
                              "resume it with --train.engine=deepspeed instead")
    if zero_stage in (1, 2):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(ds_dir))
        return dict(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
    state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}


def from_deepspeed(ds_dir: str, out_root: str) -> str:
    """Convert one DeepSpeed checkpoint of this stack; return the new checkpoint directory."""
    from megatron.core import dist_checkpointing

    from mod_megatron.model.gpt import build_model, transformer_config
    from mod_megatron.training.distributed import init_single_process

    meta = ckpt.read_meta(ds_dir)
    if meta.get("engine") != "deepspeed":
        raise ConversionError(f"{ds_dir} is not a DeepSpeed checkpoint of this stack (engine: "
                              f"{meta.get('engine', 'megatron')})")
    cfg = _config_from_meta(meta)
    weights = consolidated_fp32_state_dict(ds_dir, meta.get("zero_stage", 1))
    init_single_process(seed=0)
    model = build_model(cfg, transformer_config(cfg, torch.float32))
    own = model.state_dict()
    missing = [k for k, v in own.items() if torch.is_tensor(v) and k not in weights and not k.endswith("_extra_state")]
    if missing:
        raise ConversionError(f"{ds_dir}: {len(missing)} model tensors missing, e.g. {missing[0]}")
    model.load_state_dict({k: weights[k] for k in own if k in weights}, strict=False)

    iteration = meta["iteration"]
    tmp = ckpt.begin(out_root, iteration)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": iteration}, tmp)
    new_meta = {k: v for k, v in meta.items() if k not in ("files", "engine", "zero_stage", "world_size",
                                                            "format_version", "iteration")}
    new_meta.update(model_only=True, converted_from=os.path.abspath(ds_dir),
                    layout={"tp": 1, "pp": 1, "dp": 1, "vpp": None})
    return ckpt.publish(out_root, iteration, tmp, new_meta, keep_last=10 ** 6)


def _config_from_meta(meta: dict):
    from mod_megatron.config import load_config

    saved = meta["config"]
    overrides = [f"--{section}.{key}={_yaml(value)}" for section in ("model", "mod")
                 for key, value in saved.get(section, {}).items()]
    return load_config(None, overrides + ["--parallel.tp=1", "--parallel.pp=1", "--parallel.sp=false"])


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
