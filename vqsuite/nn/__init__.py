"""Quantized modules: module swap via ``from_float(module, spec)``, fake-quant until ``freeze()``."""

from __future__ import annotations

from vqsuite.nn.base import QuantLayer
from vqsuite.nn.conv import QConv2d, QConvTranspose2d
from vqsuite.nn.conv_same import QConv2dSame, SamePadConv2d
from vqsuite.nn.linear import QLinear, QLinearLowRank, lowrank_factors

__all__ = [
    "QConv2d",
    "QConv2dSame",
    "QConvTranspose2d",
    "QLinear",
    "QLinearLowRank",
    "QuantLayer",
    "lowrank_factors",
    "SamePadConv2d",
]
