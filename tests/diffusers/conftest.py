"""Make the tiny pipeline builders (``tiny_pipelines.py``) importable under any pytest import mode, and run these
tests on one intra-op thread: the tiny models gain nothing from threading, while on a machine whose cores are busy
with other work OpenMP spin-waits made this folder ~9x slower (201 s against 23 s, measured on 2 shared cores)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True, scope="package")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
