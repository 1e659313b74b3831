"""training/numerics.py's gradient check: one max-abs pass per grad buffer finds a single NaN or Inf
anywhere (CPU, and on a GPU where there is one), and never flags large finite values."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mod_megatron.training import numerics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _chunk(*grads):
    return SimpleNamespace(buffers=[SimpleNamespace(grad_data=g) for g in grads], expert_parallel_buffers=[])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None], ids=["nan", "inf", "-inf", "none"])
def test_one_bad_value_anywhere_is_found(device, bad):
    g = torch.Generator().manual_seed(0)
    buffers = [torch.randn(n, generator=g).to(device) for n in (1, 4097, 1_000_003)]
    buffers[1][5] = 3e38  # large but finite: not flagged
    for where in ([0, 0], [2, 0], [2, 999_999], [1, 4096]):
        grads = [b.clone() for b in buffers]
        if bad is not None:
            grads[where[0]][where[1]] = bad
        ok = numerics.local_grads_finite([_chunk(*grads[:2]), _chunk(grads[2])])
        assert ok.device.type == device and ok.dtype == torch.bool  # stays on the device: no sync there
        assert bool(ok) is (bad is None)
        assert (numerics.any_rank_flag(ok, torch.device(device)).item() == 0.0) is (bad is None)


def test_bf16_buffers_and_plain_param_grads():
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.zeros(10)
    plain = torch.nn.Linear(2, 2)  # no megatron buffers: its params' .grad are read
    plain.weight.grad = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    assert bool(numerics.local_grads_finite([_chunk(torch.ones(8, dtype=torch.bfloat16))]))
    assert not bool(numerics.local_grads_finite([plain]))
    assert numerics.any_rank_flag(False, torch.device("cpu")).tolist() == [1.0]
    assert numerics.any_rank_flag(True, torch.device("cpu")).tolist() == [0.0]
