"""Format-agnostic entry points: quantize, dequantize and fake_quantize by format name."""

from __future__ import annotations

import torch

from vqsuite.formats.base import Format, QTensor, _entry


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
