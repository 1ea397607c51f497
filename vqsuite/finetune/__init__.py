"""Quantization-aware fine-tuning: OFQ for vision transformers (StatsQ, QKR, CGA) and LSQ quantizers."""

from __future__ import annotations

from vqsuite.finetune.lsq import LSQActQuantizer, LSQWeightQuantizer
from vqsuite.finetune.ofq import (
    CGA,
    OFQOptions,
    QATAttention,
    QATLinear,
    StatsQ,
    cga_boundary_mask,
    kd_loss,
    ofq,
    oscillation_report,
    prepare_qat,
    statsq_codes,
    statsq_quantize,
)

__all__ = [
    "CGA",
    "LSQActQuantizer",
    "LSQWeightQuantizer",
    "OFQOptions",
    "QATAttention",
    "QATLinear",
    "StatsQ",
    "cga_boundary_mask",
    "kd_loss",
    "ofq",
    "oscillation_report",
    "prepare_qat",
    "statsq_codes",
    "statsq_quantize",
]
