"""Plain-PyTorch reference kernels: the twins every fast path is tested against.

Weight storage (frozen layers), for a GEMM weight ``[N, K]`` with groups of ``G`` along K:
    qweight: ``[N, K/2]`` uint8 (two 4-bit codes per byte) | ``[N, K]`` int8/uint8 | ``[N, K]`` float8
    wscales: ``[N, K/G]`` (``G = K`` per channel) float, float8_e4m3fn (NVFP4) or uint8 E8M0 (MXFP4)
    wzeros:  ``[N, K/G]`` uint8, asymmetric integer formats only
    wtscale: ``[]`` float32, NVFP4 only
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqsuite.config import QuantSpec
from vqsuite.formats import QTensor, dequantize, get_format, unpack_4bit
from vqsuite.nn.quantizers import quantize_activation


def unpack_weight_codes(qweight: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Stored ``qweight`` -> unpacked codes ``[N, K]`` in the dtype :func:`vqsuite.formats.quantize` gives."""
    fmt = get_format(fmt_name)
    if fmt.bits == 4:
        return unpack_4bit(qweight, signed=fmt.kind == "int" and not fmt.asymmetric)
    return qweight


def dequantize_weight(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    spec: QuantSpec,
    *,
    wzeros: torch.Tensor | None = None,
    wtscale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Frozen storage -> dequantized weight ``[N, K]`` in ``dtype`` (bit-identical to the fake-quant path)."""
    qt = QTensor(
        codes=unpack_weight_codes(qweight, spec.weight),
        scales=wscales,
        fmt=spec.weight,
        group_size=spec.weight_group_size,
        axis=-1,
        per_tensor=False,
        zero_points=wzeros,
        tensor_scale=wtscale,
    )
    return dequantize(qt, dtype)


def static_act_scale(layer) -> torch.Tensor | None:
    """The static activation scale this forward uses (0-d), or ``None`` (dynamic, observing, or none).

    Every kernel reads the static scale through this one function, so a layer whose scale depends on the
    denoising step resolves it in one place.
    """
    if layer.act_observing:
        return None
    return getattr(layer, "act_scale", None)


def qlinear(x: torch.Tensor, layer) -> torch.Tensor:
    """Reference forward of a ``QLinear``/``QLinearLowRank`` (fake-quant or frozen): ``x [..., K] -> [..., N]``."""
    return linear_with_weight(
        x,
        layer.quantized_gemm_weight(x.dtype),
        layer.bias,
        layer.spec,
        act_scale=static_act_scale(layer),
        smooth=getattr(layer, "smooth", None),
        proj_down=getattr(layer, "proj_down", None),
        proj_up=getattr(layer, "proj_up", None),
        quantize_input=not layer.act_observing,
        name=f"{layer.layer_name or type(layer).__name__}.input",
    )


def linear_with_weight(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: QuantSpec,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    proj_down: torch.Tensor | None = None,
    proj_up: torch.Tensor | None = None,
    quantize_input: bool = True,
    name: str = "input",
) -> torch.Tensor:
    """Reference quantized linear: ``y = Q(x/λ) @ W^T + (x/λ) @ proj_down @ proj_up^T + bias``.

    x: ``[..., K]``; weight: ``[N, K]`` already (de)quantized in ``x.dtype``; proj_down ``[K, r]``;
    proj_up ``[N, r]``; smooth ``[K]``. Returns ``[..., N]`` in ``x.dtype``.
    """
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    xq = quantize_activation(x, spec, act_scale, name) if quantize_input else x
    y = F.linear(xq, weight, None if bias is None else bias.to(x.dtype))
    if proj_down is not None and proj_up is not None:
        y = y + (x @ proj_down.to(x.dtype)) @ proj_up.to(x.dtype).t()
    return y
