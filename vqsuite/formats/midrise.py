"""Mid-rise integer formats ``int{b}_midrise`` (b = 2..8): b-bit signed codes whose levels sit between the integers.

Code ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` means ``(q + ½) · scale``: the 2^b levels ``±½, ±3/2, …, ±(2^(b-1) - ½)``
are symmetric about zero and hold no zero level. This is OFQ's StatsQ grid (``s · (k + ½) / n``, ``n = 2^(b-1)``,
:func:`vqsuite.finetune.ofq.statsq_quantize`) with ``scale = s / n``: since ``n`` is a power of two,
``(q + ½) · (s / n)`` equals StatsQ's ``s · (q + ½) / n`` bit for bit (no rounding is added by the division).

Storage is that of the plain integer formats of the same width (:attr:`Format.storage_bits`): the codes are int8
two's complement, packed two per byte (:func:`vqsuite.formats.pack_4bit`) for b <= 4, one byte for 5..8. The
format's :attr:`Format.offset` is ``0.5``: kernels that compute ``q · scale`` (the CPU int4pack/int8pack family)
decline it and the reference runs. Weights only (a mid-rise activation grid cannot hold an exact zero).

Round-to-nearest quantization (``quantize``): ``scale = amax / (2^(b-1) - ½)`` per group (the outer levels land on
``±amax``), ``q = clamp(round_half_even(x / scale - ½), qmin, qmax)``. An all-zero group gets ``scale = 0`` (codes
``0``, dequantized to exact zeros).
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

#: the level offset of every mid-rise format: code ``q`` sits at ``q + MIDRISE_OFFSET`` steps
MIDRISE_OFFSET = 0.5
#: widths with a registered mid-rise format
MIDRISE_BITS = (2, 3, 4, 5, 6, 7, 8)


def midrise_format_name(bits: int) -> str:
    """``"int{bits}_midrise"``."""
    return f"int{int(bits)}_midrise"


def quantize_midrise(
    x: torch.Tensor,
    fmt: Format,
    *,
    group_size: int | None = None,
    axis: int = -1,
    per_tensor: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "x",
) -> QTensor:
    """Round-to-nearest onto the mid-rise grid; codes int8 ``[qmin, qmax]``, scales float (see the module doc)."""
    check_finite(x, name)
    group_size = resolve_group_size(fmt.block_size, group_size, fmt.name)
    xg = to_groups(x, group_size, axis, per_tensor, name)
    amax = xg.abs().amax(dim=-1, keepdim=True)
    scale = store_scales(amax / (fmt.qmax + fmt.offset), scale_dtype, name)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(xg / safe - fmt.offset).clamp(fmt.qmin, fmt.qmax).to(torch.int8)
    return QTensor(
        codes=from_groups(codes, x.shape, axis, per_tensor),
        scales=group_scales_shape(scale, per_tensor).to(scale_dtype),
        fmt=fmt.name,
        group_size=group_size,
        axis=axis,
        per_tensor=per_tensor,
    )


def dequantize_midrise(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q + ½) · scale`` per group, shape ``qt.codes.shape``."""
    cg = to_groups(qt.codes, qt.group_size, qt.axis, qt.per_tensor, "codes")
    scale = expand_scales(qt.scales.float(), qt.per_tensor)
    return from_groups((cg + MIDRISE_OFFSET) * scale, qt.codes.shape, qt.axis, qt.per_tensor).to(dtype)


MIDRISE_FORMATS: dict[int, Format] = {
    b: Format(
        midrise_format_name(b),
        b,
        "int",
        -(2 ** (b - 1)),
        2 ** (b - 1) - 1,
        offset=MIDRISE_OFFSET,
        description=f"mid-rise INT{b}: code q means (q + 1/2)*scale, {2**b} levels, no zero (OFQ StatsQ weights)",
    )
    for b in MIDRISE_BITS
}

for _f in MIDRISE_FORMATS.values():
    register_format(_f, quantize_midrise, dequantize_midrise)
