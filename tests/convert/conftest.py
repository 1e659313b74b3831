"""tests/convert: make `tests.convert.*` and `tests.distributed.*` importable (helpers in convert_helpers.py)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
