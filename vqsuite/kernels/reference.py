"""Plain-PyTorch reference kernels: the twins every fast path is tested against.

Weight storage (frozen layers), for a GEMM weight ``[N, K]`` with groups of ``G`` along K:
    qweight: ``[N, K/2]`` uint8 (two codes of <= 4 bits per byte) | ``[N, K]`` int8/uint8 | ``[N, K]`` float8
    wscales: ``[N, K/G]`` (``G = K`` per channel) float, float8_e4m3fn (NVFP4) or uint8 E8M0 (MXFP4)
    wzeros:  ``[N, K/G]`` uint8, asymmetric integer formats only
    wtscale: ``[]`` float32, NVFP4 only
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vqsuite.config import QuantSpec
from vqsuite.formats import QTensor, dequantize, get_format, unpack_4bit
from vqsuite.kernels.operands import QLinearOperands, as_operands


def unpack_weight_codes(qweight: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Stored ``qweight`` -> unpacked codes ``[N, K]`` in the dtype :func:`vqsuite.formats.quantize` gives."""
    fmt = get_format(fmt_name)
    if fmt.storage_bits == 4:  # int2/int3/int4/fp4 share the two-per-byte container
        return unpack_4bit(qweight, signed=fmt.kind == "int" and not fmt.asymmetric)
    return qweight


def stored_qtensor(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    spec: QuantSpec,
    *,
    wzeros: torch.Tensor | None = None,
    wtscale: torch.Tensor | None = None,
) -> QTensor:
    """Frozen storage -> the :class:`QTensor` it holds (codes ``[N, K]`` unpacked, grouped along K)."""
    return QTensor(
        codes=unpack_weight_codes(qweight, spec.weight),
        scales=wscales,
        fmt=spec.weight,
        group_size=spec.weight_group_size,
        axis=-1,
        per_tensor=False,
        zero_points=wzeros,
        tensor_scale=wtscale,
    )


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
    return dequantize(stored_qtensor(qweight, wscales, spec, wzeros=wzeros, wtscale=wtscale), dtype)


def static_act_scale(layer) -> torch.Tensor | None:
    """The static activation scale this forward uses (0-d), or ``None`` (dynamic, observing, or none).

    Every frozen layer resolves its static scale through this one function when it builds its
    :class:`~vqsuite.kernels.operands.QLinearOperands`, so a layer whose scale depends on the denoising step
    resolves it in one place and kernels only ever see the resolved 0-d tensor (``operands.act_scale``).
    """
    if layer.act_observing:
        return None
    return getattr(layer, "act_scale", None)


def ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Forward ``xq``, backward identity (the same straight-through form as ``vqsuite.nn.quantizers.ste``)."""
    if x.requires_grad:
        return x + (xq - x).detach()
    return xq


def fake_quantize_input(x: torch.Tensor, ops: QLinearOperands) -> torch.Tensor:
    """Activation fake-quant of a frozen layer's input ``x [..., K]`` as ``ops`` says (groups along K); STE.
    An empty batch (no rows) is returned as is: nothing to quantize."""
    from vqsuite.formats import fake_quantize

    if ops.act is None or ops.act_mode == "none" or x.numel() == 0:
        return x
    xd = x.detach()
    if ops.act_mode == "static":
        s = ops.act_scale
        if s is None or not bool(torch.isfinite(s).all()):
            raise RuntimeError(f"{ops.name}.input: static activation scale is not calibrated; quantize with calib_data")
        from vqsuite.formats.api import fake_quantize_static

        xq = fake_quantize_static(xd, ops.act, s)
    else:
        group = ops.act_group_size if ops.act_mode == "dynamic_per_group" else None
        xq = fake_quantize(xd, ops.act, group, -1, name=f"{ops.name}.input")
    return ste(x, xq)


def operands_weight(ops: QLinearOperands, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized weight ``[N, K]`` in ``dtype`` from a record's stored codes."""
    qt = QTensor(
        codes=unpack_weight_codes(ops.qweight, ops.weight),
        scales=ops.wscales,
        fmt=ops.weight,
        group_size=ops.weight_group_size,
        axis=-1,
        per_tensor=False,
        zero_points=ops.wzeros,
        tensor_scale=ops.wtscale,
    )
    return dequantize(qt, dtype)


def qlinear(x: torch.Tensor, ops: QLinearOperands) -> torch.Tensor:
    """Reference forward of a frozen ``QLinear``/``QLinearLowRank``: ``x [..., K] -> [..., N]`` in x.dtype.

    ``ops``: the layer's :class:`~vqsuite.kernels.operands.QLinearOperands` (a frozen layer is accepted too, for
    callers that hold one). The weight is dequantized from its stored codes on every call.
    """
    ops = as_operands(ops)
    return linear_with_weight(
        x,
        operands_weight(ops, x.dtype),
        ops.bias,
        lambda t: fake_quantize_input(t, ops),
        smooth=ops.smooth,
        proj_down=ops.proj_down,
        proj_up=ops.proj_up,
    )


def linear_with_weight(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act_quantizer: Callable[[torch.Tensor], torch.Tensor],
    *,
    smooth: torch.Tensor | None = None,
    proj_down: torch.Tensor | None = None,
    proj_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference quantized linear: ``y = Q(x/λ) @ W^T + (x/λ) @ proj_down @ proj_up^T + bias``.

    x: ``[..., K]``; weight: ``[N, K]`` already (de)quantized in ``x.dtype``; ``act_quantizer`` is ``Q`` (the
    layer's :meth:`~vqsuite.nn.QuantLayer.quantize_input`); proj_down ``[K, r]``; proj_up ``[N, r]``; smooth
    ``[K]``. Returns ``[..., N]`` in ``x.dtype``.
    """
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    xq = act_quantizer(x)
    y = F.linear(xq, weight, None if bias is None else bias.to(x.dtype))
    if proj_down is not None and proj_up is not None:
        y = y + (x @ proj_down.to(x.dtype)) @ proj_up.to(x.dtype).t()
    return y


def gemm_w4a16_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    spec: QuantSpec,
    *,
    wzeros: torch.Tensor | None = None,
    wtscale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    proj_down: torch.Tensor | None = None,
    proj_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of the Triton W4A16 GEMM (``vqsuite.kernels.triton.w4a16``): the same math, plain torch.

    ``xs = x / λ`` rounded to x's dtype; ``W`` dequantized in fp32 and rounded to x's dtype; ``t = xs @ proj_down``
    in x's dtype; then one fp32 accumulator ``xs @ W^T + t @ proj_up^T + bias`` (16-bit operands, exact products),
    rounded once to x's dtype. Only the fp32 summation order differs from the kernel.

    x: ``[..., K]`` fp16/bf16; qweight ``[N, K/2]`` uint8; wscales ``[N, K/G]``; smooth ``[K]``;
    proj_down ``[K, r]``; proj_up ``[N, r]``; bias ``[N]``. Returns ``[..., N]`` in x's dtype.
    """
    dt = x.dtype
    xs = x / smooth.to(dt) if smooth is not None else x
    w = dequantize_weight(qweight, wscales, spec, wzeros=wzeros, wtscale=wtscale, dtype=dt)
    acc = xs.float() @ w.float().t()
    if proj_down is not None and proj_up is not None and proj_down.shape[-1] > 0:
        t = xs @ proj_down.to(dt)
        acc = acc + t.float() @ proj_up.to(dt).float().t()
    if bias is not None:
        acc = acc + bias.to(dt).float()
    return acc.to(dt)


# ---------------------------------------------------------------------- twins of the 8-bit-MMA family (mma8)
#: largest magnitude of an E2M1 value times the largest E4M3 block scale (the NVFP4 tensor-scale divisor)
_NVFP4_TENSOR_DIVISOR = 6.0 * 448.0


def act_quant_lowrank_reference(
    x: torch.Tensor,
    *,
    act: str,
    act_mode: str,
    group_size: int | None = None,
    static_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    proj_down: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Twin of ``vqsuite.kernels.triton.act_quant.act_quant_lowrank``: the same codes, scales and branch input.

    ``xs = x / λ`` rounded to x's dtype; codes and scales are :func:`vqsuite.formats.quantize`'s (dynamic modes)
    or ``fake_quantize_static``'s (static mode), in the layout the 8-bit GEMM reads:
        codes ``[M, K]``: int8 (int8/int4) or float8_e4m3fn (fp8_e4m3; NVFP4's E2M1 values, exact in E4M3)
        scales ``[M, K/GA]`` float32 (``GA = K`` per token and static; NVFP4: the block multiplier ``s_b * s_t``)
        lowrank ``[M, r]`` in x's dtype: ``xs @ proj_down`` accumulated in fp32, rounded once; ``None`` if no branch
    x: ``[M, K]`` fp16/bf16/fp32; smooth ``[K]``; proj_down ``[K, r]``; static_scale 0-d.
    """
    from vqsuite.formats import quantize
    from vqsuite.formats.fp4 import decode_e2m1
    from vqsuite.formats.fp8 import cast_fp8_saturate

    dt = x.dtype
    xs = x / smooth.to(dt) if smooth is not None else x
    lowrank = None
    if proj_down is not None and proj_down.shape[-1] > 0:
        lowrank = (xs.float() @ proj_down.to(dt).float()).to(dt)
    fmt = get_format(act)
    if act_mode == "static":
        s = static_scale.float().clamp(min=torch.finfo(torch.float32).tiny)
        v = xs.float() / s
        if fmt.kind == "int":
            codes = torch.round(v).clamp(fmt.qmin, fmt.qmax).to(torch.int8)
        else:
            codes = cast_fp8_saturate(v, torch.float8_e4m3fn)
        scales = s.reshape(1, 1).expand(x.shape[0], 1).contiguous()
        return codes, scales, lowrank
    group = group_size if act_mode == "dynamic_per_group" else None
    qt = quantize(xs, act, group_size=group, axis=-1)
    if act == "nvfp4":
        codes = decode_e2m1(qt.codes).to(torch.float8_e4m3fn)
        scales = qt.scales.float() * qt.tensor_scale.float()
    else:
        codes, scales = qt.codes, qt.scales.float()
    return codes, scales.reshape(x.shape[0], -1), lowrank


def _weight_operand(qweight: torch.Tensor, weight_fmt: str) -> torch.Tensor:
    """Stored codes -> the GEMM's B operand ``[N, K]``: int64 (int8/int4) or float32 values (fp8, E2M1)."""
    from vqsuite.formats.fp4 import decode_e2m1

    codes = unpack_weight_codes(qweight, weight_fmt)
    if weight_fmt == "nvfp4":
        return decode_e2m1(codes)
    return codes.long() if get_format(weight_fmt).kind == "int" else codes.float()


def gemm_mma8_reference(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    *,
    weight_fmt: str,
    weight_group_size: int | None,
    wtscale: torch.Tensor | None = None,
    lowrank: torch.Tensor | None = None,
    proj_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    raw_int32: bool = False,
) -> torch.Tensor:
    """Twin of ``vqsuite.kernels.triton.mma8.gemm_mma8``: 8-bit products, exact per-group accumulation, fp32 rescale.

    ``GA = K / a_scales.shape[1]`` and ``GW = weight_group_size or K``. Both per-token/per-channel: one exact
    accumulator over K (int32 for integer codes), then ``acc * sa[m] * sw[n]``. Otherwise ``GK = min(GA, GW)``:
    for each K-group ``g`` in order ``acc += dot_g * (sa[m, g] * sw[n, g])`` (the grouped scales only), then the
    per-token/per-channel scales, then the NVFP4 weight tensor scale. Then ``acc += lowrank @ proj_up^T``
    (x-dtype operands, fp32 accumulation), ``+ bias``, one rounding to ``out_dtype``.
    ``raw_int32`` (integer codes, ungrouped only): return the int32 accumulator ``[M, N]`` instead.

    a_codes ``[M, K]`` int8/float8_e4m3fn; a_scales ``[M, K/GA]`` fp32; qweight/wscales as stored by frozen layers;
    lowrank ``[M, r]``; proj_up ``[N, r]``; bias ``[N]``. Returns ``[M, N]`` in ``out_dtype``.
    """
    M, K = a_codes.shape
    w = _weight_operand(qweight, weight_fmt)
    is_int = w.dtype == torch.int64
    a = a_codes.long() if is_int else a_codes.float()
    ga = K // a_scales.shape[1]
    gw = weight_group_size or K
    sa = a_scales.float()
    sw = wscales.float()
    if ga == K and gw == K:
        acc = a @ w.t()
        if raw_int32:
            return acc.to(torch.int32)
        acc = acc.float() * sa[:, :1] * sw[:, :1].t()
    else:
        if raw_int32:
            raise ValueError("raw_int32 applies to per-token x per-channel scales only")
        gk = min(ga, gw)
        acc = torch.zeros(M, w.shape[0], dtype=torch.float32, device=a.device)
        for g in range(K // gk):
            sl = slice(g * gk, (g + 1) * gk)
            part = (a[:, sl] @ w[:, sl].t()).float()
            fa = sa[:, (g * gk) // ga][:, None] if ga < K else 1.0
            fw = sw[:, (g * gk) // gw][None, :] if gw < K else 1.0
            acc = acc + part * (fa * fw)
        if ga == K:
            acc = acc * sa[:, :1]
        if gw == K:
            acc = acc * sw[:, :1].t()
    if wtscale is not None:
        acc = acc * wtscale.float()
    if lowrank is not None and proj_up is not None and lowrank.shape[-1] > 0:
        dt = lowrank.dtype
        acc = acc + lowrank.float() @ proj_up.to(dt).float().t()
    if bias is not None:
        acc = acc + bias.to(out_dtype).float()
    return acc.to(out_dtype)
