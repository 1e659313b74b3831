"""Choosing between the PyTorch and the Triton routing ops (mod.fused_routing), on any machine."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mod_megatron.config import ConfigError, load_config
from mod_megatron.kernels import routing as R

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


RUN_CPU_LAYER = """
import sys, warnings
warnings.filterwarnings("ignore")
if sys.argv[1] == "without-triton":  # as on a machine where triton is not installed
    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("no triton here")
    sys.meta_path.insert(0, NoTriton())
import torch
import mod_megatron.model.mod_layer
from megatron.core.utils import HAVE_TRITON
from mod_megatron.training.distributed import init_single_process
sys.path.insert(0, "benchmarks")
from bench_block import build_layer, rotary
init_single_process(seed=0)
layer = build_layer(64, 4, 0.25, torch.float32)
x = torch.randn(32, 2, 64, requires_grad=True)
out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary(32, 16, "cpu"))
out.sum().backward()
ours = any(m in sys.modules for m in ("mod_megatron.kernels.routing_triton", "mod_megatron.kernels.topk_triton"))
print(layer.fused_routing, ours, "triton" in sys.modules, HAVE_TRITON)
"""


@pytest.mark.parametrize("case", ["as-installed", "without-triton"])
def test_a_mod_layer_on_cpu_never_imports_triton(case):
    """Our code imports triton only in kernels/routing_triton.py and topk_triton.py, and only for CUDA
    tensors. (megatron-core
    itself imports triton when it is installed: then 'triton' is in sys.modules through megatron alone.)"""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", RUN_CPU_LAYER, case], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fused, ours, loaded, megatron_has_it = proc.stdout.strip().splitlines()[-1].split()
    assert fused == "auto" and ours == "False"
    assert loaded == megatron_has_it  # triton loaded iff megatron-core loaded it
    if case == "without-triton":
        assert loaded == "False"


def test_use_fused_modes_on_cpu_tensors():
    x = torch.zeros(4, 2, 8)
    assert R.use_fused("off", x) is False
    assert R.use_fused("auto", x) is False
    with pytest.raises(RuntimeError, match="fused_routing=on needs a CUDA tensor"):
        R.use_fused("on", x)
    with pytest.raises(ValueError, match="unknown fused_routing"):
        R.use_fused("fast", x)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("on", "on"), ("off", "off"), ("false", "off")])
def test_config_switch(value, expected):
    assert load_config(None, [f"--mod.fused_routing={value}"]).mod.fused_routing == expected


def test_config_switch_rejects_other_values():
    with pytest.raises(ConfigError, match="mod.fused_routing must be auto, on or off"):
        load_config(None, ["--mod.fused_routing=triton"])


def test_reference_ops_match_the_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    index, weight = torch.tensor([[0, 2], [4, 5], [8, 6]]), torch.rand(3, 2, generator=g)
    rows = R.gather_tokens(x, index)
    out = R.combine_tokens(x, y, weight, index)
    expected = x.clone()
    for j in range(3):
        for b in range(2):
            p = index[j, b]
            assert torch.equal(rows[j, b], x[p, b])
            expected[p, b] = x[p, b] + weight[j, b] * (y[j, b] - x[p, b])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
