"""Format-agnostic entry points: quantize, dequantize and fake_quantize by format name."""

from __future__ import annotations

import torch

from vqsuite.formats.base import Format, QTensor, _entry, get_format


def quantize(
    x: torch.Tensor,
    fmt: str | Format,
    *,
    group_size: int | None = None,
    axis: int = -1,
    per_tensor: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "x",
) -> QTensor:
    """Quantize ``x`` to ``fmt`` with one scale per group of ``group_size`` along ``axis``.

    ``group_size=None`` means one group per slice along ``axis`` (per channel for a weight ``[N, K]``
    with ``axis=-1``, per token for activations ``[M, K]``); ``per_tensor=True`` means one scale overall.
    Block formats (``nvfp4``, ``mxfp4``) fix their own group. ``scale_dtype`` is the storage dtype of
    float scales (ignored by the E4M3/E8M0-scaled formats). NaN or Inf in ``x`` raises ``UserError`` (a ``ValueError``)
    naming ``name``. Returns a :class:`QTensor` (it also unpacks as ``codes, scales, zero_points``).
    """
    return _entry(fmt).quantize(
        x,
        _entry(fmt).fmt,
        group_size=group_size,
        axis=axis,
        per_tensor=per_tensor,
        scale_dtype=scale_dtype,
        name=name,
    )


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes and scales back to values, shape ``qt.codes.shape``, in ``dtype``.

    Values past ``dtype``'s finite range saturate to it instead of becoming Inf: an asymmetric zero point
    rounds, so ``(qmax - z) * scale`` can exceed ``max(x)`` by half a step (past 65504 for a float16 ``x``),
    and ``qmax * (amax / qmax)`` can round past the float32 maximum.
    """
    out = _entry(qt.fmt).dequantize(qt, torch.float32)
    if dtype.is_floating_point and torch.finfo(dtype).max <= torch.finfo(torch.float32).max:
        fmax = torch.finfo(dtype).max
        out = out.clamp(-fmax, fmax)
    return out.to(dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: str | Format,
    group_size: int | None = None,
    axis: int = -1,
    *,
    per_tensor: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "x",
) -> torch.Tensor:
    """Quantize then dequantize: the values ``x`` takes in ``fmt``; same shape and dtype as ``x``."""
    qt = quantize(x, fmt, group_size=group_size, axis=axis, per_tensor=per_tensor, scale_dtype=scale_dtype, name=name)
    return dequantize(qt, x.dtype)


def fake_quantize_static(x: torch.Tensor, fmt_name: str, scale: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` with a given (calibrated) per-tensor ``scale`` (symmetric formats only), back in ``x.dtype``.

    The one implementation of static activation fake-quant: the layers (``vqsuite.nn.quantizers``) and the kernels'
    reference twin (``vqsuite.kernels.reference``) both call it, so they agree bit for bit by construction.
    """
    from vqsuite.formats.fp4 import decode_e2m1, encode_e2m1
    from vqsuite.formats.fp8 import FP8_DTYPES, cast_fp8_saturate

    fmt = get_format(fmt_name)
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)
    v = x.float() / s
    if fmt.kind == "int":
        q = torch.round(v).clamp(fmt.qmin, fmt.qmax)
    elif fmt_name in FP8_DTYPES:
        q = cast_fp8_saturate(v, FP8_DTYPES[fmt_name]).float()
    else:
        q = decode_e2m1(encode_e2m1(v))
    return (q * s).to(x.dtype)
