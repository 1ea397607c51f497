"""Quantized modules: module swap via ``from_float(module, spec)``, fake-quant until ``freeze()``."""

from __future__ import annotations

from vqsuite.nn.base import QuantLayer
from vqsuite.nn.conv import (
    CONV_TWINS,
    FLOAT_CONV_TRANSPOSE_TYPES,
    FLOAT_CONV_TYPES,
    QConv1d,
    QConv2d,
    QConv3d,
    QConvBase,
    QConvNd,
    QConvTranspose1d,
    QConvTranspose2d,
    QConvTranspose3d,
    QConvTransposeNd,
)
from vqsuite.nn.conv_same import QConv2dSame, SamePadConv2d
from vqsuite.nn.linear import QLinear, QLinearLowRank, lowrank_factors

__all__ = [
    "CONV_TWINS",
    "FLOAT_CONV_TRANSPOSE_TYPES",
    "FLOAT_CONV_TYPES",
    "QConv1d",
    "QConv2d",
    "QConv2dSame",
    "QConv3d",
    "QConvBase",
    "QConvNd",
    "QConvTranspose1d",
    "QConvTranspose2d",
    "QConvTranspose3d",
    "QConvTransposeNd",
    "QLinear",
    "QLinearLowRank",
    "QuantLayer",
    "lowrank_factors",
    "SamePadConv2d",
]
