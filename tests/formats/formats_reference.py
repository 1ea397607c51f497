"""Independent reference implementations of the number formats, written from METHODS.md §6 (not from vqsuite).

Nothing here imports ``vqsuite``. Everything works on numpy arrays:

* minifloat values come from a bit-level decoder of every code (sign / exponent / mantissa fields);
* casts to a minifloat are brute force: the nearest finite value of the decoded table, a tie to the even
  code (mantissa LSB 0), magnitudes above the largest finite value saturate to it;
* INT uses ``np.rint`` (round half to even) on float32 arithmetic;
* NVFP4 and MXFP4 are a plain Python loop over blocks following the spec formulas literally.

Grouping convention (the one the spec and the library document): the grouped axis is moved last and viewed
as ``[..., K // G, G]``; ``per_tensor`` is one group of all elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32

# ----------------------------------------------------------------------------- bit-level minifloat decoding


def minifloat_value(code: int, exp_bits: int, man_bits: int, bias: int, special: str) -> float:
    """Value of one ``1 + exp_bits + man_bits``-bit code.

    ``special``: ``"none"`` (no Inf/NaN, E2M1), ``"fn"`` (only S.1..1.1..1 is NaN, E4M3 fn),
    ``"ieee"`` (all-ones exponent is Inf when the mantissa is 0, NaN otherwise, E5M2).
    """
    sign = -1.0 if (code >> (exp_bits + man_bits)) & 1 else 1.0
    e = (code >> man_bits) & ((1 << exp_bits) - 1)
    m = code & ((1 << man_bits) - 1)
    e_all_ones = e == (1 << exp_bits) - 1
    if special == "ieee" and e_all_ones:
        return sign * math.inf if m == 0 else math.nan
    if special == "fn" and e_all_ones and m == (1 << man_bits) - 1:
        return math.nan
    if e == 0:  # subnormal: 0.m * 2^(1 - bias)
        mag = (m / (1 << man_bits)) * 2.0 ** (1 - bias)
    else:  # normal: 1.m * 2^(e - bias)
        mag = (1.0 + m / (1 << man_bits)) * 2.0 ** (e - bias)
    return math.copysign(mag, sign)


def minifloat_table(exp_bits: int, man_bits: int, bias: int, special: str) -> np.ndarray:
    """float64 value of every code ``0 .. 2^(1+e+m) - 1``."""
    n = 1 << (1 + exp_bits + man_bits)
    return np.array([minifloat_value(c, exp_bits, man_bits, bias, special) for c in range(n)], dtype=np.float64)


E2M1_TABLE = minifloat_table(2, 1, 1, "none")  # 16 codes
E4M3_TABLE = minifloat_table(4, 3, 7, "fn")  # 256 codes, float8_e4m3fn
E5M2_TABLE = minifloat_table(5, 2, 15, "ieee")  # 256 codes, float8_e5m2
E2M1_SIGN_BIT = 0x8
FP8_SIGN_BIT = 0x80


@dataclass(frozen=True)
class MiniFloat:
    table: np.ndarray
    sign_bit: int

    @property
    def positive_codes(self) -> np.ndarray:
        half = len(self.table) // 2
        codes = np.arange(half)
        return codes[np.isfinite(self.table[:half])]

    @property
    def max(self) -> float:
        return float(self.table[self.positive_codes].max())


E2M1 = MiniFloat(E2M1_TABLE, E2M1_SIGN_BIT)
E4M3 = MiniFloat(E4M3_TABLE, FP8_SIGN_BIT)
E5M2 = MiniFloat(E5M2_TABLE, FP8_SIGN_BIT)


def round_to_minifloat(v: np.ndarray, fmt: MiniFloat, negative_zero: bool) -> np.ndarray:
    """Brute-force round-to-nearest-even with saturation: float values -> ``uint8`` codes.

    The sign bit is set for ``v < 0``, and also for ``-0.0`` when ``negative_zero`` (as a float cast does).
    """
    v = np.asarray(v, dtype=np.float64)
    flat = v.reshape(-1)
    codes = fmt.positive_codes
    mags = fmt.table[codes]
    a = np.minimum(np.abs(flat), fmt.max)  # saturation
    dist = np.abs(a[:, None] - mags[None, :])
    nearest = dist == dist.min(axis=1, keepdims=True)
    even = (codes % 2 == 0)[None, :]
    nearest_even = nearest & even
    pick = np.where(nearest_even.any(axis=1), nearest_even.argmax(axis=1), nearest.argmax(axis=1))
    out = codes[pick].astype(np.uint8)
    neg = np.signbit(flat) if negative_zero else flat < 0
    out = np.where(neg, out | fmt.sign_bit, out).astype(np.uint8)
    return out.reshape(v.shape)


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """E2M1 cast as the library documents it: sign kept for negative inputs (``-0.0`` itself gives code 0)."""
    return round_to_minifloat(v, E2M1, negative_zero=False)


# ----------------------------------------------------------------------------- grouping


def to_groups(x: np.ndarray, group_size: int | None, axis: int, per_tensor: bool) -> np.ndarray:
    """``x`` -> ``[..., K // G, G]`` float32 (grouped axis moved last), or ``[1, 1, numel]`` per tensor."""
    x = np.asarray(x, dtype=F32)
    if per_tensor:
        return x.reshape(1, 1, -1)
    xm = np.moveaxis(x, axis, -1)
    k = xm.shape[-1]
    g = k if group_size is None else group_size
    return xm.reshape(*xm.shape[:-1], k // g, g)


# ----------------------------------------------------------------------------- per-format references


@dataclass
class RefQuant:
    """Reference result in group layout ``[..., K // G, G]`` (codes, dequant) / ``[..., K // G]`` (scales)."""

    codes: np.ndarray  # uint8 bytes (int8 codes are stored as their two's complement byte)
    scales: np.ndarray  # float32 values, or uint8 bytes for E4M3 / E8M0 scales
    dequant: np.ndarray  # float32
    zero_points: np.ndarray | None = None
    tensor_scale: float | None = None


def ref_int(xg: np.ndarray, qmin: int, qmax: int, asymmetric: bool) -> RefQuant:
    """INT per group: symmetric ``scale = amax / qmax``; asymmetric ``scale = (max - min) / qmax`` with ``z``."""
    if asymmetric:
        lo = np.minimum(xg.min(axis=-1, keepdims=True), F32(0))
        hi = np.maximum(xg.max(axis=-1, keepdims=True), F32(0))
        with np.errstate(over="ignore"):
            span = hi - lo
        scale = np.where(np.isinf(span), hi / F32(qmax) - lo / F32(qmax), span / F32(qmax)).astype(F32)
        safe = np.where(scale == 0, F32(1), scale)
        zero = np.clip(np.rint(-lo / safe), qmin, qmax).astype(F32)
        q = np.clip(np.rint(xg / safe) + zero, qmin, qmax).astype(F32)
        q = np.where(scale == 0, F32(0), q)
        deq = ((q - zero) * scale).astype(F32)
        return RefQuant(q.astype(np.uint8), scale[..., 0], deq, zero[..., 0].astype(np.uint8))
    amax = np.abs(xg).max(axis=-1, keepdims=True)
    scale = (amax / F32(qmax)).astype(F32)
    safe = np.where(scale == 0, F32(1), scale)
    q = np.clip(np.rint(xg / safe), qmin, qmax).astype(F32)
    q = np.where(scale == 0, F32(0), q)
    deq = (q * scale).astype(F32)
    return RefQuant(q.astype(np.int8).view(np.uint8), scale[..., 0], deq)


def ref_fp8(xg: np.ndarray, fmt: MiniFloat) -> RefQuant:
    """FP8 per group: ``scale = amax / max``, RNE-with-saturation cast of ``x / scale``."""
    fmax = F32(fmt.max)
    amax = np.abs(xg).max(axis=-1, keepdims=True)
    scale = (amax / fmax).astype(F32)
    safe = np.where(scale == 0, F32(1), scale)
    v = np.where(scale == 0, F32(0), xg / safe).astype(F32)
    codes = round_to_minifloat(v, fmt, negative_zero=True)
    deq = (fmt.table[codes].astype(F32) * scale).astype(F32)
    return RefQuant(codes, scale[..., 0], deq)


def ref_fp4_e2m1(xg: np.ndarray) -> RefQuant:
    """Plain E2M1 per group with a float32 scale ``amax / 6``."""
    amax = np.abs(xg).max(axis=-1, keepdims=True)
    scale = (amax / F32(6)).astype(F32)
    safe = np.where(scale == 0, F32(1), scale)
    codes = np.where(scale == 0, np.uint8(0), e2m1_codes((xg / safe).astype(F32))).astype(np.uint8)
    deq = (E2M1_TABLE[codes].astype(F32) * scale).astype(F32)
    return RefQuant(codes, scale[..., 0], deq)


def ref_nvfp4(xg: np.ndarray) -> RefQuant:
    """NVFP4, block by block: ``s_t = amax / (6 * 448)``, ``s_b = E4M3(amax_b / (6 s_t))``,
    ``q = E2M1(x / (s_b s_t))``. A zero tensor scale (all-zero or underflowing tensor) means all-zero codes."""
    lead = xg.shape[:-1]
    blocks = xg.reshape(-1, xg.shape[-1])
    s_t = F32(np.abs(xg).max()) / F32(6 * 448)
    codes = np.zeros(blocks.shape, dtype=np.uint8)
    scale_bytes = np.zeros(len(blocks), dtype=np.uint8)
    deq = np.zeros(blocks.shape, dtype=F32)
    for i, blk in enumerate(blocks):
        if s_t == 0:
            continue
        t = F32(np.abs(blk).max()) / (F32(6) * s_t)
        sb_code = int(round_to_minifloat(np.array([t]), E4M3, negative_zero=False)[0])
        s_b = F32(E4M3_TABLE[sb_code])
        scale_bytes[i] = sb_code
        block_scale = F32(s_b * s_t)
        if block_scale == 0:
            continue
        codes[i] = e2m1_codes((blk / block_scale).astype(F32))
        deq[i] = (E2M1_TABLE[codes[i]].astype(F32) * block_scale).astype(F32)
    return RefQuant(
        codes.reshape(xg.shape),
        scale_bytes.reshape(lead),
        deq.reshape(xg.shape),
        tensor_scale=float(s_t) if s_t > 0 else None,
    )


MX_EMAX_E2M1 = 2
E8M0_BIAS = 127
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def mx_scale_exponent(amax: float) -> int:
    """OCP MX "FLOOR" rule: ``floor(log2 amax) - emax_elem``, clamped to the E8M0 range (log2 0 = -inf)."""
    if amax == 0:
        return E8M0_MIN_EXP
    _, ex = math.frexp(amax)  # amax = m 2^ex, m in [0.5, 1)  =>  floor(log2 amax) = ex - 1
    return max(E8M0_MIN_EXP, min(E8M0_MAX_EXP, ex - 1 - MX_EMAX_E2M1))


def ref_mxfp4(xg: np.ndarray) -> RefQuant:
    """MXFP4, block by block. ``V / X`` is a float32 division like the rest of the float32 pipeline: it is
    exact except where it underflows, and there only the sign of a zero code can depend on it."""
    lead = xg.shape[:-1]
    blocks = xg.reshape(-1, xg.shape[-1]).astype(F32)
    codes = np.zeros(blocks.shape, dtype=np.uint8)
    scale_bytes = np.zeros(len(blocks), dtype=np.uint8)
    deq = np.zeros(blocks.shape, dtype=np.float64)
    for i, blk in enumerate(blocks):
        e = mx_scale_exponent(float(np.abs(blk).max()))
        x_scale = 2.0**e
        scale_bytes[i] = e + E8M0_BIAS
        codes[i] = e2m1_codes((blk / F32(x_scale)).astype(F32))
        deq[i] = E2M1_TABLE[codes[i]] * x_scale
    return RefQuant(codes.reshape(xg.shape), scale_bytes.reshape(lead), deq.reshape(xg.shape).astype(F32))


# name -> (smallest code, largest code, asymmetric)
INT_RANGES = {
    "int8": (-128, 127, False),
    "int8_asym": (0, 255, True),
    "int4": (-8, 7, False),
    "int4_asym": (0, 15, True),
}
BLOCK_SIZES = {"nvfp4": 16, "mxfp4": 32}


def reference_quantize(
    x: np.ndarray, fmt: str, group_size: int | None = None, axis: int = -1, per_tensor: bool = False
) -> RefQuant:
    """Quantize float32 ``x`` to ``fmt`` with the reference implementations (float32 scales)."""
    if fmt in BLOCK_SIZES:
        group_size = BLOCK_SIZES[fmt]
    xg = to_groups(x, group_size, axis, per_tensor)
    if fmt in INT_RANGES:
        return ref_int(xg, *INT_RANGES[fmt])
    if fmt == "fp8_e4m3":
        return ref_fp8(xg, E4M3)
    if fmt == "fp8_e5m2":
        return ref_fp8(xg, E5M2)
    if fmt == "fp4_e2m1":
        return ref_fp4_e2m1(xg)
    if fmt == "nvfp4":
        return ref_nvfp4(xg)
    if fmt == "mxfp4":
        return ref_mxfp4(xg)
    raise KeyError(fmt)
