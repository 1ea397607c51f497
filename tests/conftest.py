"""Shared test set-up: offline hub, deterministic seeds, and the markers' skip rules."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """One intra-op thread per test process: the suite runs one process per core (``-n 2``), its models are
    small, and on busy shared cores OpenMP spin-waits between threads make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _reference_kernels_outside_tests_kernels(request: pytest.FixtureRequest) -> Iterator[None]:
    """Outside ``tests/kernels/`` frozen layers run the plain-PyTorch reference kernels: those tests pin exact
    identities (fake-quant == frozen bit for bit, bytes of stored codes) that fast kernels meet only within an SQNR
    (the CPU family, ``vqsuite.kernels.cpu``, is held to the reference in ``tests/kernels/test_cpu_*.py``)."""
    if request.node.path.parent.name == "kernels":
        yield
        return
    import vqsuite.kernels

    with vqsuite.kernels.prefer("reference"):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
