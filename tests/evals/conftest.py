"""Shared set-up of the evals tests: the tiny diffusers pipelines and the helpers importable."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for p in (str(_HERE), str(_HERE.parent / "diffusers")):
    if p not in sys.path:
        sys.path.insert(0, p)
