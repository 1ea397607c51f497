"""Make the tiny pipeline builders (``tiny_pipelines.py``) importable under any pytest import mode (the one-thread
rule that made this folder ~9x faster on busy shared cores, 201 s against 23 s, now lives in tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
