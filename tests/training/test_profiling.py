"""StepProfiler (training/profiling.py) on the CPU: it traces only its iterations and its ranks, and a
run that stops before the last traced iteration still gets what was traced."""
from __future__ import annotations

import json

import torch

from mod_megatron.training.profiling import StepProfiler


def _run(prof: StepProfiler, iterations: int) -> list:
    written = []
    for it in range(1, iterations + 1):
        prof.before(it)
        torch.ones(64, 64).mm(torch.ones(64, 64))
        written.append(prof.after(it))
    return written


def _iterations(path) -> list:
    events = json.loads(open(path).read())["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("iteration#")})


def test_traces_only_its_iterations(tmp_path):
    prof = StepProfiler([2, 3], [0], 0, str(tmp_path), torch.device("cpu"))
    written = _run(prof, 5)
    assert written[:2] == [None, None] and written[3:] == [None, None]  # written once, after iteration 3
    trace, table = written[2]
    assert _iterations(trace) == ["iteration#2", "iteration#3"]
    assert open(table).read().startswith("# steps 2-3, rank 0, sorted by self_cpu_time_total")


def test_other_ranks_do_not_trace(tmp_path):
    prof = StepProfiler([1, 2], [0, 3], 1, str(tmp_path), torch.device("cpu"))
    assert _run(prof, 3) == [None] * 3 and prof.close() is None
    assert not (tmp_path / "profile").exists()


def test_a_run_that_ends_early_keeps_what_was_traced(tmp_path):
    prof = StepProfiler([2, 10], [0], 0, str(tmp_path), torch.device("cpu"))
    assert _run(prof, 3) == [None] * 3
    trace, table = prof.close()
    assert _iterations(trace) == ["iteration#2", "iteration#3"]
    assert open(table).read().startswith("# steps 2-3, rank 0")  # what was traced, not what was asked
    assert prof.close() is None  # closed once


def test_the_runs_last_iteration_ends_the_trace(tmp_path):
    prof = StepProfiler([2, 10], [0], 0, str(tmp_path), torch.device("cpu"))
    prof.before(2)
    assert prof.after(2, stop_at=4) is None
    prof.before(3)
    assert prof.after(3, stop_at=4) is None
    prof.before(4)
    trace, _ = prof.after(4, stop_at=4)
    assert _iterations(trace) == ["iteration#2", "iteration#3", "iteration#4"]
