"""The fork-based layout runner: results in rank order, the layout it set up, loud failures, no hangs."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mod_megatron.config import ConfigError
from tests.distributed.spawn import RankError, run_layout

SMALL = ["--train.micro_batch_size=1", "--train.global_batch_size=4"]


def _describe(cfg, layout):
    x = torch.tensor([float(layout.rank)])
    dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    return {"rank": layout.rank, "tp": (layout.tp_rank, ps.get_tensor_model_parallel_world_size()),
            "pp": (layout.pp_rank, ps.get_pipeline_model_parallel_world_size()), "dp": layout.dp,
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(), "sp": cfg.parallel.sp,
            "tp_sum": x}


def test_results_come_back_in_rank_order_with_the_layout_set_up():
    res = run_layout(_describe, 4, tp=2, pp=2, sp=True, overrides=SMALL)
    assert [r["rank"] for r in res] == [0, 1, 2, 3]
    assert [r["tp"] for r in res] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [r["pp"] for r in res] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert all(r["dp"] == 1 and r["sp"] for r in res)
    assert [float(r["tp_sum"][0]) for r in res] == [1.0, 1.0, 5.0, 5.0]  # tensors come back as numpy
    res = run_layout(_describe, 2, pp=2, vpp=2, overrides=SMALL + ["--model.num_layers=4"])
    assert all(r["vpp"] == 2 for r in res)


def _fail_on_rank_1(cfg, layout):
    if layout.rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait here forever without the parent killing it


def test_a_failing_rank_raises_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"(rank 1|ranks \[0, 1\]) of 2 failed") as err:
        run_layout(_fail_on_rank_1, 2, overrides=SMALL)
    # rank 0 may fail too (its barrier loses the peer); rank 1's own error is always in the report
    assert "--- rank 1 ---" in str(err.value) and "ValueError: rank one is broken" in str(err.value)
    assert time.monotonic() - t0 < 20


def _hang_on_rank_0(cfg, layout):
    if layout.rank == 0:
        time.sleep(600)


def test_a_hung_rank_fails_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="did not finish within 3s"):
        run_layout(_hang_on_rank_0, 2, timeout=3, overrides=SMALL)
    assert time.monotonic() - t0 < 10


def test_a_bad_layout_fails_in_the_parent():
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp"):
        run_layout(_describe, 3, tp=2, overrides=SMALL)


def test_runs_from_a_process_that_already_has_a_process_group(megatron_single_rank):
    """Last in this file on purpose: after this, this pytest process holds a process group and every
    later run_layout goes through the fork server (correct, but ~5 s to start it once)."""
    from tests.distributed.spawn import start_method

    assert start_method() == "forkserver"
    res = run_layout(_describe, 2, tp=2, overrides=SMALL)
    assert [float(r["tp_sum"][0]) for r in res] == [1.0, 1.0]
