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
from vqsuite.nn.conv_lowrank import (
    FLOAT_LOWRANK_CONV_TWINS,
    LOWRANK_CONV_TWINS,
    QConv1dLowRank,
    QConv2dLowRank,
    QConv3dLowRank,
    QConvNdLowRank,
    QConvTranspose1dLowRank,
    QConvTranspose2dLowRank,
    QConvTranspose3dLowRank,
    QConvTransposeNdLowRank,
)
from vqsuite.nn.conv_same import QConv2dSame, SamePadConv2d
from vqsuite.nn.linear import QLinear, QLinearLowRank, lowrank_factors

__all__ = [
    "CONV_TWINS",
    "FLOAT_CONV_TRANSPOSE_TYPES",
    "FLOAT_CONV_TYPES",
    "FLOAT_LOWRANK_CONV_TWINS",
    "LOWRANK_CONV_TWINS",
    "QConv1d",
    "QConv1dLowRank",
    "QConv2d",
    "QConv2dLowRank",
    "QConv2dSame",
    "QConv3d",
    "QConv3dLowRank",
    "QConvBase",
    "QConvNd",
    "QConvNdLowRank",
    "QConvTranspose1d",
    "QConvTranspose1dLowRank",
    "QConvTranspose2d",
    "QConvTranspose2dLowRank",
    "QConvTranspose3d",
    "QConvTranspose3dLowRank",
    "QConvTransposeNd",
    "QConvTransposeNdLowRank",
    "QLinear",
    "QLinearLowRank",
    "QuantLayer",
    "lowrank_factors",
    "SamePadConv2d",
]
