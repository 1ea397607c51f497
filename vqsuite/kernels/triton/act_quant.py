"""Activation stage (Triton): smoothing, activation quantization and the low-rank down-projection in one kernel.

For ``x [M, K]`` one program owns ``BM`` rows and walks K once, computing ``x̂ = x / λ`` (rounded to ``x.dtype``,
as the reference does), the codes the 8-bit GEMM reads, their scales, and ``lr = x̂ @ proj_down`` (fp32
accumulation, rounded to ``x.dtype``) from the same loaded tile. Per-token modes need the row's absolute maximum
before the first code, so they walk K twice in the same program: the first walk (amax + down-projection) reads
HBM, the second (codes) re-reads the same rows, mostly from L2. NVFP4's FP32 tensor scale is a reduction over the
whole tensor, so NVFP4 runs a row-amax pre-pass first (one extra read of x).

Output layout (what :mod:`vqsuite.kernels.triton.mma8` reads):
    codes:  ``[M, K]`` int8 (INT8/INT4 codes, unpacked) or float8_e4m3fn (FP8 codes; NVFP4's E2M1 values, which
            E4M3 holds exactly, so the GEMM feeds them straight to an FP8 MMA)
    scales: ``[M, K/GA]`` float32; ``GA = K`` for per-token and static modes (a static scale is repeated per row),
            the NVFP4 entry is the effective block multiplier ``s_b * s_t``
    lr:     ``[M, r]`` in ``x.dtype``, or ``None`` when there is no low-rank branch

The twin that computes exactly the same codes and scales is
:func:`vqsuite.kernels.reference.act_quant_lowrank_reference`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

#: activation quantization kinds the kernel implements
KIND_INT, KIND_FP8, KIND_NVFP4 = 0, 1, 2
#: how activation scales are chosen
MODE_PER_TOKEN, MODE_PER_GROUP, MODE_STATIC = 0, 1, 2
#: the largest rank the fused down-projection takes (it lives in registers next to the tile)
MAX_RANK = 128
#: 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude < 2^22 to an integer, ties to even
_RNE_MAGIC = tl.constexpr(12582912.0)
_E4M3_MAX = 448.0
_E2M1_MAX = 6.0


class QuantizedActs(NamedTuple):
    """What the activation stage hands the GEMM (see the module docstring for shapes)."""

    codes: torch.Tensor
    scales: torch.Tensor
    lowrank: torch.Tensor | None


def act_kind(fmt_name: str) -> int:
    """Format name -> kernel kind; ``ValueError`` for formats the stage does not implement."""
    kinds = {"int8": KIND_INT, "int4": KIND_INT, "fp8_e4m3": KIND_FP8, "nvfp4": KIND_NVFP4}
    if fmt_name not in kinds:
        raise ValueError(f"act={fmt_name!r} is not implemented by the Triton activation stage; use {sorted(kinds)}")
    return kinds[fmt_name]


def act_qmax(fmt_name: str) -> float:
    return {"int8": 127.0, "int4": 7.0, "fp8_e4m3": _E4M3_MAX, "nvfp4": _E2M1_MAX}[fmt_name]


def _act_quant_body(
    x_ptr,
    lam_ptr,
    pd_ptr,
    codes_ptr,
    scales_ptr,
    lr_ptr,
    stat_ptr,
    M,
    K,
    R,
    stride_xm,
    stride_pk,
    stride_cm,
    stride_sm,
    stride_lm,
    HAS_SMOOTH: tl.constexpr,
    RB: tl.constexpr,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    QMAX: tl.constexpr,
    GROUP: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    AMAX_ONLY: tl.constexpr,
    X_BF16: tl.constexpr,
):
    """One program: rows ``[pid*BM, pid*BM + BM)``. ``stat_ptr``: the static scale (MODE_STATIC) or the NVFP4
    tensor scale (KIND_NVFP4); with ``AMAX_ONLY`` the kernel only writes row amax of x̂ into ``scales_ptr``.
    ``codes_ptr`` is int8 (KIND_INT) or the uint8 view of the E4M3 codes.

    Roundings are written out in integer/float32 arithmetic (x̂ to bf16, values to E4M3, E2M1) instead of
    relying on casts: they are then identical on the GPU and in the CPU interpreter, whose float8 and bf16
    casts do not round to nearest even.
    """
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)  # row offsets in int64: M * K may pass 2^31
    cols0 = tl.arange(0, BK)
    x_dtype = x_ptr.dtype.element_ty
    NG: tl.constexpr = BK // GROUP
    amax = tl.full([BM], 0, tl.float32)
    if RB > 0:
        rk = tl.arange(0, RB)
        lr = tl.full([BM, RB], 0, tl.float32)
    if KIND == 2 and not AMAX_ONLY:
        st = tl.load(stat_ptr)
        denom = 6.0 * st
    if MODE == 2:
        s_static = tl.maximum(tl.load(stat_ptr).to(tl.float32), 1.1754943508222875e-38)
    # per token: walk 1 finds the row amax (and the down-projection), walk 2 writes codes; otherwise one walk
    NPASS: tl.constexpr = 2 if (MODE == 0 and not AMAX_ONLY) else 1
    for p in tl.static_range(NPASS):
        if NPASS == 2 and p == 1:
            scale_tok = tl.math.div_rn(amax, tl.full([BM], 0, tl.float32) + QMAX)
            safe_tok = tl.where(scale_tok == 0.0, 1.0, scale_tok)
        for k0 in range(0, K, BK):
            cols = k0 + cols0
            cmask = cols < K
            m2 = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=m2, other=0.0)
            if HAS_SMOOTH:
                lam = tl.load(lam_ptr + cols, mask=cmask, other=1.0)
                xf = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(lam.to(tl.float32)[None, :], (BM, BK)))
                # x / λ rounded to x.dtype as the reference does (bf16: round to nearest even by hand)
                if X_BF16:
                    xb = xf.to(tl.int32, bitcast=True)
                    xb = (xb + 0x7FFF + ((xb >> 16) & 1)) & -65536
                    xf = xb.to(tl.float32, bitcast=True)
                else:
                    xf = xf.to(x_dtype).to(tl.float32)
            else:
                xf = x.to(tl.float32)
            if p == 0:
                if RB > 0:
                    pd = tl.load(
                        pd_ptr + cols[:, None] * stride_pk + rk[None, :],
                        mask=cmask[:, None] & (rk < R)[None, :],
                        other=0.0,
                    )
                    if DOT_F32:  # the CPU interpreter's bf16 dot is wrong: upcast there (exact products in fp32)
                        lr = tl.dot(xf, pd.to(tl.float32), lr, input_precision="ieee")
                    else:
                        lr = tl.dot(xf.to(x_dtype), pd, lr, input_precision=DOT_PREC)
                if MODE == 0 or AMAX_ONLY:
                    amax = tl.maximum(amax, tl.reduce(tl.abs(xf), 1, tl.standard._elementwise_max))
            if p == NPASS - 1 and not AMAX_ONLY:
                # v: the value to encode, x̂ / scale
                if MODE == 0:
                    v = tl.math.div_rn(xf, tl.broadcast_to(safe_tok[:, None], (BM, BK)))
                elif MODE == 2:
                    v = tl.math.div_rn(xf, tl.full([BM, BK], 0, tl.float32) + s_static)
                else:
                    xg = tl.reshape(xf, (BM, NG, GROUP))
                    gmax = tl.reduce(tl.abs(xg), 2, tl.standard._elementwise_max)
                    if KIND == 2:
                        # s_b = E4M3(amax_b / (6 s_t)), saturating, round to nearest even
                        u = tl.minimum(tl.math.div_rn(gmax, tl.full([BM, NG], 0, tl.float32) + denom), 448.0)
                        ue = tl.maximum(((u.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
                        u_inv = ((130 - ue) << 23).to(tl.float32, bitcast=True)
                        u_step = ((ue + 124) << 23).to(tl.float32, bitcast=True)
                        sb = ((u * u_inv + _RNE_MAGIC) - _RNE_MAGIC) * u_step
                        scale = sb * st
                    else:
                        scale = tl.math.div_rn(gmax, tl.full([BM, NG], 0, tl.float32) + QMAX)
                    safe = tl.where(scale == 0.0, 1.0, scale)
                    vg = tl.math.div_rn(xg, tl.broadcast_to(safe[:, :, None], (BM, NG, GROUP)))
                    vg = tl.where(tl.broadcast_to(scale[:, :, None], (BM, NG, GROUP)) == 0.0, 0.0, vg)
                    v = tl.reshape(vg, (BM, BK))
                    gcols = k0 // GROUP + tl.arange(0, NG)
                    tl.store(
                        scales_ptr + rows64[:, None] * stride_sm + gcols[None, :],
                        scale,
                        mask=rmask[:, None] & (gcols < K // GROUP)[None, :],
                    )
                if KIND == 0:
                    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX)
                    q = ((v + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int8)
                elif KIND == 1:
                    # E4M3, saturating, round to nearest even: scale |v| to 8..16 per binade (2^-9 steps below
                    # 2^-6), round to an integer, then assemble the bits
                    a = tl.minimum(tl.abs(v), QMAX)
                    ae = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
                    a_inv = ((130 - ae) << 23).to(tl.float32, bitcast=True)
                    a_step = ((ae + 124) << 23).to(tl.float32, bitcast=True)
                    r = ((a * a_inv + _RNE_MAGIC) - _RNE_MAGIC) * a_step
                    rb = r.to(tl.int32, bitcast=True)
                    re = ((rb >> 23) & 0xFF) - 127
                    byte = tl.where(re >= -6, ((re + 7) << 3) | ((rb >> 20) & 7), (r * 512.0).to(tl.int32))
                    q = (byte | tl.where(v < 0.0, 0x80, 0)).to(tl.uint8)
                else:
                    # E2M1, ties to the even code (thresholds as vqsuite.formats.fp4.encode_e2m1), as E4M3 bits
                    mag = tl.abs(v)
                    idx = (
                        (mag > 0.25).to(tl.int32)
                        + (mag >= 0.75).to(tl.int32)
                        + (mag > 1.25).to(tl.int32)
                        + (mag >= 1.75).to(tl.int32)
                        + (mag > 2.5).to(tl.int32)
                        + (mag >= 3.5).to(tl.int32)
                        + (mag > 5.0).to(tl.int32)
                    )
                    byte = tl.where(idx == 0, 0, tl.where(idx == 1, 0x30, (((idx >> 1) + 6) << 3) | ((idx & 1) << 2)))
                    q = (byte | tl.where(v < 0.0, 0x80, 0)).to(tl.uint8)
                tl.store(codes_ptr + rows64[:, None] * stride_cm + cols[None, :], q, mask=m2)
    if AMAX_ONLY:
        tl.store(scales_ptr + rows64 * stride_sm, amax, mask=rmask)
    elif MODE == 0:
        tl.store(scales_ptr + rows64 * stride_sm, scale_tok, mask=rmask)
    elif MODE == 2:
        tl.store(scales_ptr + rows64 * stride_sm, tl.full([BM], 0, tl.float32) + s_static, mask=rmask)
    if RB > 0 and not AMAX_ONLY:
        if X_BF16:
            lb = lr.to(tl.int32, bitcast=True)
            lr = ((lb + 0x7FFF + ((lb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        tl.store(
            lr_ptr + rows64[:, None] * stride_lm + rk[None, :],
            lr.to(x_dtype),
            mask=rmask[:, None] & (rk < R)[None, :],
        )


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel for one mode (interpreted for CPU tensors, compiled for CUDA): triton decides when
    ``jit`` runs, so the mode is set explicitly there. The kernel calls no jitted helpers (``tl.zeros``,
    ``tl.max`` are jitted in triton's own library, fixed to the mode triton was imported in), only builtins."""
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return triton.jit(_act_quant_body)


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _block_sizes(M: int, K: int, group: int, rank_block: int, interpret: bool) -> tuple[int, int, int]:
    """(BM, BK, num_warps). Interpreter: tiny fixed blocks. CUDA: 16 rows x 128 columns (a multiple of the
    group) per step; ptxas for sm_90 reports no spills for any variant up to rank 128 (see :func:`hopper_asm`).
    Untimed: tune on a GPU."""
    del M, K, rank_block  # the same blocks for every shape until a GPU says otherwise
    if interpret:
        return 16, max(32, group), 4
    return 16, max(128, group), 4


def act_quant_lowrank(
    x: torch.Tensor,
    *,
    act: str,
    act_mode: str,
    group_size: int | None = None,
    static_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    proj_down: torch.Tensor | None = None,
) -> QuantizedActs:
    """Quantize ``x: [M, K]`` (fp16/bf16/fp32) for the 8-bit GEMM and compute ``(x/λ) @ proj_down``.

    act: ``"int8"``, ``"int4"``, ``"fp8_e4m3"`` or ``"nvfp4"``; act_mode: ``"dynamic_per_token"``,
    ``"dynamic_per_group"`` (``group_size`` a power of two >= 16 dividing K; 16 for NVFP4) or ``"static"``
    (``static_scale`` a 0-d tensor). smooth: ``[K]`` λ or ``None``; proj_down: ``[K, r]`` (r <= 128) or ``None``.
    Returns :class:`QuantizedActs`; same values as :func:`~vqsuite.kernels.reference.act_quant_lowrank_reference`.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    kind = act_kind(act)
    mode = {"dynamic_per_token": MODE_PER_TOKEN, "dynamic_per_group": MODE_PER_GROUP, "static": MODE_STATIC}[act_mode]
    if kind == KIND_NVFP4 and mode != MODE_PER_GROUP:
        raise ValueError("nvfp4 activations are per group of 16")
    if mode == MODE_STATIC and (static_scale is None or kind == KIND_NVFP4):
        raise ValueError("act_mode='static' needs static_scale and an int8/int4/fp8_e4m3 format")
    group = int(group_size) if mode == MODE_PER_GROUP else 0
    if mode == MODE_PER_GROUP and (group < 16 or group & (group - 1) or K % group):
        raise ValueError(f"group_size={group} must be a power of two >= 16 dividing K={K}")
    rank = 0 if proj_down is None else int(proj_down.shape[1])
    if rank > MAX_RANK:
        raise ValueError(f"rank={rank} exceeds the fused down-projection's limit {MAX_RANK}")
    x = x.contiguous()
    dev = x.device
    rb = _pow2_at_least(rank, 16) if rank else 0
    interpret = dev.type == "cpu"
    bm, bk, warps = _block_sizes(M, K, group, rb, interpret)
    codes = torch.empty(M, K, device=dev, dtype=torch.int8 if kind == KIND_INT else torch.float8_e4m3fn)
    scales = torch.empty(M, K // group if group else 1, device=dev, dtype=torch.float32)
    lr = torch.empty(M, rank, device=dev, dtype=x.dtype) if rank else None
    lam = None if smooth is None else smooth.to(device=dev, dtype=x.dtype).contiguous()
    pd = None if proj_down is None else proj_down.to(device=dev, dtype=x.dtype).contiguous()
    dummy = scales  # a valid pointer for arguments a mode does not read
    dot_f32 = interpret and x.dtype == torch.bfloat16
    prec = "ieee" if x.dtype == torch.float32 else None
    kernel = _kernel(interpret)
    grid = (triton.cdiv(M, bm),)
    common = dict(BM=bm, BK=bk, DOT_F32=dot_f32, DOT_PREC=prec, X_BF16=x.dtype == torch.bfloat16, num_warps=warps)
    stat = dummy
    if mode == MODE_STATIC:
        stat = static_scale.to(device=dev, dtype=torch.float32).reshape(1)
    elif kind == KIND_NVFP4:
        row_amax = torch.empty(M, 1, device=dev, dtype=torch.float32)
        kernel[grid](
            x, lam if lam is not None else dummy, dummy, dummy, row_amax, dummy, dummy,
            M, K, 0, x.stride(0), 0, 0, row_amax.stride(0), 0,
            HAS_SMOOTH=lam is not None, RB=0, KIND=kind, MODE=MODE_PER_TOKEN, QMAX=1.0, GROUP=16,
            AMAX_ONLY=True, **common,
        )  # fmt: skip
        s_t = row_amax.amax() / (_E2M1_MAX * _E4M3_MAX)
        stat = torch.where(s_t == 0, torch.ones_like(s_t), s_t).reshape(1)
    kernel[grid](
        x, lam if lam is not None else dummy, pd if pd is not None else dummy,
        codes if kind == KIND_INT else codes.view(torch.uint8), scales,
        lr if lr is not None else dummy, stat,
        M, K, rank, x.stride(0), pd.stride(0) if pd is not None else 0, codes.stride(0), scales.stride(0),
        lr.stride(0) if lr is not None else 0,
        HAS_SMOOTH=lam is not None, RB=rb, KIND=kind, MODE=mode, QMAX=act_qmax(act), GROUP=max(group, 16),
        AMAX_ONLY=False, **common,
    )  # fmt: skip
    return QuantizedActs(codes, scales, lr)


def hopper_asm(
    *, act: str, act_mode: str, group_size: int | None = None, rank: int = 32, x_dtype: torch.dtype = torch.bfloat16
) -> dict[str, str]:
    """Compile one activation-stage variant for sm_90 ahead of time (no GPU needed: triton ships ``ptxas``) and
    return its assembly; inputs assumed 16-byte aligned with strides divisible by 16. Launch blocks as for
    M > 16 on CUDA."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kind = act_kind(act)
    mode = {"dynamic_per_token": MODE_PER_TOKEN, "dynamic_per_group": MODE_PER_GROUP, "static": MODE_STATIC}[act_mode]
    group = int(group_size) if mode == MODE_PER_GROUP else 0
    rb = _pow2_at_least(rank, 16) if rank else 0
    bm, bk, warps = _block_sizes(1024, 4096, group, rb, False)
    fn = _kernel(False)
    xt = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[x_dtype]
    sig = {name: "constexpr" for name in fn.arg_names}
    sig.update(x_ptr=xt, lam_ptr=xt, pd_ptr=xt, codes_ptr="*i8" if kind == KIND_INT else "*u8", scales_ptr="*fp32")
    sig.update(lr_ptr=xt, stat_ptr="*fp32")
    sig.update({n: "i32" for n in ("M", "K", "R", "stride_xm", "stride_pk", "stride_cm", "stride_sm", "stride_lm")})
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n == "K" or n.startswith("stride_")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    const = dict(
        HAS_SMOOTH=True, RB=rb, KIND=kind, MODE=mode, QMAX=act_qmax(act), GROUP=max(group, 16), BM=bm, BK=bk,
        DOT_F32=False, DOT_PREC="ieee" if x_dtype == torch.float32 else None, AMAX_ONLY=False,
        X_BF16=x_dtype == torch.bfloat16,
    )  # fmt: skip
    compiled = triton.compile(
        ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
    )
    return dict(compiled.asm)
