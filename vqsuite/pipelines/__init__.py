"""Applying quantization to whole models and pipelines, and saving/loading the result.

Nothing here imports diffusers or timm at import time.
"""

from __future__ import annotations

from vqsuite.pipelines.io import CheckpointError, load_quantized, read_checkpoint_meta, save_quantized
from vqsuite.pipelines.layer_adapters import LAYER_ADAPTERS, LayerAdapter, register_layer_adapter
from vqsuite.pipelines.modules import LAYER_RULES, freeze, quantize_model, register_layer_rule
from vqsuite.pipelines.report import QuantReport, module_nbytes

__all__ = [
    "LAYER_ADAPTERS",
    "LAYER_RULES",
    "CheckpointError",
    "LayerAdapter",
    "QuantReport",
    "freeze",
    "load_quantized",
    "module_nbytes",
    "quantize_model",
    "read_checkpoint_meta",
    "register_layer_adapter",
    "register_layer_rule",
    "save_quantized",
]
