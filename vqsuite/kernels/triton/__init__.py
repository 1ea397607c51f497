"""Triton kernels, one module per family; each is imported only when a call could use it.

A family module defines two functions for the ``"qlinear"`` op:

    accepts(x: torch.Tensor, ops: QLinearOperands) -> bool   # shapes, dtypes and formats this family handles
    qlinear(x: torch.Tensor, ops: QLinearOperands) -> torch.Tensor   # x [..., K] -> [..., N], same math as its twin

(both also take a frozen layer in place of ``ops``, for tests and benchmarks:
:func:`~vqsuite.kernels.operands.as_operands`).

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first
imported (that is how the tests check every kernel against ``vqsuite.kernels.reference`` without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

from vqsuite.kernels.dispatch import KernelImpl, register_fast
from vqsuite.kernels.operands import QLinearOperands, as_operands

logger = logging.getLogger(__name__)

#: family modules, tried in this order for every frozen ``qlinear`` call
FAMILIES: tuple[str, ...] = ("mma8", "w4a16")


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception as err:  # ImportError, or a broken install that fails at import
        logger.info("triton unavailable (%s): kernels use the PyTorch reference", err)
        return False
    return True


def device_usable(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors of ``device`` here?"""
    if device.type == "cuda":
        return triton_importable()
    return device.type == "cpu" and interpret_mode() and triton_importable()


@functools.cache
def _family(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"vqsuite.kernels.triton.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"vqsuite.kernels.triton.{name}":
            return None  # family not built (yet)
        raise


def _impl(name: str) -> KernelImpl:
    def accepts(x: torch.Tensor, ops: QLinearOperands | None = None, layer=None) -> bool:  # noqa: ANN001
        if not device_usable(x.device):
            return False
        mod = _family(name)
        return mod is not None and bool(mod.accepts(x, ops if ops is not None else layer))

    def run(x: torch.Tensor, ops: QLinearOperands) -> torch.Tensor:
        return _family(name).qlinear(x, as_operands(ops))

    return KernelImpl(name=f"triton.{name}", fn=run, accepts=accepts)


def register_triton_kernels() -> None:
    """Register every family for the ``"qlinear"`` op (cheap: nothing is imported until a call needs it)."""
    for name in FAMILIES:
        register_fast("qlinear", _impl(name))
