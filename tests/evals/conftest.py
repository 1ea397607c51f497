"""Shared set-up of the evals tests: one intra-op thread, the tiny diffusers pipelines and the helpers importable."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
for p in (str(_HERE), str(_HERE.parent / "diffusers")):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(autouse=True, scope="package")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
