"""The 8-bit-MMA GEMM family (W8A8 INT8/FP8, W4A8, emulated W4A4 INT4 g64 / NVFP4 g16), run on CPU tensors by
Triton's interpreter, against its plain-PyTorch twin and against the reference path of frozen layers.

The kernels are jitted per mode (interpreted for CPU tensors) whatever ``TRITON_INTERPRET`` said when triton was
first imported; the dispatcher offers Triton for CPU tensors only while ``TRITON_INTERPRET=1``, so the
``interpret`` fixture sets it for one test's duration (monkeypatch) and every other test keeps its kernel choice.
Interpreter trap: ``tl.dot`` on bf16 operands is wrong under the interpreter; the kernels upcast their (already
bf16-rounded) low-rank operands to fp32 there, so bf16 is tested too. Layer-level comparisons run in fp16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed")

import vqsuite.kernels as vk  # noqa: E402
from vqsuite.config import QuantSpec, get_preset  # noqa: E402
from vqsuite.formats import pack_4bit, quantize  # noqa: E402
from vqsuite.kernels.reference import act_quant_lowrank_reference, gemm_mma8_reference  # noqa: E402
from vqsuite.nn.linear import QLinear, QLinearLowRank  # noqa: E402

#: kernel float output against its twin (same 8-bit products and scale order; fp32 summation order may differ)
MIN_SQNR_DB = 40.0
#: frozen layer, Triton path against the reference path (which rounds dequantized operands to 16 bits)
MIN_LAYER_SQNR_DB = 40.0

#: presets the family runs, all of them through triton.mma8
MMA8_PRESETS = ["w8a8", "w8a8-fp8", "w4a8", "w4a4", "nvfp4", "svdquant-int4", "svdquant-nvfp4", "svdquant-int4-w8a8"]

#: (weight format, weight group, act format, act mode, act group)
GEMM_CASES = [
    pytest.param("int8", None, "int8", "dynamic_per_token", None, id="w8a8_int8"),
    pytest.param("fp8_e4m3", None, "fp8_e4m3", "dynamic_per_token", None, id="w8a8_fp8"),
    pytest.param("int4", 64, "int8", "dynamic_per_token", None, id="w4a8_int4g64"),
    pytest.param("int4", 64, "fp8_e4m3", "dynamic_per_token", None, id="w4a8_int4g64_fp8act"),
    pytest.param("int4", 64, "int4", "dynamic_per_group", 64, id="w4a4_int4g64"),
    pytest.param("nvfp4", 16, "nvfp4", "dynamic_per_group", 16, id="w4a4_nvfp4"),
    pytest.param("int8", 32, "int4", "dynamic_per_group", 64, id="w8g32_a4g64"),
    pytest.param("int4", None, "int8", "dynamic_per_token", None, id="w4ch_a8"),
    pytest.param("nvfp4", 16, "fp8_e4m3", "dynamic_per_token", None, id="wnvfp4_afp8"),
    pytest.param("fp8_e4m3", None, "nvfp4", "dynamic_per_group", 16, id="wfp8_anvfp4"),
]
#: (M, K, N, rank, dtype): M=1, M not a multiple of the 16-row tile, K one group / several / a partial slab
SHAPES = [
    pytest.param(1, 64, 48, 0, torch.float16, id="M1-K64-N48-r0-fp16"),
    pytest.param(17, 256, 64, 32, torch.float16, id="M17-K256-N64-r32-fp16"),
    pytest.param(33, 128, 40, 32, torch.bfloat16, id="M33-K128-N40-r32-bf16"),
]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    noise = (ref - out).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def _weights(fmt: str, group: int | None, n: int, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, ::5] *= 4  # uneven groups
    qt = quantize(w, fmt, group_size=group, scale_dtype=torch.bfloat16)
    qweight = pack_4bit(qt.codes) if fmt in ("int4", "nvfp4") else qt.codes
    return {"qweight": qweight, "wscales": qt.scales, "wtscale": qt.tensor_scale}


def _acts(act: str, mode: str, group: int | None, m: int, k: int, rank: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    proj_down = (torch.randn(k, rank, generator=g) * 0.2).to(dtype) if rank else None
    return act_quant_lowrank_reference(x, act=act, act_mode=mode, group_size=group, proj_down=proj_down)


@pytest.mark.parametrize(("m", "k", "n", "rank", "dtype"), SHAPES)
@pytest.mark.parametrize(("wfmt", "wgroup", "act", "mode", "agroup"), GEMM_CASES)
def test_gemm_matches_twin(interpret, wfmt, wgroup, act, mode, agroup, m, k, n, rank, dtype) -> None:
    from vqsuite.kernels.triton.mma8 import gemm_mma8

    codes, scales, lowrank = _acts(act, mode, agroup, m, k, rank, dtype)
    wts = _weights(wfmt, wgroup, n, k)
    g = torch.Generator().manual_seed(2)
    proj_up = (torch.randn(n, rank, generator=g) * 0.2).to(dtype) if rank else None
    bias = torch.randn(n, generator=g).to(dtype) if m > 1 else None
    kw = dict(
        weight_fmt=wfmt, weight_group_size=wgroup, wtscale=wts["wtscale"], lowrank=lowrank, proj_up=proj_up,
        bias=bias, out_dtype=dtype,
    )  # fmt: skip
    y = gemm_mma8(codes, scales, wts["qweight"], wts["wscales"], **kw)
    y_ref = gemm_mma8_reference(codes, scales, wts["qweight"], wts["wscales"], **kw)
    assert y.shape == (m, n) and y.dtype == dtype
    assert sqnr_db(y_ref, y) >= MIN_SQNR_DB


@pytest.mark.parametrize(("m", "k"), [(1, 64), (17, 96), (33, 256)], ids=["M1-K64", "M17-K96", "M33-K256"])
def test_int8_accumulator_bit_exact(interpret, m: int, k: int) -> None:
    """Per-token x per-channel INT8: the int32 accumulator itself equals the twin's exact integer GEMM."""
    from vqsuite.kernels.triton.mma8 import gemm_mma8

    codes, scales, _ = _acts("int8", "dynamic_per_token", None, m, k, 0, torch.float16)
    codes[0, :4] = torch.tensor([127, -128, 127, -128], dtype=torch.int8)  # extreme codes
    wts = _weights("int8", None, 40, k)
    kw = dict(weight_fmt="int8", weight_group_size=None, raw_int32=True)
    acc = gemm_mma8(codes, scales, wts["qweight"], wts["wscales"], **kw)
    acc_ref = gemm_mma8_reference(codes, scales, wts["qweight"], wts["wscales"], **kw)
    assert acc.dtype == torch.int32 and torch.equal(acc, acc_ref)
    assert torch.equal(acc_ref.long(), codes.long() @ wts["qweight"].long().t())


@pytest.mark.parametrize(
    ("wfmt", "wgroup", "act", "agroup"),
    [("int4", 64, "int8", None), ("int4", 64, "int4", 64), ("int8", 32, "int4", 64), ("nvfp4", 16, "nvfp4", 16)],
    ids=["w4a8", "w4a4", "w8g32_a4g64", "nvfp4"],
)
def test_grouped_partial_sums_exact_with_unit_scales(interpret, wfmt, wgroup, act, agroup) -> None:
    """With every scale 1 the grouped paths add exact per-group 8-bit dot products of small integers (or E2M1
    values, multiples of 0.5), so the fp32 result is exact and equals the plain product of the codes."""
    from vqsuite.kernels.reference import _weight_operand
    from vqsuite.kernels.triton.mma8 import gemm_mma8

    m, k, n = 17, 128, 32
    mode = "dynamic_per_token" if agroup is None else "dynamic_per_group"
    codes, scales, _ = _acts(act, mode, agroup, m, k, 0, torch.float32)
    wts = _weights(wfmt, wgroup, n, k)
    ones_a = torch.ones_like(scales)
    ones_w = torch.ones(wts["wscales"].shape, dtype=torch.bfloat16)
    y = gemm_mma8(
        codes, ones_a, wts["qweight"], ones_w, weight_fmt=wfmt, weight_group_size=wgroup, out_dtype=torch.float32
    )
    exact = codes.double() @ _weight_operand(wts["qweight"], wfmt).double().t()
    assert torch.equal(y.double(), exact)


def _frozen(preset: str, cls=QLinearLowRank, k: int = 128, n: int = 48, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).half()
    spec = get_preset(preset).default
    if cls is QLinearLowRank:
        smooth = (torch.rand(k) + 0.5).half()
        return QLinearLowRank.from_float(lin, spec, smooth=smooth).freeze()
    return QLinear.from_float(lin, spec).freeze()


@pytest.mark.parametrize("preset", MMA8_PRESETS)
def test_frozen_layer_triton_equals_reference_path(interpret, preset: str) -> None:
    from vqsuite.kernels.triton import mma8

    q = _frozen(preset)
    x = torch.randn(3, 7, 128).half()  # 21 tokens: not a multiple of the tile
    with vk.prefer("triton"):
        name, _ = vk.select("qlinear", q.spec.kernel, q.kernel_key, x=x, layer=q)
        y = q(x)
    with vk.prefer("reference"):
        y_ref = q(x)
    assert name == "triton.mma8"
    assert y.shape == (3, 7, 48) and y.dtype == torch.float16
    assert sqnr_db(y_ref, y) >= MIN_LAYER_SQNR_DB
    assert sqnr_db(mma8.qlinear_twin(x, q), y) >= MIN_SQNR_DB


def test_plain_qlinear_static_int8(interpret) -> None:
    """A QLinear (no smoothing, no branch, no bias) with a calibrated static INT8 scale; uncalibrated is refused."""
    spec = QuantSpec(weight="int8", act="int8", act_mode="static")
    torch.manual_seed(3)
    lin = nn.Linear(64, 32, bias=False).half()
    q = QLinear.from_float(lin, spec).freeze()
    x = torch.randn(5, 64).half()
    with vk.prefer("triton"), pytest.raises(RuntimeError, match="not calibrated"):
        q(x)
    q.act_scale.fill_(float(x.abs().max()) / 127)
    with vk.prefer("triton"):
        y = q(x)
    with vk.prefer("reference"):
        y_ref = q(x)
    assert sqnr_db(y_ref, y) >= MIN_LAYER_SQNR_DB


def test_per_step_static_scale_follows_the_published_step(interpret) -> None:
    """Per-step static scales reach the kernel through ``static_act_scale``: each published step uses its slot."""
    from vqsuite.nn.steps import StepInfo, publish

    spec = QuantSpec(weight="int8", act="int8", act_mode="static", act_granularity="per_step")
    torch.manual_seed(4)
    q = QLinear.from_float(nn.Linear(64, 32).half(), spec).freeze()
    x = torch.randn(6, 64).half()
    amax = float(x.abs().max())
    q.set_act_scale_table(
        torch.tensor([amax / 127, amax / 300]), torch.tensor([900.0, 100.0]), torch.tensor(amax / 127)
    )
    outs = []
    for i, t in enumerate((900.0, 100.0)):
        with publish(StepInfo(i, t, 2)):
            with vk.prefer("triton"):
                y = q(x)
            with vk.prefer("reference"):
                y_ref = q(x)
        assert sqnr_db(y_ref, y) >= MIN_LAYER_SQNR_DB
        outs.append(y)
    assert not torch.equal(outs[0], outs[1])  # the second step's smaller scale saturates: a different output


def test_accepts_only_what_it_runs(interpret) -> None:
    from vqsuite.kernels.triton import mma8

    x = torch.randn(4, 128).half()
    for preset in MMA8_PRESETS:
        assert mma8.accepts(x, _frozen(preset)), preset
    for preset in ("w8a16", "w4a16", "w4a16-nvfp4", "mxfp4"):  # 16-bit activations or E8M0 scales: not this family
        assert not mma8.accepts(x, _frozen(preset)), preset
    q = _frozen("w8a8")
    assert not mma8.accepts(x.double(), q)  # dtype
    assert not mma8.accepts(torch.randn(4, 64).half(), q)  # K mismatch
    fake = QLinearLowRank.from_float(nn.Linear(128, 48), get_preset("svdquant-int4").default)
    assert not mma8.accepts(x.float(), fake)  # fake-quant (not frozen)
    asym = QLinear.from_float(nn.Linear(128, 48).half(), QuantSpec(weight="int4_asym", weight_group_size=64,
                              act="int8", act_mode="dynamic_per_token")).freeze()  # fmt: skip
    assert not mma8.accepts(x, asym)
    q.act_observing = True
    assert not mma8.accepts(x, q)


def test_auto_never_picks_triton_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = _frozen("svdquant-int4")
    x = torch.randn(2, 128).half()
    name, _ = vk.select("qlinear", "auto", q.kernel_key, x=x, layer=q)
    assert not name.startswith("triton")  # the reference, or the CPU family (vqsuite.kernels.cpu)


def _ptxas_available() -> bool:
    import os

    from triton.backends.nvidia import compiler as nvc

    return os.path.exists(os.path.join(os.path.dirname(nvc.__file__), "bin", "ptxas"))


#: (weight, weight group, act, act group) -> the wgmma operand types the main loop must use on sm_90
HOPPER_VARIANTS = [
    pytest.param("int8", None, "int8", None, "s32.s8.s8", id="w8a8_int8"),
    pytest.param("fp8_e4m3", None, "fp8_e4m3", None, "f32.e4m3.e4m3", id="w8a8_fp8"),
    pytest.param("int4", 64, "int4", 64, "s32.s8.s8", id="w4a4_int4g64"),
    pytest.param("nvfp4", 16, "nvfp4", 16, "f32.e4m3.e4m3", id="w4a4_nvfp4"),
]


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is missing")
@pytest.mark.parametrize(("wfmt", "wgroup", "act", "agroup", "mma"), HOPPER_VARIANTS)
def test_gemm_compiles_for_sm90_with_8bit_wgmma(wfmt, wgroup, act, agroup, mma) -> None:
    """Ahead-of-time sm_90 compile (no GPU needed): the main loop is an 8-bit wgmma, the low-rank branch a 16-bit
    one, and there is no Ampere-style mma.sync fallback."""
    import re

    from vqsuite.kernels.triton.mma8 import hopper_asm

    ptx = hopper_asm(weight_fmt=wfmt, weight_group_size=wgroup, act=act, act_group_size=agroup, rank=32)["ptx"]
    kinds = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k\d+\.(\w+\.\w+\.\w+)", ptx))
    assert kinds == {mma, "f32.bf16.bf16"}
    assert "mma.sync" not in ptx


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is missing")
def test_act_stage_compiles_for_sm90() -> None:
    from vqsuite.kernels.triton.act_quant import hopper_asm

    asm = hopper_asm(act="nvfp4", act_mode="dynamic_per_group", group_size=16, rank=32)
    assert "cubin" in asm and ".entry _act_quant_body" in asm["ptx"]


def test_autotune_pruning_keeps_tiles_that_fit_m() -> None:
    from vqsuite.kernels.triton import mma8

    for grouped in (False, True):
        configs = mma8._cuda_configs(grouped)
        small = mma8._prune(configs, {"M_BUCKET": 1})
        large = mma8._prune(configs, {"M_BUCKET": 4096})
        assert small and all(c.kwargs["BM"] == 64 for c in small)
        assert large and all(c.kwargs["BN"] >= 64 for c in large) and len(large) < len(configs)
        assert mma8._prune(configs, {"M_BUCKET": 64}) == configs
