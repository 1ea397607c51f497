"""Kernels: plain-PyTorch references (``reference.py``), Triton families (``triton/``), the CPU family (``cpu/``)
and the dispatcher that picks an implementation. Kernels take a :class:`~vqsuite.kernels.operands.QLinearOperands`
record, never a module."""

from __future__ import annotations

from vqsuite.kernels import reference
from vqsuite.kernels.dispatch import (
    current_preference,
    prefer,
    register_fast,
    register_reference,
    select,
    select_impl,
)
from vqsuite.kernels.operands import QLinearOperands

register_reference("qlinear", reference.qlinear)
register_reference("dequantize_weight", reference.dequantize_weight)

from vqsuite.kernels.triton import register_triton_kernels  # noqa: E402

register_triton_kernels()

from vqsuite.kernels.cpu import register_cpu_kernels  # noqa: E402

register_cpu_kernels()

__all__ = [
    "QLinearOperands",
    "current_preference",
    "prefer",
    "reference",
    "register_fast",
    "register_reference",
    "select",
    "select_impl",
]
