"""Shared fixtures: one 1-rank gloo + megatron parallel state per pytest process, and a tiny-model builder."""
from __future__ import annotations

import socket

import pytest
import torch

TINY = ["--model.num_layers=4", "--model.hidden_size=64", "--model.num_attention_heads=4",
        "--model.seq_length=32", "--model.vocab_size=100", "--mod.capacity=0.25"]


def pytest_configure(config):
    # megatron-core's import-time "no Transformer Engine / Apex" and deprecation notices are noise here.
    config.addinivalue_line("filterwarnings", "ignore:::megatron")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Initialise torch.distributed (gloo, world size 1) and megatron's TP=PP=1 state once; reuse it."""
    from mod_megatron import platform

    platform.apply()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    yield


def seed_all(seed: int) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


@pytest.fixture
def build_gpt(megatron_single_rank):
    """build_gpt(*overrides, seed=0) -> (cfg, model): the tiny config above plus overrides, seeded."""
    from mod_megatron.config import load_config
    from mod_megatron.model.gpt import build_model, transformer_config

    def build(*overrides: str, seed: int = 0):
        cfg = load_config(None, TINY + list(overrides))
        seed_all(seed)
        return cfg, build_model(cfg, transformer_config(cfg))

    return build
