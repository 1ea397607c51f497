"""8-bit-MMA GEMM family (Triton): W8A8 (INT8, FP8 E4M3), W4A8 and emulated W4A4 (INT4 g64, NVFP4 g16).

A frozen ``QLinear``/``QLinearLowRank`` forward is two launches:

1. :func:`vqsuite.kernels.triton.act_quant.act_quant_lowrank`: ``x̂ = x/λ``, activation codes + scales and the
   low-rank input ``lr = x̂ @ proj_down``, from one read of x.
2. :func:`gemm_mma8`: every MMA takes 8-bit operands (``tl.dot`` on int8 or float8e4nv tiles, which Triton lowers
   to Hopper's wgmma for 64-row tiles): INT8 activations x INT8 weights -> int32; INT4 weight codes are sign-extended
   to INT8 in registers; FP8 activations x FP8 weights -> fp32; NVFP4's E2M1 weight codes become E4M3 bytes in
   registers (exact) and meet E4M3 activations; INT4 weights also meet FP8 activations (INT4 values are exact in
   E4M3). Packed 4-bit weights are loaded as K-contiguous byte vectors ``[BN, BK/2]``, split into nibbles and
   interleaved back along K in registers.

Scales. Per-token x per-channel (W8A8): one exact accumulator over K (int32 for integer codes), both scales in
the epilogue. With K-groups (W4A8 g64 weights; W4A4 g64/g16 on both sides): an exact 8-bit dot per group
(``GK = min(GA, GW)``), rescaled by the grouped scales into an fp32 accumulator; per-token/per-channel scales and
the NVFP4 tensor scale in the epilogue. Group-16 NVFP4 needs K >= 32 per FP8 MMA, so a 32-wide slab is issued
once per group with the other group's activation columns zeroed: exact, at half the MMA rate.

Low-rank branch: added in the epilogue as one more MMA ``lr [BM, r] @ proj_up^T [r, BN]`` (16-bit operands)
accumulating into the same fp32 accumulator, before the bias and the single rounding to ``x.dtype``. It cannot be
a K-slab of the main loop because that loop accumulates integer codes in int32 (and its grouped form rescales
per group).

Twins: :func:`vqsuite.kernels.reference.act_quant_lowrank_reference` and
:func:`vqsuite.kernels.reference.gemm_mma8_reference`; :func:`qlinear_twin` chains them for a layer.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vqsuite.kernels import reference
from vqsuite.kernels.triton.act_quant import MAX_RANK, act_quant_lowrank

logger = logging.getLogger(__name__)

#: weight storage kinds the GEMM decodes
W_INT8, W_INT4, W_FP8, W_NVFP4 = 0, 1, 2, 3
_W_KINDS = {"int8": W_INT8, "int4": W_INT4, "fp8_e4m3": W_FP8, "nvfp4": W_NVFP4}
_INT_ACTS = ("int8", "int4")
_FP_ACTS = ("fp8_e4m3", "nvfp4")
#: weights each activation family can meet on an 8-bit MMA without losing exactness
_WEIGHTS_FOR_ACT = {"int": ("int8", "int4"), "fp": ("fp8_e4m3", "nvfp4", "int4")}
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: smallest K of one 8-bit MMA on sm_90 (Triton's min_dot_size for 8-bit operands)
MIN_DOT_K = 32


def _gemm_body(
    a_ptr,
    as_ptr,
    w_ptr,
    ws_ptr,
    wts_ptr,
    lr_ptr,
    up_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_am,
    stride_asm,
    stride_wn,
    stride_wsn,
    stride_lm,
    stride_un,
    stride_ym,
    GA: tl.constexpr,
    GW: tl.constexpr,
    GK: tl.constexpr,
    W_KIND: tl.constexpr,
    A_FP8: tl.constexpr,
    HAS_WTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RB: tl.constexpr,
    OUT_INT32: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    Y_BF16: tl.constexpr,
):
    """y[BM, BN] tile. GA/GW: activation/weight group length (0 = per token/per channel); GK: the K-group of
    the exact partial dots (0 = one accumulator over K)."""
    pid = tl.program_id(0)
    num_pid_m = (M + BM - 1) // BM
    num_pid_n = (N + BN - 1) // BN
    # grouped launch order: GROUP_M row-tiles share each weight column-tile while it is in L2
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rkh = tl.arange(0, BK // 2)
    rm64 = rm.to(tl.int64)  # offsets in int64: M * K and N * K may pass 2^31
    rn64 = rn.to(tl.int64)
    mmask = rm < M
    nmask = rn < N
    if GK == 0 and not A_FP8:
        acc = tl.full([BM, BN], 0, tl.int32)
    else:
        acc = tl.full([BM, BN], 0, tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + rk
        kmask = ks < K
        # FP8 operands arrive as their uint8 bytes (zeroing and bit assembly stay integer ops) and are bitcast
        a = tl.load(a_ptr + rm64[:, None] * stride_am + ks[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
        wmask = kmask[:, None] & nmask[None, :]
        if W_KIND == 1 or W_KIND == 3:
            # packed nibbles, element 2i in the low nibble of byte i: load [BN, BK/2] bytes (K-contiguous vectors),
            # split the nibbles and interleave them back along K, decode, then view the tile as [BK, BN]
            kh = k0 // 2 + rkh
            byte = tl.load(
                w_ptr + rn64[:, None] * stride_wn + kh[None, :], mask=nmask[:, None] & (kh < K // 2)[None, :], other=0
            )
            nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BN, BK))
            if W_KIND == 1:
                wi = (nib.to(tl.int8) ^ 8) - 8  # sign-extend the 4-bit two's complement
                if A_FP8:
                    # INT4 values are exact in E4M3: |v| = 2^e * (1 + m/8) for 1..7, 8 = 2^3; assembled by hand
                    mag = tl.abs(wi.to(tl.int32))
                    e = (mag >= 2).to(tl.int32) + (mag >= 4).to(tl.int32) + (mag >= 8).to(tl.int32)
                    man = ((mag << 3) >> e) & 7
                    bits = tl.where(mag == 0, 0, ((e + 7) << 3) | man) | tl.where(wi < 0, 0x80, 0)
                    w = tl.trans(bits.to(tl.uint8))
                else:
                    w = tl.trans(wi.to(tl.int8))
            else:
                # E2M1 bits s e1 e0 m -> E4M3 bits: exponent rebiased by 6, mantissa bit on top; 0.5 and 0 by hand
                idx = (nib & 7).to(tl.int32)
                mag = tl.where(idx == 0, 0, tl.where(idx == 1, 0x30, (((idx >> 1) + 6) << 3) | ((idx & 1) << 2)))
                bits = (mag | ((nib.to(tl.int32) & 8) << 4)).to(tl.uint8)
                w = tl.trans(bits)
        else:
            w = tl.load(w_ptr + rn64[None, :] * stride_wn + ks[:, None], mask=wmask, other=0)
        if GK == 0:
            if A_FP8:
                # promote the FP8 tensor-core partial sums into the fp32 accumulator every BK (Hopper's FP8 MMA
                # accumulates with a reduced mantissa; unbounded imprecise accumulation over K = 12288 loses bits)
                acc = tl.dot(
                    a.to(tl.float8e4nv, bitcast=True), w.to(tl.float8e4nv, bitcast=True), acc, max_num_imprecise_acc=BK
                )
            else:
                acc = tl.dot(a, w, acc)
        else:
            for j in tl.static_range(BK // GK):
                if BK // GK > 1:  # one exact dot per group: the slab's other columns are zeroed
                    aj = tl.where(((rk // GK) == j)[None, :], a, 0).to(a.dtype)
                else:
                    aj = a
                if A_FP8:
                    part = tl.dot(aj.to(tl.float8e4nv, bitcast=True), w.to(tl.float8e4nv, bitcast=True))
                else:
                    part = tl.dot(aj, w).to(tl.float32)
                kg = k0 + j * GK
                if GA > 0:
                    fa = tl.load(as_ptr + rm64 * stride_asm + kg // GA, mask=mmask & (kg < K), other=0.0)
                if GW > 0:
                    fw = tl.load(ws_ptr + rn64 * stride_wsn + kg // GW, mask=nmask & (kg < K), other=0.0)
                    fw = fw.to(tl.float32)
                if GA > 0 and GW > 0:
                    acc += part * (fa[:, None] * fw[None, :])
                elif GA > 0:
                    acc += part * fa[:, None]
                else:
                    acc += part * fw[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    if OUT_INT32:
        tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :], acc, mask=ymask)
    else:
        accf = acc.to(tl.float32)
        if GA == 0:
            accf = accf * tl.load(as_ptr + rm64 * stride_asm, mask=mmask, other=0.0)[:, None]
        if GW == 0:
            accf = accf * tl.load(ws_ptr + rn64 * stride_wsn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if HAS_WTS:
            accf = accf * tl.load(wts_ptr)
        if RB > 0:
            rr = tl.arange(0, RB)
            lr = tl.load(
                lr_ptr + rm64[:, None] * stride_lm + rr[None, :], mask=mmask[:, None] & (rr < R)[None, :], other=0
            )
            up = tl.load(
                up_ptr + rn64[None, :] * stride_un + rr[:, None], mask=(rr < R)[:, None] & nmask[None, :], other=0
            )
            if DOT_F32:  # the CPU interpreter's bf16 dot is wrong: upcast there (products are exact in fp32)
                accf = tl.dot(lr.to(tl.float32), up.to(tl.float32), accf, input_precision="ieee")
            else:
                accf = tl.dot(lr, up, accf, input_precision=DOT_PREC)
        if HAS_BIAS:
            accf += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if Y_BF16:  # round to nearest even by hand: the interpreter's cast does not
            yb = accf.to(tl.int32, bitcast=True)
            accf = ((yb + 0x7FFF + ((yb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :], accf.to(y_ptr.dtype.element_ty), mask=ymask)


#: (BM, BN, BK, num_warps, num_stages) for per-token x per-channel GEMMs; 64/128-row tiles so Triton emits wgmma.
#: Checked with ptxas for sm_90 (see :func:`hopper_asm`): none of these spills registers for 16-byte-aligned inputs.
#: The 32/64-column tiles are for small M (adaLN GEMVs), where the launch needs many column tiles to keep HBM busy.
CUDA_CONFIGS_UNGROUPED = ((128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                          (64, 64, 128, 4, 4), (64, 32, 256, 4, 4))  # fmt: skip
#: (BM, BN, num_warps, num_stages) for grouped GEMMs, whose BK is the group (at least 32)
CUDA_CONFIGS_GROUPED = ((128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4))
#: up to this many rows (M rounded up to a power of two) only 64-row tiles are tried; from 256 rows on, no 32-column
SMALL_M = 32


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune only tile shapes that can win for this M (saves compile and tuning time)."""
    m = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", SMALL_M + 1))
    if m <= SMALL_M:
        keep = [c for c in configs if c.kwargs["BM"] == 64]
    elif m >= 256:
        keep = [c for c in configs if c.kwargs["BN"] >= 64]
    else:
        keep = list(configs)
    return keep or list(configs)


def _cuda_configs(grouped: bool) -> list:
    if grouped:
        return [
            triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in CUDA_CONFIGS_GROUPED
        ]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in CUDA_CONFIGS_UNGROUPED
    ]


@functools.cache
def _kernel(interpret: bool, grouped: bool):
    """The jitted GEMM: one fixed config in the interpreter, autotuned on CUDA (keyed by the M bucket, N, K and the
    variant)."""
    with triton.knobs.runtime.scope():  # see act_quant._kernel: the mode is fixed when jit runs
        triton.knobs.runtime.interpret = interpret
        jitted = triton.jit(_gemm_body)
    if interpret:
        return jitted
    key = ["M_BUCKET", "N", "K", "W_KIND", "A_FP8", "GK", "RB"]
    return triton.autotune(configs=_cuda_configs(grouped), key=key, prune_configs_by={"early_config_prune": _prune})(
        jitted
    )


def gemm_mma8(
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
    """``y = scale(A_codes @ W_codes^T) + lowrank @ proj_up^T + bias`` on 8-bit MMAs.

    a_codes ``[M, K]`` int8 or float8_e4m3fn; a_scales ``[M, K/GA]`` float32 (``GA = K``: per token);
    qweight/wscales/wtscale as frozen layers store them (``[N, K]`` int8/float8, or ``[N, K/2]`` packed uint8
    for int4/nvfp4; ``[N, K/GW]`` scales); lowrank ``[M, r]`` (16-bit); proj_up ``[N, r]``; bias ``[N]``.
    Returns ``[M, N]`` in ``out_dtype`` (``raw_int32``: the int32 accumulator, integer per-token x per-channel
    only). Same math as :func:`vqsuite.kernels.reference.gemm_mma8_reference`.
    """
    M, K = a_codes.shape
    N = qweight.shape[0]
    wkind = _W_KINDS[weight_fmt]
    a_fp8 = a_codes.dtype == torch.float8_e4m3fn
    ga = 0 if a_scales.shape[1] == 1 else K // a_scales.shape[1]
    gw = 0 if not weight_group_size or weight_group_size == K else int(weight_group_size)
    gk = 0 if ga == 0 and gw == 0 else min(g for g in (ga, gw) if g > 0)
    if raw_int32 and (gk or a_fp8):
        raise ValueError("raw_int32 applies to integer codes with per-token x per-channel scales only")
    dev = a_codes.device
    rank = 0 if lowrank is None else int(lowrank.shape[1])
    rb = max(16, triton.next_power_of_2(rank)) if rank else 0
    lowrank = lowrank.contiguous() if rank else None
    y = torch.empty(M, N, device=dev, dtype=torch.int32 if raw_int32 else out_dtype)
    lr_dtype = lowrank.dtype if lowrank is not None else out_dtype
    up = proj_up.to(device=dev, dtype=lr_dtype).contiguous() if rank else None
    b = bias.to(device=dev, dtype=out_dtype).contiguous() if bias is not None else None
    a_codes, a_scales, qweight, wscales = (t.contiguous() for t in (a_codes, a_scales, qweight, wscales))
    if a_fp8:
        a_codes = a_codes.view(torch.uint8)
    if qweight.dtype == torch.float8_e4m3fn:
        qweight = qweight.view(torch.uint8)
    dummy = a_scales
    interp = dev.type == "cpu"
    kernel = _kernel(interp, gk > 0)
    args = (
        a_codes, a_scales, qweight, wscales,
        wtscale.to(device=dev, dtype=torch.float32).reshape(1) if wtscale is not None else dummy,
        lowrank if rank else dummy, up if rank else dummy, b if b is not None else dummy, y,
        M, N, K, rank, triton.next_power_of_2(M),
        a_codes.stride(0), a_scales.stride(0), qweight.stride(0), wscales.stride(0),
        lowrank.stride(0) if rank else 0, up.stride(0) if rank else 0, y.stride(0),
    )  # fmt: skip
    meta = dict(
        GA=ga, GW=gw, GK=gk, W_KIND=wkind, A_FP8=a_fp8, HAS_WTS=wtscale is not None, HAS_BIAS=b is not None,
        RB=rb, OUT_INT32=raw_int32, DOT_F32=interp and lr_dtype == torch.bfloat16,
        DOT_PREC="ieee" if lr_dtype == torch.float32 else None, GROUP_M=8, Y_BF16=y.dtype == torch.bfloat16,
    )  # fmt: skip
    bk_grouped = max(gk, MIN_DOT_K)
    if interp:
        meta.update(BM=16, BN=32, BK=bk_grouped if gk else MIN_DOT_K)
        grid = (triton.cdiv(M, 16) * triton.cdiv(N, 32),)
        kernel[grid](*args, **meta)
    else:
        if gk:
            meta["BK"] = bk_grouped

        def grid(m):
            return (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)

        kernel[grid](*args, **meta)
    return y


_TL_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def hopper_asm(
    *,
    weight_fmt: str,
    weight_group_size: int | None,
    act: str,
    act_group_size: int | None,
    rank: int = 32,
    scale_dtype: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype = torch.bfloat16,
    config: tuple[int, ...] | None = None,
) -> dict[str, str]:
    """Compile one GEMM variant for sm_90 ahead of time and return its assembly (``ttgir``, ``ptx``, ``cubin``...).

    Needs no GPU (triton ships ``ptxas``), so CI can check that the 8-bit MMAs lower to Hopper's ``wgmma``. Inputs
    are assumed 16-byte aligned with strides divisible by 16, as contiguous tensors with K, N multiples of 16 are
    at launch. config: ``(BM, BN, BK, num_warps, num_stages)`` (BK ignored when grouped), default the first
    autotune entry.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    a_fp8 = act in _FP_ACTS
    ga = act_group_size or 0
    gw = weight_group_size or 0
    gk = min([g for g in (ga, gw) if g] or [0])
    if config is None:
        config = CUDA_CONFIGS_GROUPED[0][:2] + (0,) + CUDA_CONFIGS_GROUPED[0][2:] if gk else CUDA_CONFIGS_UNGROUPED[0]
    bm, bn, bk, warps, stages = config
    fn = _kernel(False, gk > 0).fn
    io = _TL_PTR[out_dtype]
    sig = {name: "constexpr" for name in fn.arg_names}
    sig.update(
        a_ptr="*u8" if a_fp8 else "*i8", as_ptr="*fp32", w_ptr="*i8" if weight_fmt == "int8" else "*u8",
        ws_ptr="*fp8e4nv" if weight_fmt == "nvfp4" else _TL_PTR[scale_dtype], wts_ptr="*fp32",
        lr_ptr=io, up_ptr=io, bias_ptr=io, y_ptr=io,
    )  # fmt: skip
    ints = ("M", "N", "K", "R", "M_BUCKET", "stride_am", "stride_asm", "stride_wn", "stride_wsn", "stride_lm",
            "stride_un", "stride_ym")  # fmt: skip
    sig.update({name: "i32" for name in ints})
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n == "N" or n == "K" or n.startswith("stride_")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    const = dict(
        GA=ga, GW=gw, GK=gk, W_KIND=_W_KINDS[weight_fmt], A_FP8=a_fp8, HAS_WTS=weight_fmt == "nvfp4", HAS_BIAS=True,
        RB=max(16, triton.next_power_of_2(rank)) if rank else 0, OUT_INT32=False, DOT_F32=False,
        DOT_PREC="ieee" if out_dtype == torch.float32 else None, BM=bm, BN=bn, BK=max(gk, MIN_DOT_K) if gk else bk,
        GROUP_M=8, Y_BF16=out_dtype == torch.bfloat16,
    )  # fmt: skip
    compiled = triton.compile(
        ASTSource(fn, sig, const, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    return dict(compiled.asm)


# ---------------------------------------------------------------------- layer-level plan
@dataclass(frozen=True)
class Mma8Plan:
    """How a frozen layer runs on this family: activation quantization and GEMM arguments."""

    act: str
    act_mode: str
    act_group: int | None  # per-group length, None for per-token/static
    weight: str
    weight_group: int | None  # None: per channel


def _pow2_divides(g: int, k: int) -> bool:
    return g >= 16 and g & (g - 1) == 0 and k % g == 0


def plan_for(ops, x: torch.Tensor | None = None) -> Mma8Plan | str:  # noqa: ANN001
    """The plan for a frozen layer's :class:`~vqsuite.kernels.operands.QLinearOperands` (or the frozen
    ``QLinear``/``QLinearLowRank`` itself) and input ``x``, or why this family declines."""
    from vqsuite.kernels.operands import try_operands

    rec = try_operands(ops)
    if rec is None:
        return f"{type(ops).__name__} is not a frozen quantized linear layer"
    spec = rec
    if spec.act is None or spec.weight is None:
        return "needs quantized weights and activations"
    if spec.act not in _INT_ACTS + _FP_ACTS:
        return f"act={spec.act} not implemented"
    family = "int" if spec.act in _INT_ACTS else "fp"
    if spec.weight not in _WEIGHTS_FOR_ACT[family]:
        return f"weight={spec.weight} cannot meet act={spec.act} on an 8-bit MMA"
    n, k = rec.gemm_shape
    act_group = None
    if spec.act_mode == "dynamic_per_group":
        act_group = int(spec.act_group_size)
        if act_group != k and not _pow2_divides(act_group, k):
            return f"act_group_size={act_group} must be a power of two >= 16 dividing K={k}"
        act_group = None if act_group == k else act_group
        if spec.act == "nvfp4" and act_group != 16:
            return "nvfp4 activations need groups of 16"
    elif spec.act_mode == "static":
        if spec.act == "nvfp4" or rec.act_scale is None:
            return "static mode without a static scale"
    elif spec.act_mode != "dynamic_per_token":
        return f"act_mode={spec.act_mode} not implemented"
    wg = spec.weight_group_size
    if wg is not None and wg != k and not _pow2_divides(wg, k):
        return f"weight_group_size={wg} must be a power of two >= 16 dividing K={k}"
    wg = None if wg == k else wg
    if rec.wzeros is not None:
        return "asymmetric weights"
    if rec.rank > MAX_RANK:
        return f"rank={rec.rank} > {MAX_RANK}"
    if x is not None:
        if torch.is_grad_enabled() and x.requires_grad:
            return "x requires grad: the kernels are not differentiable, the reference path is"
        if x.dtype not in _X_DTYPES:
            return f"x.dtype={x.dtype}"
        if x.ndim == 0 or x.shape[-1] != k or x.numel() == 0:
            return f"x shape {tuple(x.shape)} does not fit K={k}"
        if rec.qweight.device != x.device:
            return "layer and input on different devices"
    return Mma8Plan(spec.act, spec.act_mode, act_group, spec.weight, wg)


def accepts(x: torch.Tensor, ops) -> bool:  # noqa: ANN001
    """Family contract: can :func:`qlinear` run these operands (or this frozen layer) on ``x`` (device checked by
    the caller)?"""
    return isinstance(plan_for(ops, x), Mma8Plan)


#: (device, data_ptr, version) of static scales already checked finite (bounded: cleared when it grows large)
_SCALES_OK: set[tuple] = set()


def _checked_static_scale(ops) -> torch.Tensor:  # noqa: ANN001
    """The record's static scale (per-step tables resolved by the layer), refused if it was never calibrated. On
    CUDA the finiteness check (a host sync) runs once per scale storage and version."""
    s = ops.act_scale
    key = (s.device, s.data_ptr(), s._version)
    if s.device.type == "cpu" or key not in _SCALES_OK:
        if not bool(torch.isfinite(s).all()):
            raise RuntimeError(f"{ops.name}.input: static activation scale is not calibrated; quantize with calib_data")
        if len(_SCALES_OK) > 4096:
            _SCALES_OK.clear()
        _SCALES_OK.add(key)
    return s


def _run(x: torch.Tensor, ops, *, act_fn, gemm_fn) -> torch.Tensor:  # noqa: ANN001
    from vqsuite.kernels.operands import as_operands

    plan = plan_for(ops, x)
    if not isinstance(plan, Mma8Plan):
        raise ValueError(f"mma8 cannot run this layer: {plan}")
    ops = as_operands(ops)
    n, k = ops.gemm_shape
    x2 = x.reshape(-1, k)
    proj_down = ops.proj_down
    codes, scales, lowrank = act_fn(
        x2,
        act=plan.act,
        act_mode=plan.act_mode if plan.act_group or plan.act_mode != "dynamic_per_group" else "dynamic_per_token",
        group_size=plan.act_group,
        static_scale=_checked_static_scale(ops) if plan.act_mode == "static" else None,
        smooth=ops.smooth,
        proj_down=proj_down.detach() if proj_down is not None else None,
    )
    proj_up = ops.proj_up
    y = gemm_fn(
        codes,
        scales,
        ops.qweight,
        ops.wscales,
        weight_fmt=plan.weight,
        weight_group_size=plan.weight_group,
        wtscale=ops.wtscale,
        lowrank=lowrank,
        proj_up=proj_up.detach() if proj_up is not None else None,
        bias=ops.bias.detach() if ops.bias is not None else None,
        out_dtype=x.dtype,
    )
    return y.reshape(*x.shape[:-1], n)


def qlinear(x: torch.Tensor, ops) -> torch.Tensor:  # noqa: ANN001
    """Frozen ``QLinear``/``QLinearLowRank`` forward on the Triton path: ``x [..., K] -> [..., N]`` in x.dtype."""
    return _run(x, ops, act_fn=act_quant_lowrank, gemm_fn=gemm_mma8)


def qlinear_twin(x: torch.Tensor, ops) -> torch.Tensor:  # noqa: ANN001
    """The same forward built from the plain-PyTorch twins (the kernels' exact-math reference)."""
    return _run(x, ops, act_fn=reference.act_quant_lowrank_reference, gemm_fn=reference.gemm_mma8_reference)
