"""Kernels: plain-PyTorch references (``reference.py``) and the dispatcher that picks an implementation."""

from __future__ import annotations

from vqsuite.kernels import reference
from vqsuite.kernels.dispatch import current_preference, prefer, register_fast, register_reference, select

register_reference("qlinear", reference.qlinear)
register_reference("dequantize_weight", reference.dequantize_weight)

from vqsuite.kernels.triton import register_triton_kernels  # noqa: E402

register_triton_kernels()

__all__ = ["current_preference", "prefer", "reference", "register_fast", "register_reference", "select"]
