"""FP4 E2M1 and the two block-scaled FP4 formats, NVFP4 and MXFP4.

E2M1: 1 sign, 2 exponent, 1 mantissa bit, bias 1, no Inf/NaN. Magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6};
the 4-bit code is the bit pattern ``s e1 e0 m`` so code ``i`` (0..7) is the i-th magnitude and ``i | 8`` its
negative. Casting rounds to nearest, ties to the even code, and saturates at 6. A negative input that
rounds to zero keeps its sign (code 8, -0.0), like torch's own float casts.

NVFP4: E2M1 in blocks of 16 along K, E4M3 block scales, one FP32 tensor scale:
``s_t = amax(x) / (6 * 448)``, ``s_b = E4M3(amax_b / (6 * s_t))``, ``q = E2M1(x / (s_b * s_t))``,
``x^ = q * (s_b * s_t)``. A block whose E4M3 scale is 0 (all zeros, or ``amax_b / (6 s_t)`` below the
smallest E4M3 subnormal) gets codes 0, as does any group whose scale is 0.

MXFP4 (OCP MX v1.0): E2M1 in blocks of 32 with an E8M0 power-of-two scale
``X = 2^(floor(log2 amax_b) - 2)`` (exponent clamped to [-127, 127]; 0xFF, NaN, is never produced),
``q = E2M1(x / X)``; values whose ``|x| / X`` exceeds 6 saturate, as the spec says.
"""

from __future__ import annotations

import torch

from vqsuite.errors import ConfigError
from vqsuite.formats.base import Format, QTensor, register_format
from vqsuite.formats.fp8 import cast_fp8_saturate
from vqsuite.formats.grouping import (
    check_finite,
    expand_scales,
    from_groups,
    group_scales_shape,
    resolve_group_size,
    store_scales,
    to_groups,
)

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between consecutive magnitudes; a tie goes to the even code (the lower one when it is even)
_E2M1_MIDPOINTS: tuple[float, ...] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127


def e2m1_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """``[16]`` float32: the value of each 4-bit E2M1 code (code 8 is -0.0)."""
    pos = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([pos, -pos])


def encode_e2m1(v: torch.Tensor) -> torch.Tensor:
    """float32 values (already divided by their scale) -> ``uint8`` E2M1 codes in [0, 15], RNE, saturating."""
    mag = v.abs()
    idx = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for j, mid in enumerate(_E2M1_MIDPOINTS):
        # boundary j separates code j and j+1: a tie belongs to whichever of the two is even
        passed = mag > mid if j % 2 == 0 else mag >= mid
        idx += passed.to(torch.uint8)
    return idx | ((v < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``uint8`` codes (any shape, values 0..15) -> float32 values."""
    return e2m1_lut(codes.device)[codes.long()]


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0 ** e`` in float32 for integer ``e`` in [-149, 127] (built from the bit pattern)."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=1) << 23
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def _prepare(x, fmt, group_size, axis, per_tensor, name):
    check_finite(x, name)
    if per_tensor and fmt.block_size is not None:
        raise ConfigError(f"{fmt.name} is a block format (blocks of {fmt.block_size}); per_tensor=True does not apply")
    group_size = resolve_group_size(fmt.block_size, group_size, fmt.name)
    return group_size, to_groups(x, group_size, axis, per_tensor, name)


def quantize_fp4(
    x: torch.Tensor,
    fmt: Format,
    *,
    group_size: int | None = None,
    axis: int = -1,
    per_tensor: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "x",
) -> QTensor:
    group_size, xg = _prepare(x, fmt, group_size, axis, per_tensor, name)
    amax = xg.abs().amax(dim=-1, keepdim=True)
    tensor_scale = None
    if fmt.name == "nvfp4":
        s_t = _safe(amax.amax() / (E2M1_MAX * E4M3_MAX))
        s_b = cast_fp8_saturate(amax / (E2M1_MAX * s_t), torch.float8_e4m3fn)
        block = s_b.float() * s_t
        stored = s_b
        tensor_scale = s_t.reshape(())
    elif fmt.name == "mxfp4":
        _, ex = torch.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
        e = torch.where(amax > 0, ex - 1 - 2, torch.full_like(ex, E8M0_MIN_EXP)).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
        block = pow2(e)
        stored = (e + E8M0_BIAS).to(torch.uint8)
    else:  # plain E2M1 with a float scale
        block = store_scales(amax / E2M1_MAX, scale_dtype, name)
        stored = block.to(scale_dtype)
    # a zero scale means zero codes, not the codes of x / 1
    codes = torch.where(block == 0, 0, encode_e2m1(xg / _safe(block)))
    return QTensor(
        codes=from_groups(codes, x.shape, axis, per_tensor),
        scales=group_scales_shape(stored, per_tensor),
        fmt=fmt.name,
        group_size=group_size,
        axis=axis,
        per_tensor=per_tensor,
        tensor_scale=tensor_scale,
    )


def block_scales_fp32(qt: QTensor) -> torch.Tensor:
    """The effective float32 multiplier of each group, shaped like ``qt.scales``."""
    if qt.fmt == "nvfp4":
        return qt.scales.float() * qt.tensor_scale.float()
    if qt.fmt == "mxfp4":
        return pow2(qt.scales.to(torch.int32) - E8M0_BIAS)
    return qt.scales.float()


def dequantize_fp4(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cg = to_groups(qt.codes, qt.group_size, qt.axis, qt.per_tensor, "codes").to(torch.uint8)
    out = decode_e2m1(cg) * expand_scales(block_scales_fp32(qt), qt.per_tensor)
    return from_groups(out, qt.codes.shape, qt.axis, qt.per_tensor).to(dtype)


FP4_E2M1 = Format("fp4_e2m1", 4, "float", -6.0, 6.0, description="FP4 E2M1 with a float scale = amax/6")
NVFP4 = Format(
    "nvfp4",
    4,
    "float",
    -6.0,
    6.0,
    block_size=16,
    scale_kind="e4m3",
    tensor_scale=True,
    description="E2M1, blocks of 16, E4M3 block scales, FP32 tensor scale",
)
MXFP4 = Format(
    "mxfp4",
    4,
    "float",
    -6.0,
    6.0,
    block_size=32,
    scale_kind="e8m0",
    description="E2M1, blocks of 32, E8M0 power-of-two scales (OCP MX)",
)

for _f in (FP4_E2M1, NVFP4, MXFP4):
    register_format(_f, quantize_fp4, dequantize_fp4)
