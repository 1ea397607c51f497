"""Integer formats: INT8, INT6, INT4, INT3, INT2 symmetric (signed codes), INT8/INT4 asymmetric (unsigned codes +
zero point).

Symmetric: ``scale = amax / qmax`` with ``qmax = 2^(b-1) - 1`` as in deepcompressor (127 for INT8, 31 for INT6,
7 for INT4, 3 for INT3, 1 for INT2); ``qmin = -2^(b-1)`` is representable but never produced by the symmetric
rounding (``|x / scale| <= qmax``), so INT2 in practice uses the codes {-1, 0, 1}.
``q = clamp(round_half_even(x / scale), qmin, qmax)``.
Storage (:attr:`Format.storage_bits`): INT2/INT3 codes are int8 after :func:`quantize` and are packed two per byte
in the 4-bit container (:func:`vqsuite.formats.pack_4bit`) when a layer freezes; INT6 codes take one int8 byte.
Asymmetric: the range is widened to include 0, ``scale = (max - min) / (2^b - 1)``,
``z = round(-min / scale)``, ``q = clamp(round(x / scale) + z, 0, 2^b - 1)``; ``x^ = (q - z) * scale``.
An all-zero group gets ``scale = 0`` and codes 0 (no division by zero; it dequantizes to exact zeros).
A group spanning more than the float32 range (``max - min`` overflows) takes ``max/qmax - min/qmax`` instead.
"""

from __future__ import annotations

import torch

from vqsuite.formats.base import Format, QTensor, register_format
from vqsuite.formats.grouping import (
    check_finite,
    expand_scales,
    from_groups,
    group_scales_shape,
    resolve_group_size,
    store_scales,
    to_groups,
)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_int(
    x: torch.Tensor,
    fmt: Format,
    *,
    group_size: int | None = None,
    axis: int = -1,
    per_tensor: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "x",
) -> QTensor:
    check_finite(x, name)
    group_size = resolve_group_size(fmt.block_size, group_size, fmt.name)
    xg = to_groups(x, group_size, axis, per_tensor, name)
    if fmt.asymmetric:
        lo = xg.amin(dim=-1, keepdim=True).clamp(max=0.0)
        hi = xg.amax(dim=-1, keepdim=True).clamp(min=0.0)
        span = hi - lo
        # hi - lo overflows float32 for a group spanning nearly +-3.4e38; dividing each end first does not
        scale = torch.where(torch.isinf(span), hi / fmt.qmax - lo / fmt.qmax, span / fmt.qmax)
        # the stored (possibly 16-bit) scale is the one used to divide, so dequantization inverts exactly it
        scale = store_scales(scale, scale_dtype, name)
        zero = torch.round(-lo / _safe(scale)).clamp(fmt.qmin, fmt.qmax)
        q = (torch.round(xg / _safe(scale)) + zero).clamp(fmt.qmin, fmt.qmax)
        codes = q.to(torch.uint8)
        zeros = group_scales_shape(zero, per_tensor).to(torch.uint8)
    else:
        amax = xg.abs().amax(dim=-1, keepdim=True)
        scale = store_scales(amax / fmt.qmax, scale_dtype, name)
        q = torch.round(xg / _safe(scale)).clamp(fmt.qmin, fmt.qmax)
        codes = q.to(torch.int8)
        zeros = None
    return QTensor(
        codes=from_groups(codes, x.shape, axis, per_tensor),
        scales=group_scales_shape(scale, per_tensor).to(scale_dtype),
        fmt=fmt.name,
        group_size=group_size,
        axis=axis,
        per_tensor=per_tensor,
        zero_points=zeros,
    )


def dequantize_int(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cg = to_groups(qt.codes, qt.group_size, qt.axis, qt.per_tensor, "codes")
    scale = expand_scales(qt.scales.float(), qt.per_tensor)
    if qt.zero_points is not None:
        cg = cg - expand_scales(qt.zero_points.float(), qt.per_tensor)
    return from_groups(cg * scale, qt.codes.shape, qt.axis, qt.per_tensor).to(dtype)


INT8 = Format("int8", 8, "int", -128, 127, description="signed INT8, scale = amax/127")
INT8_ASYM = Format("int8_asym", 8, "int", 0, 255, asymmetric=True, description="unsigned INT8 with zero point")
INT4 = Format("int4", 4, "int", -8, 7, description="signed INT4 [-8, 7], scale = amax/7")
INT4_ASYM = Format("int4_asym", 4, "int", 0, 15, asymmetric=True, description="unsigned INT4 [0, 15] with zero point")
INT6 = Format("int6", 6, "int", -32, 31, description="signed INT6 [-32, 31], scale = amax/31, stored in int8 bytes")
INT3 = Format("int3", 3, "int", -4, 3, description="signed INT3 [-4, 3], scale = amax/3, stored packed as 4-bit")
INT2 = Format("int2", 2, "int", -2, 1, description="signed INT2 [-2, 1], scale = amax/1, stored packed as 4-bit")

for _f in (INT8, INT8_ASYM, INT4, INT4_ASYM, INT6, INT3, INT2):
    register_format(_f, quantize_int, dequantize_int)
