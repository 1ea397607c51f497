"""W4A16 GEMM in Triton: 4-bit weights dequantized in registers, 16-bit MMA, low-rank branch fused.

One kernel computes, for a frozen ``QLinear``/``QLinearLowRank`` with a weight-only 4-bit spec,

    y = (x/λ) @ W^T + t @ proj_up^T + bias,      t = (x/λ) @ proj_down      (rank r ≥ 0)

x: ``[M, K]`` fp16/bf16; W packed ``qweight [N, K/2]`` uint8 (element ``2i`` in the low nibble of byte ``i``):

* ``int4``: signed codes, ``W = code * s`` with ``wscales [N, K/G]`` (bf16/fp16/fp32), G ∈ {64, 128};
* ``int4_asym``: unsigned codes and ``wzeros [N, K/G]`` uint8, ``W = (code - z) * s``;
* ``nvfp4``: E2M1 codes, ``wscales [N, K/16]`` E4M3 and ``wtscale`` fp32, ``W = e2m1(code) * (s_b * s_t)``.

Each weight tile is dequantized in fp32 (same operation order as :func:`vqsuite.kernels.reference.dequantize_weight`),
rounded to x's dtype and fed to a 16-bit ``tl.dot`` with an fp32 accumulator. The rank-r up-projection is one more
K-slab of the same accumulator (``t [M, r]`` against ``proj_up [N, r]``); bias is added in the epilogue and the
output is written in x's dtype. The down-projection ``t = (x/λ) @ proj_down`` is a tiny separate Triton kernel
(``_lowrank_down``: one read of x, 1/λ in registers, K split over programs that add fp32 partial sums atomically);
the GEMM applies 1/λ to its own x tiles in registers, so ``x/λ`` is never written to memory. Both round ``x/λ`` to
x's dtype exactly as torch does, and the GEMM rounds ``t`` to x's dtype once before its K-slab.

Two launch shapes: a tiled GEMM (M > 16, grouped tile order for L2 reuse) and a memory-bound split-K variant for
M ≤ 16 (``BLOCK_M = 16``, K cut into chunks so that enough programs stream the weight; fp32 partial sums go to a
workspace that a small epilogue kernel reduces, adding the bias). Either shape may run with swapped operands
(``SWAP_AB``: ``y^T = W x^T``, the dequantized weight tile as the MMA's A operand and N in its M dimension, which
lets 16-token tiles use Hopper's wgmma); the CUDA autotuner picks block sizes and the operand order. The plain-PyTorch
twin with exactly this math is :func:`vqsuite.kernels.reference.gemm_w4a16_reference`.

The jitted kernels are built per mode: compiled for CUDA tensors, interpreted for CPU tensors (``TRITON_INTERPRET=1``
is only read when a kernel is decorated, so this module decorates its plain functions itself, once per mode, and
does not care when triton was first imported). Interpreter trap: ``tl.dot`` on bf16 operands is wrong under the
interpreter (fp16/fp32 are fine), so interpreted kernels upcast both dot operands to fp32 after rounding them to x's
dtype: products of two 16-bit values are exact in fp32, so this is the same math as a 16-bit MMA. A second trap: the
interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest even, so interpreted bf16 kernels round by
hand (integer arithmetic on the fp32 bits) before each cast; compiled kernels use the hardware's RNE cast.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

#: weight formats this family executes, and the groups it takes for each
SUPPORTED_GROUPS: dict[str, tuple[int, ...]] = {"int4": (64, 128), "int4_asym": (64, 128), "nvfp4": (16,)}
#: kernel-side format ids (constexpr)
FMT_IDS: dict[str, int] = {"int4": 0, "int4_asym": 1, "nvfp4": 2}
#: activation dtypes (the MMA operand dtype); fp32 would mean TF32 on the GPU, which is not this math
X_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
#: M at or below which the split-K (GEMV-shaped) variant runs
SMALL_M = 16
#: largest low-rank branch handled in-kernel
MAX_RANK = 256
#: K chunk granularity of split-K (a multiple of every BLOCK_K in the configs)
SPLIT_K_QUANTUM = 256


# ----------------------------------------------------------------------------------------------- kernel bodies
# Plain functions: decorated by _kernels(interpret) once per mode. Everything is inlined (no jitted helpers) so the
# two decorations never share a global name.
def _w4a16_gemm(
    X,  # [M, K] x or xs = x/λ, fp16/bf16, row stride stride_xm
    QW,  # [N, K/2] uint8
    S,  # [N, K/G] scales (16/32-bit float; uint8 E4M3 bits for nvfp4)
    Z,  # [N, K/G] uint8 zero points (int4_asym) or a dummy
    TS,  # [1] fp32 tensor scale (nvfp4) or a dummy
    LAM,  # [K] smoothing λ in x's dtype, or a dummy
    T,  # [M, R] fp32 low-rank activations t = (x/λ) @ proj_down (rounded to x's dtype here), or a dummy
    UP,  # [N, R] proj_up in x's dtype, or a dummy
    BIAS,  # [N] bias in x's dtype, or a dummy
    Y,  # [M, N] output (x's dtype) when SPLIT_K == 1; [SPLIT_K, M, N] fp32 workspace otherwise
    M,
    N,
    K,
    R,
    K_PER_SPLIT,
    stride_xm,
    G: tl.constexpr,
    FMT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_LR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    RNE_BF16: tl.constexpr,
    W_MAX: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    XDT = X.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped tile order: GROUP_M row-tiles share each weight column-tile while it is hot in L2
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    KG = K // G

    # SWAP_AB computes y^T = W x^T: the dequantized weight tile is the MMA's A operand (it may stay in registers on
    # Hopper's wgmma) and N fills the MMA's M dimension, so a 16-token tile still uses the wide instruction
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        # ---- activations (and 1/λ, rounded to x's dtype like torch's x / λ)
        kk = k0 + offs_k
        k_ok = kk < k_end
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_SMOOTH:
            lam = tl.load(LAM + kk, mask=k_ok, other=1.0)
            xf = tl.math.div_rn(x.to(tl.float32), lam.to(tl.float32)[None, :])
            if RNE_BF16:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even by hand first
                xb = xf.to(tl.int32, bitcast=True)
                xf = ((xb + 0x7FFF + ((xb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            x = xf.to(XDT)
        # ---- packed codes -> [BLOCK_N, BLOCK_K] nibbles (low nibble first)
        kb = k0 // 2 + offs_kb
        p = tl.load(
            QW + offs_n[:, None] * (K // 2) + kb[None, :], mask=n_ok[:, None] & (kb < k_end // 2)[None, :], other=0
        )
        p = p.to(tl.int32)
        codes = tl.reshape(tl.join(p & 15, p >> 4), (BLOCK_N, BLOCK_K))
        # ---- code values in fp32
        if FMT == 0:
            v = ((codes ^ 8) - 8).to(tl.float32)  # sign-extend 4-bit two's complement
        elif FMT == 1:
            v = codes.to(tl.float32)
        else:
            # E2M1 bits -> fp32 bits: magnitude code c = 2e + m (e ≥ 1) is 2^(e-1) * (1 + m/2), i.e. fp32 bits
            # (c + 252) << 22; c = 1 is 0.5 (126 << 23) and c = 0 is 0; the sign moves from bit 3 to bit 31
            c = codes & 7
            bits = tl.where(c > 1, (c + 252) << 22, c * (252 << 22))
            v = (bits | ((codes & 8) << 28)).to(tl.float32, bitcast=True)
        # ---- group scales (and zero points), broadcast over their group
        if G >= BLOCK_K:
            gidx = k0 // G
            s = tl.load(S + offs_n * KG + gidx, mask=n_ok, other=0)
            if FMT == 2:
                s = s.to(tl.int32)
            else:
                s = s.to(tl.float32)
            if FMT == 1:
                z = tl.load(Z + offs_n * KG + gidx, mask=n_ok, other=0).to(tl.float32)
                v = v - z[:, None]
        else:
            gidx = k0 // G + tl.arange(0, BLOCK_K // G)
            gmask = n_ok[:, None] & (gidx < KG)[None, :]
            s = tl.load(S + offs_n[:, None] * KG + gidx[None, :], mask=gmask, other=0)
            if FMT == 2:
                s = s.to(tl.int32)
            else:
                s = s.to(tl.float32)
            if FMT == 1:
                z = tl.load(Z + offs_n[:, None] * KG + gidx[None, :], mask=gmask, other=0).to(tl.float32)
                v = tl.reshape(tl.reshape(v, (BLOCK_N, BLOCK_K // G, G)) - z[:, :, None], (BLOCK_N, BLOCK_K))
        if FMT == 2:
            # E4M3 bits -> fp32 exactly: (8 + m) * 2^(e - 10), subnormal m * 2^-9; then times the tensor scale
            se = (s >> 3) & 15
            sm = (s & 7).to(tl.float32)
            p2 = ((se + 117) << 23).to(tl.float32, bitcast=True)  # 2^(se - 10)
            sv = tl.where(se == 0, sm * 0.001953125, (8.0 + sm) * p2)
            sv = tl.where((s & 128) != 0, -sv, sv)
            s = sv * tl.load(TS)
        if G >= BLOCK_K:
            w = v * s[:, None]
        else:
            w = tl.reshape(tl.reshape(v, (BLOCK_N, BLOCK_K // G, G)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        w = tl.minimum(tl.maximum(w, -W_MAX), W_MAX)  # saturate like the reference dequantize, then round
        if RNE_BF16:
            wb = w.to(tl.int32, bitcast=True)
            w = ((wb + 0x7FFF + ((wb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        w = w.to(XDT)
        if DOT_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP_AB:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(x, tl.trans(w))
    # ---- low-rank up-projection: one more K-slab of the same accumulator (first split only)
    if HAS_LR:
        if pid_k == 0:
            for r0 in range(0, R, BLOCK_K):
                rr = r0 + offs_k
                r_ok = rr < R
                t = tl.load(T + offs_m[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                if RNE_BF16:
                    tb = t.to(tl.int32, bitcast=True)
                    t = ((tb + 0x7FFF + ((tb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                t = t.to(XDT)  # t is a 16-bit tensor in the twin: one rounding of the fp32 sum
                up = tl.load(UP + offs_n[:, None] * R + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
                if DOT_F32:
                    t = t.to(tl.float32)
                    up = up.to(tl.float32)
                if SWAP_AB:
                    acc += tl.dot(up, tl.trans(t))
                else:
                    acc += tl.dot(t, tl.trans(up))
    if SWAP_AB:
        acc = tl.trans(acc)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if RNE_BF16:
            ab = acc.to(tl.int32, bitcast=True)
            acc = ((ab + 0x7FFF + ((ab >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        tl.store(Y + offs_m[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=out_mask)
    else:
        tl.store(Y + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)


def _splitk_epilogue(
    WS,  # [SPLIT_K, M*N] fp32 partial sums
    BIAS,  # [N] in the output dtype, or a dummy
    Y,  # [M*N] output
    MN,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(WS + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % N, mask=ok, other=0.0).to(tl.float32)
    if RNE_BF16:
        ab = acc.to(tl.int32, bitcast=True)
        acc = ((ab + 0x7FFF + ((ab >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


def _lowrank_down(
    X,  # [M, K] x, fp16/bf16, row stride stride_xm
    LAM,  # [K] smoothing λ in x's dtype, or a dummy
    PD,  # [K, R] proj_down in x's dtype
    TACC,  # [M, R] fp32, zero-initialised: receives (x/λ) @ proj_down
    M,
    K,
    R,
    K_PER_SPLIT,
    stride_xm,
    HAS_SMOOTH: tl.constexpr,
    DOT_F32: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    XDT = X.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    k_start = tl.program_id(1) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_end
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_SMOOTH:  # the same x/λ, rounded to x's dtype, as the GEMM's x tiles
            lam = tl.load(LAM + kk, mask=k_ok, other=1.0)
            xf = tl.math.div_rn(x.to(tl.float32), lam.to(tl.float32)[None, :])
            if RNE_BF16:
                xb = xf.to(tl.int32, bitcast=True)
                xf = ((xb + 0x7FFF + ((xb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            x = xf.to(XDT)
        pd = tl.load(PD + kk[:, None] * R + offs_r[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
            pd = pd.to(tl.float32)
        acc += tl.dot(x, pd)
    tl.atomic_add(TACC + offs_m[:, None] * R + offs_r[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


# ----------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class _Kernels:
    gemm_large: object  # autotuned (CUDA) or plain jitted (interpreter)
    gemm_small: object
    epilogue: object
    lowrank_down: object
    interpret: bool


#: fixed launch parameters in interpreter mode (small tiles keep the CPU interpreter fast)
INTERPRET_LARGE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "SWAP_AB": False}
INTERPRET_SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "SWAP_AB": True}
#: split-K chunk in interpreter mode (small, so the tests cross several splits)
INTERPRET_SPLIT_QUANTUM = 64


#: CUDA autotune candidates ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB)``. Each was compiled ahead
#: of time for sm_90 (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``, no GPU needed; see
#: ``tests/kernels/test_triton_w4a16.py::test_sm90_assembly``) for int4, int4_asym and nvfp4 with smoothing, low rank
#: and bias: none spills registers, and all but the one unswapped small-M config (kept as an mma.sync alternative for
#: the autotuner) use Hopper's wgmma (HGMMA in the SASS). Wider K tiles (64 for M > 16, 128+ for M ≤ 16) spilled.
SMALL_M_CONFIGS: tuple[tuple[int, int, int, int, int, bool], ...] = (
    (16, 64, 64, 4, 4, True),
    (16, 128, 64, 4, 4, True),
    (16, 256, 64, 8, 4, True),
    (16, 64, 64, 4, 4, False),
)
LARGE_M_CONFIGS: tuple[tuple[int, int, int, int, int, bool], ...] = (
    (128, 128, 32, 8, 3, False),
    (128, 128, 32, 8, 3, True),
    (64, 128, 32, 4, 3, True),
    (64, 256, 32, 8, 3, True),
    (128, 128, 32, 8, 4, False),
)


def _cuda_configs(small: bool) -> list:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1 if small else 8, "SWAP_AB": swap},
            num_warps=w,
            num_stages=st,
        )
        for bm, bn, bk, w, st, swap in (SMALL_M_CONFIGS if small else LARGE_M_CONFIGS)
    ]


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        gemm = triton.jit(_w4a16_gemm)
        epilogue = triton.jit(_splitk_epilogue)
        down = triton.jit(_lowrank_down)
    if interpret:
        return _Kernels(gemm, gemm, epilogue, down, True)
    key = ["M", "N", "K", "R", "G", "FMT", "SPLIT_K", "HAS_LR"]
    large = triton.autotune(configs=_cuda_configs(False), key=key)(gemm)
    small = triton.autotune(configs=_cuda_configs(True), key=key)(gemm)
    return _Kernels(large, small, epilogue, down, False)


# ----------------------------------------------------------------------------------------------- host side
def accepts(x: torch.Tensor, ops) -> bool:  # noqa: ANN001 - QLinearOperands or a frozen layer
    """True for frozen linear layers with a weight-only ``int4``/``int4_asym`` (g64/g128) or ``nvfp4`` spec."""
    from vqsuite.kernels.operands import try_operands

    ops = try_operands(ops)
    if ops is None or ops.act is not None:
        return False
    if ops.weight not in SUPPORTED_GROUPS or ops.weight_group_size not in SUPPORTED_GROUPS[ops.weight]:
        return False
    n, k = ops.gemm_shape
    if x.dtype not in X_DTYPES or x.shape[-1] != k or x.device != ops.qweight.device or k % 2:
        return False
    if x.numel() == 0:  # no rows: nothing to launch, the reference returns the empty output
        return False
    if ops.weight == "nvfp4" and ops.wscales.dtype != torch.float8_e4m3fn:
        return False
    if ops.weight != "nvfp4" and not ops.wscales.dtype.is_floating_point:
        return False
    return ops.rank <= MAX_RANK


def _split_k(m: int, n: int, k: int, block_n: int, interpret: bool, device: torch.device) -> tuple[int, int]:
    """``(SPLIT_K, K_PER_SPLIT)`` for the small-M path: enough programs to keep every SM streaming weights."""
    quantum = INTERPRET_SPLIT_QUANTUM if interpret else SPLIT_K_QUANTUM
    chunks = -(-k // quantum)
    if interpret:
        split = min(chunks, 3)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = -(-n // block_n)
        split = max(1, min(chunks, (2 * sms) // max(tiles, 1), 16))
    per = -(-chunks // split) * quantum
    split = -(-k // per)
    return split, per


#: down-projection tiles (CUDA / interpreter) and the K chunk each program sums before its atomic add
DOWN_BLOCK_M, DOWN_BLOCK_K, DOWN_K_QUANTUM = 64, 64, 256
INTERPRET_DOWN = {"BLOCK_M": 16, "BLOCK_K": 32}
INTERPRET_DOWN_QUANTUM = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lowrank_down_launch(kern, x2, lam, has_smooth, pd, rank, interpret) -> torch.Tensor:
    """``t = (x/λ) @ proj_down`` as fp32 sums ``[M, r]``: one read of x, K split over programs (atomic adds)."""
    m, k = x2.shape
    t = torch.zeros(m, rank, device=x2.device, dtype=torch.float32)
    block_r = max(16, 1 << (rank - 1).bit_length())
    if interpret:
        bm, bk, quantum = INTERPRET_DOWN["BLOCK_M"], INTERPRET_DOWN["BLOCK_K"], INTERPRET_DOWN_QUANTUM
        m_blocks = _cdiv(m, bm)
        split = min(_cdiv(k, quantum), 3)
    else:
        # 64-row tiles use wgmma; with a rank above 64 their fp32 accumulator spills on sm_90, so 16 rows then
        bm = DOWN_BLOCK_M if m > SMALL_M and block_r <= 64 else 16
        bk, quantum = DOWN_BLOCK_K, DOWN_K_QUANTUM
        m_blocks = _cdiv(m, bm)
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
        split = max(1, min(_cdiv(k, quantum), _cdiv(2 * sms, m_blocks)))
    per = _cdiv(_cdiv(k, split), quantum) * quantum
    split = _cdiv(k, per)
    kern.lowrank_down[(m_blocks, split)](
        x2,
        lam,
        pd,
        t,
        m,
        k,
        rank,
        per,
        x2.stride(0),
        HAS_SMOOTH=has_smooth,
        DOT_F32=interpret,
        RNE_BF16=interpret and x2.dtype == torch.bfloat16,
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_R=block_r,
    )
    return t


def gemm_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    fmt: str,
    group_size: int,
    *,
    wzeros: torch.Tensor | None = None,
    wtscale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    proj_down: torch.Tensor | None = None,
    proj_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    split_k: bool | None = None,
    swap_ab: bool | None = None,
) -> torch.Tensor:
    """Fused W4A16 linear: ``x [..., K]`` (fp16/bf16) -> ``[..., N]`` in x's dtype.

    qweight ``[N, K/2]`` uint8; wscales ``[N, K/G]``; wzeros ``[N, K/G]`` uint8 (int4_asym); wtscale ``[]`` fp32
    (nvfp4); smooth ``[K]``; proj_down ``[K, r]``; proj_up ``[N, r]``; bias ``[N]``. ``split_k`` forces
    (True/False) the split-K variant; by default it runs for M ≤ 16. ``swap_ab`` forces the operand order in
    interpreter mode (tests); on CUDA the autotuner picks it.
    """
    if fmt not in FMT_IDS:
        raise ValueError(f"fmt={fmt!r} is not a W4A16 format ({', '.join(FMT_IDS)})")
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} must be float16 or bfloat16")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    dt = x.dtype
    y = torch.empty(m, n, device=x.device, dtype=dt)
    if m == 0:
        return y.reshape(*lead, n)
    interpret = x.device.type == "cpu"
    kern = _kernels(interpret)
    dummy = torch.empty(1, device=x.device, dtype=dt)
    has_lr = proj_down is not None and proj_up is not None and proj_down.shape[-1] > 0
    has_smooth = smooth is not None
    lam = smooth.to(dt).contiguous() if has_smooth else dummy
    if has_lr:
        rank = int(proj_up.shape[-1])
        up = proj_up.to(dt).contiguous()
        t = _lowrank_down_launch(kern, x2, lam, has_smooth, proj_down.to(dt).contiguous(), rank, interpret)
    else:
        t, up, rank = dummy, dummy, 0
    s = wscales.view(torch.uint8) if fmt == "nvfp4" else wscales
    z = wzeros if (fmt == "int4_asym") else dummy
    if fmt == "int4_asym" and wzeros is None:
        raise ValueError("int4_asym needs wzeros")
    ts = wtscale.reshape(1).float() if fmt == "nvfp4" else dummy
    if fmt == "nvfp4" and wtscale is None:
        raise ValueError("nvfp4 needs wtscale")
    b = bias.to(dt).contiguous() if bias is not None else dummy
    small = (m <= SMALL_M) if split_k is None else bool(split_k)
    common = dict(
        G=int(group_size),
        FMT=FMT_IDS[fmt],
        HAS_SMOOTH=has_smooth,
        HAS_LR=has_lr,
        HAS_BIAS=bias is not None,
        DOT_F32=interpret,
        RNE_BF16=interpret and dt == torch.bfloat16,
        W_MAX=float(torch.finfo(dt).max),
    )
    args = (x2, qweight.contiguous(), s.contiguous(), z, ts, lam, t, up, b)
    gemm = kern.gemm_small if small else kern.gemm_large
    fixed = dict(INTERPRET_SMALL if small else INTERPRET_LARGE) if interpret else {}
    if interpret and swap_ab is not None:
        fixed["SWAP_AB"] = bool(swap_ab)
    if small:
        split, per = _split_k(m, n, k, INTERPRET_SMALL["BLOCK_N"] if interpret else 64, interpret, x.device)
    else:
        split, per = 1, k
    out = y if split == 1 else torch.empty(split, m, n, device=x.device, dtype=torch.float32)

    def grid(meta):
        return (-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]), split)

    gemm[grid](*args, out, m, n, k, rank, per, x2.stride(0), SPLIT_K=split, **common, **fixed)
    if split > 1:
        block = 1024
        kern.epilogue[(-(-(m * n) // block),)](
            out,
            b,
            y,
            m * n,
            n,
            SPLIT_K=split,
            HAS_BIAS=bias is not None,
            RNE_BF16=interpret and dt == torch.bfloat16,
            BLOCK=block,
        )
    return y.reshape(*lead, n)


@torch.compiler.disable  # torch.compile treats the launch as opaque (a graph break) instead of tracing the host code
def qlinear(x: torch.Tensor, ops) -> torch.Tensor:  # noqa: ANN001 - QLinearOperands or a frozen layer
    """Frozen ``QLinear``/``QLinearLowRank`` forward through :func:`gemm_w4a16`: ``x [..., K] -> [..., N]``."""
    from vqsuite.kernels.operands import as_operands

    ops = as_operands(ops)
    return gemm_w4a16(
        x,
        ops.qweight,
        ops.wscales,
        ops.weight,
        ops.weight_group_size,
        wzeros=ops.wzeros,
        wtscale=ops.wtscale,
        smooth=ops.smooth,
        proj_down=ops.proj_down,
        proj_up=ops.proj_up,
        bias=ops.bias,
    )
