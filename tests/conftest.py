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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """The reference pin: outside ``tests/kernels/`` every test runs under ``vqsuite.kernels.prefer("reference")``.

    Why: those tests check the reference's exact numerics (fake-quant == frozen bit for bit, saved-then-loaded
    images equal, exact byte counts of stored codes), which the CPU family (``vqsuite.kernels.cpu``, the default on
    CPU tensors) meets only within an SQNR (it rounds activations to bf16) and whose packed copy adds bytes. The CPU
    family is tested in ``tests/kernels/``: per layer against the reference (``test_cpu_qlinear.py``) and end to end
    on the shipped mini-sd pipeline (``test_cpu_mini_sd.py``). A test outside ``tests/kernels`` that wants the
    default dispatch opens ``with vqsuite.kernels.prefer("auto"):`` itself.

    A hook around the whole run protocol, not a function-scoped fixture: module- and session-scoped fixtures (a
    saved pipeline and its images, a sweep's clean run) are set up inside the first test's protocol and must see
    the same kernels as the test bodies that compare against them."""
    if item.path.parent.name == "kernels":
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
