"""The CPU family of the ``qlinear`` op: frozen quantized linears through torch's packed CPU GEMMs.

Routes (chosen per layer by :func:`plan_for`, the weight layout packed once by :func:`pack`):

========================  ==========================================================  ================================
weights (stored)          kernel                                                      packed copy (non-persistent)
========================  ==========================================================  ================================
int4 / int3 / int2, sym.  ``vqsuite::int4pack_linear`` (aten                           ``[N, K/2]`` uint8 + ``[K/G', N,
groups 32/64/128/256 or   ``_weight_int4pack_mm_for_cpu``): codes ``q = c + 8``,       2]`` bf16 scales/zeros
per channel (G' = the     ``w = (q - 8) * s + 0``; per-channel scales repeat over
largest of 256..32        groups of G'. Needs ``N % 16 == 0``.
dividing K)
int8 / int6, per channel  ``vqsuite::int8pack_linear`` (aten ``_weight_int8pack_mm``)  ``[N]`` bf16 scales (codes are
                                                                                      read from ``qweight`` itself)
anything else             declined: the reference runs (asymmetric zero points, fp8, nvfp4, mxfp4, grouped int8,
                          ``N % 16 != 0`` for 4-bit, int4 groups of 16)
========================  ==========================================================  ================================

Both kernels take bf16 activations (their fp32 paths are 5-20x slower here): ``x`` (after ``x / λ`` and the
activation fake-quant) is rounded to bf16 at the op boundary and the result comes back in x.dtype. With bf16
scales (the 4-bit presets) the dequantized weight is bit-identical to the reference's (``tests/kernels/
test_cpu_qlinear.py`` checks it on fp32 inputs, where the op is exact); fp32 scales round to bf16 once.

Activations (``act`` set): choice table, by ``torch.backends.cpu.get_cpu_capability()`` and the CPU's VNNI/AMX flags
(``torch.cpu._is_vnni_supported``/``_is_amx_tile_supported``), measured 2026-12-03 on an AVX2 AMD EPYC (BENCHMARKS.md
"CPU kernels"):

=====================================  =========================================================================
case                                   route
=====================================  =========================================================================
INT8 per-token/static acts, INT8/INT6  ``"int_mm"``: per-token INT8 codes (``act_quant_lowrank_reference``), exact int32
per-channel weights, capability        ``vqsuite::int8_int_mm`` (``torch._int_mm``), fp32 rescale
AVX512 with VNNI or AMX                ``acc * s_a[m] * s_w[n]`` — the reference's 8-bit math exactly. Not measured on
                                       such a machine here: chosen because oneDNN's u8s8 kernels use VNNI/AMX there.
any other activation spec (AVX2,       ``"fake_quant"``: the reference's activation fake-quant (bit-identical codes and
AVX512 without VNNI, int4/fp8/nvfp4    scales), then the weight-only kernel above on the dequantized activations. INT4
acts, per-group acts)                  activations are exact on this route's INT8 grid; 4-bit presets therefore cost
                                       W4A16 + one activation pass.
=====================================  =========================================================================

Rejected on AVX2 (measured): ``torch._int_mm`` is 15-20x slower than fp32 ``F.linear`` at M >= 16 (no VNNI);
fbgemm's ``quantized::linear_dynamic`` is the fastest GEMM (3.8x fp32 at M=128) but quantizes activations per
tensor and, without ``reduce_range``, saturates ``vpmaddubsw`` int16 pairs (errors up to 20% of the output range);
with ``reduce_range`` activations lose a bit (7-bit): neither is our W8A8 math.

When ``auto`` takes the family (:data:`MAX_M`; measured 2026-12-03, AVX2 EPYC, 1 thread, fp32 inputs; BENCHMARKS.md
"CPU kernels"). Against the reference it replaces (per-call dequantize + fp32 ``F.linear``):

==============================  ==================================================  ==================================
weight kernel (any act route    CPU family                                          reference
but ``int_mm``)
==============================  ==================================================  ==================================
int8pack (w8a16, w8a8, w6a6)    M < 64, or any M on layers of > 2^20 weights         M >= 64 on layers of <= 2^20
                                (4096²: 1.8-70x faster than the reference)           weights (1024² M=128: 1.2-1.5x;
                                                                                    M=64 is borderline: runs split)
int4pack (w4a16, w4a4,          M < 512, or any M on layers of > 2^20 weights        M >= 512 on layers of <= 2^20
svdquant-int4, w3/w2)           (1024² M=128: 1.1-1.3x; 4096² M=128: 2-4x)          weights (256x1024 M=512: ~2x)
==============================  ==================================================  ==================================

Neither beats FP32 ``F.linear`` on small layers or at M >= 64: the packed kernels win against FP32 only at M <= 16 on
large layers (4096², 3072x12288: 1.1-2.8x with one thread); see BENCHMARKS.md. No dequantize-once bf16/fp32 GEMM
route: bf16 ``F.linear`` is 2-7x slower than fp32 here (no AVX512-BF16) except at M=1 on the largest layers, and the
fp32 route *is* the reference (its dequantize costs more than int4pack's whole GEMM on large layers). Per-call
overhead (~60-100 us at M=1) is cut by the layer caching its (kernel, operands) choice and by calling the aten ops
directly in eager mode (``ops.py``).

The SVDQuant low-rank branch ``(x/λ) @ proj_down @ proj_up^T`` (x.dtype, like the reference) and the bias are added in
the same call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vqsuite.formats import get_format
from vqsuite.kernels import reference
from vqsuite.kernels.cpu import ops as cpu_ops
from vqsuite.kernels.operands import QLinearOperands, as_operands, try_operands

#: group sizes ``_weight_int4pack_mm_for_cpu`` takes
INT4PACK_GROUPS: tuple[int, ...] = (256, 128, 64, 32)
#: ``_convert_weight_to_int4pack_for_cpu`` needs N divisible by this
INT4PACK_N_MULTIPLE = 16
#: ``_weight_int8pack_mm`` needs K divisible by this: with K = 1..7 it segfaults (torch 2.14, AVX2), with
#: K = 9, 10, 12, 20, 28 it returns wrong values (measured 2026-12-03; K = 8, 16, 24, 32, 40, 48 are exact)
INT8PACK_K_MULTIPLE = 8
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: weight kernel -> (M, N·K): ``auto`` leaves a call with at least M rows of x on a layer of at most N·K weights to
#: the reference (per-call dequantize + fp32 ``F.linear``), measured faster there on the AVX2 EPYC (BENCHMARKS.md
#: "CPU kernels", 2026-12-03): the packed kernels compute ~2x slower per MAC than fp32 sgemm once M is large, while
#: the reference's per-call dequantize is cheap for small layers (and very slow for big ones: 200-400 ms at 4096²).
#: M values are powers of two (a layer caches its choice per ``M.bit_length()``). ``prefer("triton")`` ignores it.
MAX_M: dict[str, tuple[int, int]] = {"int8pack": (64, 1 << 20), "int4pack": (512, 1 << 20)}


@dataclass(frozen=True)
class CpuPlan:
    """How the CPU family runs one layer: weight kernel (``"int4pack"``/``"int8pack"``), its group, act route."""

    weight_kernel: str
    group: int | None  # int4pack group G' (per-channel scales repeat over it); None for int8pack
    act_route: str  # "none" | "fake_quant" | "int_mm"


@functools.cache
def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` with ``+VNNI``/``+AMX`` appended when the CPU has them."""
    cap = torch.backends.cpu.get_cpu_capability()
    for flag, probe in (("VNNI", "_is_vnni_supported"), ("AMX", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                cap += f"+{flag}"
        except Exception:  # a probe missing on this build: treat as absent
            pass
    return cap


def int8_gemm_is_fast(capability: str | None = None) -> bool:
    """Whether exact INT8xINT8 -> INT32 (``torch._int_mm``) beats bf16 on this CPU: AVX512 with VNNI or AMX."""
    cap = capability or cpu_capability()
    return cap.startswith("AVX512") and ("+VNNI" in cap or "+AMX" in cap)


def plan_for(
    ops: QLinearOperands, x: torch.Tensor | None = None, *, capability: str | None = None, m_gate: bool = True
) -> CpuPlan | str:
    """The CPU plan for a frozen layer's operands (and input ``x``), or the reason the family declines.

    ``m_gate``: decline where :data:`MAX_M` says the reference is faster (``auto``); off under ``prefer("triton")``,
    which demands a fast kernel."""
    n, k = ops.gemm_shape
    fmt = get_format(ops.weight)
    if fmt.kind != "int" or fmt.asymmetric or fmt.offset:
        return f"weight={ops.weight}: only symmetric integer weights (zero-point and mid-rise forms differ)"
    if ops.wtscale is not None or not ops.wscales.dtype.is_floating_point:
        return "weight scales are not plain float scales"
    g = ops.weight_group_size or k
    if fmt.storage_bits == 4:
        if n % INT4PACK_N_MULTIPLE:
            return f"N={n} is not a multiple of {INT4PACK_N_MULTIPLE} (int4pack layout)"
        if g == k:
            g4 = next((c for c in INT4PACK_GROUPS if k % c == 0), None)
            if g4 is None:
                return f"per-channel K={k} is not a multiple of 32"
        elif g in INT4PACK_GROUPS and k % g == 0:
            g4 = g
        else:
            return f"weight_group_size={g}: int4pack takes groups of {INT4PACK_GROUPS}"
        weight_kernel, group = "int4pack", g4
    elif g == k:
        if k % INT8PACK_K_MULTIPLE:
            return f"K={k} is not a multiple of {INT8PACK_K_MULTIPLE} (int8pack crashes or miscomputes there)"
        weight_kernel, group = "int8pack", None
    else:
        return f"weight={ops.weight} with groups of {g}: int8pack takes per-channel scales only"
    act_route = "none"
    if ops.act is not None and ops.act_mode != "none":
        act_route = "fake_quant"
        if (
            ops.act == "int8"
            and ops.act_mode in ("dynamic_per_token", "static")
            and weight_kernel == "int8pack"
            and int8_gemm_is_fast(capability)
        ):
            act_route = "int_mm"
    if x is not None:
        m = x.numel() // k if x.ndim and x.shape[-1] == k else 0
        m_min, nk_max = MAX_M.get(weight_kernel, (0, 0)) if m_gate and act_route != "int_mm" else (0, 0)
        if m_min and m >= m_min and n * k <= nk_max:
            return f"M={m} >= {m_min} on N*K={n * k} <= {nk_max}: the reference is measured faster ({weight_kernel})"
        if x.device.type != "cpu" or ops.qweight.device.type != "cpu":
            return "not on the CPU"
        if x.dtype not in X_DTYPES:
            return f"x.dtype={x.dtype}"
        if x.ndim == 0 or x.shape[-1] != k or x.numel() == 0:
            return f"x shape {tuple(x.shape)} does not fit K={k}"
        if torch.is_grad_enabled() and x.requires_grad:
            return "x requires grad: the CPU kernels are not differentiable, the reference path is"
    return CpuPlan(weight_kernel, group, act_route)


def accepts(x: torch.Tensor, ops: QLinearOperands | None = None, layer=None) -> bool:  # noqa: ANN001
    from vqsuite.kernels.dispatch import current_preference

    rec = try_operands(ops if ops is not None else layer)
    return rec is not None and isinstance(plan_for(rec, x, m_gate=current_preference() != "triton"), CpuPlan)


def _per_group_scales(ops: QLinearOperands, group: int) -> torch.Tensor:
    """``wscales [N, K/G]`` -> ``[N, K/group]`` (per-channel scales repeated over int4pack groups)."""
    n, k = ops.gemm_shape
    s = ops.wscales.reshape(n, -1)
    if s.shape[1] == k // group:
        return s
    return s.repeat_interleave(k // group // s.shape[1], dim=1)


@torch.no_grad()
def pack(ops: QLinearOperands, *, capability: str | None = None) -> dict[str, torch.Tensor]:
    """The CPU kernels' weight layout, built once from the stored codes (see the module docstring)."""
    plan = plan_for(ops, capability=capability)
    if not isinstance(plan, CpuPlan):
        raise ValueError(f"{ops.name}: the CPU family cannot pack this layer: {plan}")
    n, k = ops.gemm_shape
    if plan.weight_kernel == "int4pack":
        codes = reference.unpack_weight_codes(ops.qweight, ops.weight)  # int8 in [-8, 7]
        q = (codes.to(torch.int32) + 8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        s = _per_group_scales(ops, plan.group).float().t()  # [K/G', N]
        scales_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).to(cpu_ops.KERNEL_DTYPE).contiguous()
        return {"int4_weight": packed, "int4_scales_zeros": scales_zeros}
    out = {"int8_scales": ops.wscales.reshape(n).to(cpu_ops.KERNEL_DTYPE).contiguous()}
    if plan.act_route == "int_mm":
        out["int8_scales_fp32"] = ops.wscales.reshape(n).float().contiguous()
    return out


def _weight_gemm(
    xq: torch.Tensor, ops: QLinearOperands, plan: CpuPlan, packed: dict[str, torch.Tensor]
) -> torch.Tensor:
    n, _ = ops.gemm_shape
    compiling = torch.compiler.is_compiling()
    if plan.weight_kernel == "int4pack":
        fn4 = cpu_ops.int4pack_linear if compiling else cpu_ops.int4pack_linear_eager
        return fn4(xq, packed["int4_weight"], packed["int4_scales_zeros"], plan.group, n)
    fn8 = cpu_ops.int8pack_linear if compiling else cpu_ops.int8pack_linear_eager
    return fn8(xq, ops.qweight, packed["int8_scales"])


def qlinear(x: torch.Tensor, ops, *, capability: str | None = None) -> torch.Tensor:  # noqa: ANN001
    """Frozen ``QLinear``/``QLinearLowRank`` forward on the CPU: ``x [..., K] -> [..., N]`` in x.dtype.

    ``ops.packed`` holds :func:`pack`'s tensors (the layer keeps them); packed here, per call, if absent.
    """
    ops = as_operands(ops)
    plan = plan_for(ops, x, capability=capability, m_gate=False)
    if not isinstance(plan, CpuPlan):
        raise ValueError(f"{ops.name}: the CPU family cannot run this call: {plan}")
    packed = ops.packed if ops.packed is not None else pack(ops, capability=capability)
    n, k = ops.gemm_shape
    dt = x.dtype
    x2 = x.reshape(-1, k)  # may be a strided view ([1, K, M] transposed): the ops make their A contiguous
    xs = x2 / ops.smooth.to(dt) if ops.smooth is not None else x2
    if plan.act_route == "int_mm":
        codes, sa, _ = reference.act_quant_lowrank_reference(
            xs, act=ops.act, act_mode=ops.act_mode, static_scale=_static_scale(ops)
        )
        acc = cpu_ops.int8_int_mm(codes, ops.qweight)
        y = (acc.float() * sa[:, :1] * packed["int8_scales_fp32"][None, :]).to(dt)
    else:
        xq = reference.fake_quantize_input(xs, ops) if plan.act_route == "fake_quant" else xs
        y = _weight_gemm(xq.detach(), ops, plan, packed)
    if ops.bias is not None:
        y = y + ops.bias.detach().to(dt)
    if ops.proj_down is not None and ops.proj_up is not None and ops.rank > 0:
        y = y + (xs @ ops.proj_down.detach().to(dt)) @ ops.proj_up.detach().to(dt).t()
    return y.reshape(*x.shape[:-1], n)


def _static_scale(ops: QLinearOperands) -> torch.Tensor | None:
    if ops.act_mode != "static":
        return None
    s = ops.act_scale
    if s is None or not bool(torch.isfinite(s).all()):
        raise RuntimeError(f"{ops.name}.input: static activation scale is not calibrated; quantize with calib_data")
    return s
