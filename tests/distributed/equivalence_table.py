"""Print how far each parallel layout is from the single-rank run: `python -m tests.distributed.equivalence_table`.

    layout | max |Δloss| | max |Δgrad| (first step) | max |Δgrad| (all steps) | max |Δparam|

over 3 training steps of the tiny MoD GPT in tests/distributed/equivalence.py (fp32, CPU, gloo).
"""
from __future__ import annotations

import sys
import time
import warnings


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    from tests.distributed import equivalence as eq

    layouts = [eq.BY_NAME[n] for n in names] if names else eq.LAYOUTS
    t0 = time.time()
    ref = eq.reference()
    print(f"reference (1 rank): losses {', '.join(f'{x:.6f}' for x in ref['losses'])}  ({time.time() - t0:.2f}s)")
    print(f"{'layout':<46} | {'ranks':>5} | {'max |Δloss|':>11} | {'|Δgrad| 1st':>11} | {'|Δgrad| all':>11} | "
          f"{'max |Δparam|':>12} | time")
    print("-" * 118)
    for layout in layouts:
        t0 = time.time()
        d = eq.compare(layout)
        print(f"{layout.name:<46} | {layout.world_size:>5} | {d['loss']:11.2e} | {d['grad_first']:11.2e} | "
              f"{d['grad']:11.2e} | {d['param']:12.2e} | {time.time() - t0:.2f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
