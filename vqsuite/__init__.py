"""vqsuite: low-bit quantization for diffusion pipelines and vision models, from calibration to kernels.

The public face::

    import vqsuite
    model = vqsuite.quantize_model(model, "w4a16")      # any nn.Module; report in model.vqsuite_report
    vqsuite.save_quantized(model, "out/")               # safetensors + JSON, atomic
    model = vqsuite.load_quantized("out/", model=float_model)

Heavy libraries (diffusers, timm, triton) are imported only where used.
"""

from __future__ import annotations

import logging

from vqsuite.config import (
    QuantConfig,
    QuantSpec,
    describe_presets,
    get_preset,
    list_presets,
    register_preset,
)
from vqsuite.pipelines import (
    CheckpointError,
    QuantReport,
    freeze,
    load_quantized,
    module_nbytes,
    quantize_model,
    save_quantized,
)

__version__ = "0.1.0"


def quantize_pipeline(pipe, config="svdquant-int4", **kw):  # noqa: ANN001, ANN201 - see the real docstring
    """Quantize a loaded diffusers pipeline in place; see :func:`vqsuite.pipelines.diffusers.quantize_pipeline`."""
    from vqsuite.pipelines.diffusers import quantize_pipeline as _quantize_pipeline

    return _quantize_pipeline(pipe, config, **kw)


logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CheckpointError",
    "QuantConfig",
    "QuantReport",
    "QuantSpec",
    "__version__",
    "describe_presets",
    "freeze",
    "get_preset",
    "list_presets",
    "load_quantized",
    "module_nbytes",
    "quantize_model",
    "quantize_pipeline",
    "register_preset",
    "save_quantized",
]
