"""Trace chosen training steps with torch.profiler (`logging.profile_steps`, `logging.profile_ranks`).

    mod-train --config C.yaml --logging.profile_steps=[20,22]      # iterations 20..22, rank 0

For each traced rank, after the last traced step (or when training stops first), two files go to
`<logging.dir>/profile/`:

- `rank<R>.json`: the Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev): host ops,
  GPU kernels and copies on their streams, one `iteration#N` range per traced iteration N;
- `rank<R>.txt`: the ops and kernels of the traced steps ranked by their own time (GPU time on a GPU).

Steps outside the range run unprofiled, so a trace can be taken deep into a long run. The profiler's
own cost per launch makes traced steps slower than the others: read time shares and gaps from a
trace, tokens/s from the log.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


class StepProfiler:
    """Starts torch.profiler before iteration `first`, stops after `last`, writes the files."""

    def __init__(self, steps: Optional[list], ranks: list, rank: int, log_dir: str, device: torch.device):
        self.first, self.last = (steps or (0, -1))
        self.active = steps is not None and rank in ranks
        self.rank, self.device = rank, device
        self.out_dir = os.path.join(log_dir, "profile")
        self.prof = None
        self.range = None  # the record_function range of the iteration being traced
        self.traced_last: Optional[int] = None  # the last iteration traced so far
        self.written: Optional[tuple] = None  # (trace path, table path) once written

    def before(self, iteration: int) -> None:
        """Call before running `iteration` (1-based)."""
        if not self.active or self.written or not self.first <= iteration <= self.last:
            return
        from torch.profiler import ProfilerActivity, profile, record_function

        if self.prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        self.range = record_function(f"iteration#{iteration}")
        self.range.__enter__()
        self.traced_last = iteration

    def _end_range(self) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None

    def after(self, iteration: int, stop_at: Optional[int] = None) -> Optional[tuple]:
        """Call after `iteration` ran (`stop_at`: the run's last iteration); returns the paths written when
        tracing ended here: the last traced iteration, or the run's last one before it."""
        if self.prof is None:
            return None
        self._end_range()
        return self.close() if iteration >= self.last or iteration == stop_at else None

    def close(self) -> Optional[tuple]:
        """Stop and write what was traced (also when training ends before the last traced step)."""
        if self.prof is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._end_range()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        trace = os.path.join(self.out_dir, f"rank{self.rank}.json")
        table = os.path.join(self.out_dir, f"rank{self.rank}.txt")
        prof.export_chrome_trace(trace)
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with open(table, "w") as f:
            f.write(f"# steps {self.first}-{self.traced_last}, rank {self.rank}, sorted by {key}\n")
            f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90) + "\n")
        self.written = (trace, table)
        return self.written
