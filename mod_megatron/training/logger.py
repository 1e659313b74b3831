"""Metrics out: TensorBoard scalars, a progress bar and plain log lines, on the logging rank only."""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Optional


# The per-step line Trainer.run prints ("iter     20/300 | loss 4.8780 | lr ..."); benchmark drivers read
# mod-train's output back with step_losses.
STEP_LINE = re.compile(r"iter\s+(\d+)/\d+ \| loss (\S+) \|")


# The evaluation line Trainer._eval_and_log prints ("eval     100 | valid 4.1 (ppl 60.3) | held-out 5.2 (...)").
EVAL_LINE = re.compile(r"eval\s+(\d+) \| valid (\S+) \(ppl [^)]*\) \| held-out (\S+) ")


def step_losses(text: str) -> list[tuple[int, float]]:
    """[(iteration, training loss)] of every step line in mod-train's output, in order (nan/inf kept)."""
    return [(int(m.group(1)), float(m.group(2))) for m in STEP_LINE.finditer(text)]


def eval_losses(text: str) -> list[tuple[int, float, float]]:
    """[(iteration, valid loss, held-out loss)] of every evaluation line in mod-train's output, in order."""
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in EVAL_LINE.finditer(text)]


class RunLogger:
    def __init__(self, log_dir: str, enabled: bool, tensorboard: bool, progress_bar: bool, total: int,
                 initial: int = 0):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self._t0 = time.time()
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def advance(self, n: int = 1, postfix: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
