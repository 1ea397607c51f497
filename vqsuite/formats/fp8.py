"""FP8 formats through torch's own float8 dtypes (OCP FP8).

E4M3 (``float8_e4m3fn``): bias 7, max 448, no Inf. E5M2 (``float8_e5m2``): bias 15, max 57344.
``scale = amax / max``; ``codes = fp8(clamp(x / scale, -max, max))`` with round-to-nearest-even.
Values beyond the range saturate (the clamp runs before the cast: torch's E5M2 cast would give Inf).
A group whose stored scale is 0 (all zeros, or a scale below its dtype's range) gets codes 0.
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

FP8_DTYPES: dict[str, torch.dtype] = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cast_fp8_saturate(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest-even cast of a float32 tensor to an FP8 dtype, saturating at its max."""
    fmax = torch.finfo(dtype).max
    return v.clamp(-fmax, fmax).to(dtype)


def quantize_fp8(
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
    dtype = FP8_DTYPES[fmt.name]
    xg = to_groups(x, group_size, axis, per_tensor, name)
    scale = store_scales(xg.abs().amax(dim=-1, keepdim=True) / fmt.qmax, scale_dtype, name)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = cast_fp8_saturate(torch.where(scale == 0, torch.zeros_like(xg), xg / safe), dtype)
    return QTensor(
        codes=from_groups(codes, x.shape, axis, per_tensor),
        scales=group_scales_shape(scale, per_tensor).to(scale_dtype),
        fmt=fmt.name,
        group_size=group_size,
        axis=axis,
        per_tensor=per_tensor,
    )


def dequantize_fp8(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cg = to_groups(qt.codes, qt.group_size, qt.axis, qt.per_tensor, "codes")
    out = cg * expand_scales(qt.scales.float(), qt.per_tensor)
    return from_groups(out, qt.codes.shape, qt.axis, qt.per_tensor).to(dtype)


FP8_E4M3 = Format("fp8_e4m3", 8, "float", -448.0, 448.0, description="OCP FP8 E4M3 (fn), max 448")
FP8_E5M2 = Format("fp8_e5m2", 8, "float", -57344.0, 57344.0, description="OCP FP8 E5M2, max 57344")

for _f in (FP8_E4M3, FP8_E5M2):
    register_format(_f, quantize_fp8, dequantize_fp8)
