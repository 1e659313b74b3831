"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's parallel state.

Reads the usual launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set by
torchrun, the deepspeed launcher or srun wrappers; without them it runs as a single process.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from mod_megatron import platform
from mod_megatron.config import Config, validate


@dataclass
class Layout:
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logger(self) -> bool:
        """The one rank that prints and writes TensorBoard: last stage, first TP and DP rank."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


def choose_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not platform.cuda_available():
        from mod_megatron.config import ConfigError

        raise ConfigError("train.device=cuda but no CUDA device is visible; use --train.device=auto or cpu")
    if want == "cpu" or not platform.cuda_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def initialize(cfg: Config, timeout_minutes: Optional[float] = None) -> Layout:
    """Start torch.distributed and megatron-core's model-parallel groups for cfg.parallel.

    A collective that waits longer than `timeout_minutes` (default train.dist_timeout_minutes) for a
    dead or hung rank raises instead of hanging; the CLI turns it into one `error:` line."""
    if timeout_minutes is None:
        timeout_minutes = cfg.train.dist_timeout_minutes
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    validate(cfg, world_size=world_size)
    device = choose_device(cfg)
    if device.type == "cpu":
        platform.apply()
    if not dist.is_initialized():
        # A lone process (no launcher) needs no rendezvous port: an in-memory store cannot collide
        # with other jobs on the host.
        store = dist.HashStore() if world_size == 1 and "MASTER_ADDR" not in os.environ else None
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank, world_size=world_size, store=store,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    from megatron.core import parallel_state as ps

    p = cfg.parallel
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            # MoE: experts split over ep ranks taken from tp x dp; never tensor-parallel (docs/mode.md).
            expert_model_parallel_size=cfg.moe.ep,
            expert_tensor_parallel_size=1,
            # megatron's TP/PP/DP subgroups carry their own timeout (30 min by default), not the world's.
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_everything(cfg.train.seed)
    return Layout(
        rank=rank, world_size=world_size, tp=p.tp, pp=p.pp, dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), device=device,
    )


def seed_everything(seed: int) -> None:
    """Same seed on every rank: TP ranks must build identical replicated params (norms, routers)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_single_process(seed: int = 0) -> torch.device:
    """One process, TP = PP = 1, outside any launcher (benchmarks, conversions): start the process
    group (in-memory store) and megatron's parallel state if they are not up yet, seed, and return
    the device (CUDA when there is one; the CPU shims are installed otherwise)."""
    from megatron.core import parallel_state as ps

    on_gpu = platform.cuda_available()
    if not on_gpu:
        platform.apply()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1, store=dist.HashStore())
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
