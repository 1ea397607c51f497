"""Quantization-aware fine-tuning: EfficientDM QALoRA for diffusion denoisers, OFQ for vision transformers (StatsQ,
QKR, CGA) and LSQ quantizers; :func:`freeze_qat` turns an OFQ/LSQ QAT model into packed quantized layers."""

from __future__ import annotations

from vqsuite.finetune.freeze import freeze_qat, restore_qat
from vqsuite.finetune.lsq import LSQActQuantizer, LSQWeightQuantizer, TimestepLSQActQuantizer
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
from vqsuite.finetune.qalora import QALoRAAdapter, attach_adapters, merge_adapters, qalora, qalora_mse, unfreeze_layer

__all__ = [
    "CGA",
    "LSQActQuantizer",
    "LSQWeightQuantizer",
    "OFQOptions",
    "QATAttention",
    "QALoRAAdapter",
    "QATLinear",
    "StatsQ",
    "TimestepLSQActQuantizer",
    "attach_adapters",
    "cga_boundary_mask",
    "freeze_qat",
    "kd_loss",
    "merge_adapters",
    "ofq",
    "oscillation_report",
    "prepare_qat",
    "qalora",
    "qalora_mse",
    "restore_qat",
    "statsq_codes",
    "statsq_quantize",
    "unfreeze_layer",
]
