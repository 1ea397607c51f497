"""The Triton W4A16 GEMM (run on CPU tensors by Triton's interpreter) against its plain-PyTorch twin.

``vqsuite.kernels.triton.w4a16`` builds interpreted kernels for CPU tensors itself, whatever ``TRITON_INTERPRET``
said when triton was first imported; the dispatcher only offers Triton for CPU tensors while ``TRITON_INTERPRET=1``,
so the tests that go through the dispatcher set it for their own duration (a fixture) and restore it after, leaving
every other test's kernel choice alone. Interpreter trap: ``tl.dot`` on bf16 operands is wrong under the
interpreter; the interpreted kernel upcasts its (already 16-bit-rounded) operands to fp32, so bf16 is tested too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed")

import vqsuite.kernels as vk  # noqa: E402
from vqsuite.config import QuantSpec, get_preset  # noqa: E402
from vqsuite.formats import pack_4bit, quantize  # noqa: E402
from vqsuite.kernels.reference import dequantize_weight, gemm_w4a16_reference  # noqa: E402
from vqsuite.kernels.triton import w4a16  # noqa: E402
from vqsuite.nn.linear import QLinear, QLinearLowRank  # noqa: E402

#: float outputs of the kernel against the twin (they differ only in fp32 summation order)
MIN_SQNR_DB = 40.0
#: frozen layer forward, Triton path against the reference path (the reference rounds the GEMM and the low-rank
#: branch to 16 bits separately, so a few more dB are lost than against the twin)
MIN_LAYER_SQNR_DB = 40.0

FORMATS = [
    pytest.param("int4", 64, id="int4_g64"),
    pytest.param("int4", 128, id="int4_g128"),
    pytest.param("int4_asym", 64, id="int4asym_g64"),
    pytest.param("nvfp4", 16, id="nvfp4"),
]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


@pytest.fixture
def interpret_env():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def make_weight(fmt: str, group: int, n: int, k: int, scale_dtype: torch.dtype = torch.bfloat16) -> dict:
    w = torch.randn(n, k)
    w[:, :3] *= 8  # a few outlier input channels, so groups get different scales
    qt = quantize(w, fmt, group_size=group, scale_dtype=scale_dtype)
    return {
        "qweight": pack_4bit(qt.codes),
        "wscales": qt.scales,
        "wzeros": qt.zero_points,
        "wtscale": qt.tensor_scale,
        "spec": QuantSpec(weight=fmt, weight_group_size=group, scale_dtype="bfloat16"),
    }


def run_both(x, wt, *, rank=0, smooth=True, bias=True, split_k=None, swap_ab=None):
    n, k = wt["qweight"].shape[0], x.shape[-1]
    extra = {
        "wzeros": wt["wzeros"],
        "wtscale": wt["wtscale"],
        "smooth": torch.rand(k) + 0.5 if smooth else None,
        "proj_down": torch.randn(k, rank) / k**0.5 if rank else None,
        "proj_up": torch.randn(n, rank) if rank else None,
        "bias": torch.randn(n) if bias else None,
    }
    spec = wt["spec"]
    y = w4a16.gemm_w4a16(
        x, wt["qweight"], wt["wscales"], spec.weight, spec.weight_group_size, split_k=split_k, swap_ab=swap_ab, **extra
    )
    ref = gemm_w4a16_reference(x, wt["qweight"], wt["wscales"], spec, **extra)
    return y, ref


@pytest.mark.parametrize(("fmt", "group"), FORMATS)
@pytest.mark.parametrize("m", [1, 37], ids=["M1", "M37"])
@pytest.mark.parametrize("rank", [0, 32], ids=["r0", "r32"])
def test_gemm_matches_twin(fmt, group, m, rank):
    """M=1 and M=37 (not a multiple of BLOCK_M=16), K = 3 blocks of 64 plus one group boundary inside a block."""
    k, n = 3 * 128, 80  # N=80: not a multiple of BLOCK_N=32
    wt = make_weight(fmt, group, n, k)
    x = torch.randn(m, k, dtype=torch.float16)
    y, ref = run_both(x, wt, rank=rank)
    assert y.dtype == x.dtype and y.shape == (m, n)
    assert sqnr_db(ref, y) >= MIN_SQNR_DB


@pytest.mark.parametrize("swap_ab", [False, True], ids=["xW", "Wx"])
@pytest.mark.parametrize("split_k", [True, False], ids=["splitk", "tiled"])
@pytest.mark.parametrize("m", [1, 16, 17], ids=["M1", "M16", "M17"])
def test_both_variants_any_m(split_k, swap_ab, m):
    """Either launch shape and either operand order is correct at any M (split-K is chosen for M ≤ 16)."""
    wt = make_weight("int4", 64, 48, 320)  # K=320: five g64 groups, the last K block is partial
    x = torch.randn(m, 320, dtype=torch.float16)
    y, ref = run_both(x, wt, rank=32, split_k=split_k, swap_ab=swap_ab)
    assert sqnr_db(ref, y) >= MIN_SQNR_DB


@pytest.mark.parametrize(("fmt", "group"), FORMATS)
def test_bf16_and_batched_input(fmt, group):
    wt = make_weight(fmt, group, 64, 256)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    y, ref = run_both(x, wt, rank=24)  # a rank that is not a power of two: masked rank tiles
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert sqnr_db(ref, y) >= MIN_SQNR_DB


@pytest.mark.parametrize(("fmt", "group"), FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("split_k", "swap_ab"), [(False, False), (True, True)], ids=["tiled-xW", "splitk-Wx"])
def test_dequantized_tiles_bit_exact(fmt, group, dtype, split_k, swap_ab):
    """With x = I (no smoothing, bias or low rank) the kernel writes W^T itself: the in-register dequantized tiles
    (codes, zero points, group scales, E4M3 decoding, saturation, rounding to x's dtype) equal the reference
    dequantization bit for bit (each output sums one exact product and zeros)."""
    k, n = 128, 48
    wt = make_weight(fmt, group, n, k)
    eye = torch.eye(k, dtype=dtype)
    spec = wt["spec"]
    y = w4a16.gemm_w4a16(
        eye,
        wt["qweight"],
        wt["wscales"],
        spec.weight,
        spec.weight_group_size,
        wzeros=wt["wzeros"],
        wtscale=wt["wtscale"],
        split_k=split_k,
        swap_ab=swap_ab,
    )
    ref = dequantize_weight(wt["qweight"], wt["wscales"], spec, wzeros=wt["wzeros"], wtscale=wt["wtscale"], dtype=dtype)
    assert torch.equal(y.t(), ref)


def test_saturation_matches_reference():
    """An fp16 weight whose dequantized value passes 65504 saturates in both, instead of becoming Inf."""
    spec = QuantSpec(weight="int4_asym", weight_group_size=64, scale_dtype="float32")
    w = torch.zeros(16, 64)
    w[:, 0] = 1.0e5
    w[:, 1] = -1.0e5
    qt = quantize(w, "int4_asym", group_size=64, scale_dtype=torch.float32)
    qw = pack_4bit(qt.codes)
    eye = torch.eye(64, dtype=torch.float16)
    y = w4a16.gemm_w4a16(eye, qw, qt.scales, "int4_asym", 64, wzeros=qt.zero_points)
    ref = dequantize_weight(qw, qt.scales, spec, wzeros=qt.zero_points, dtype=torch.float16)
    assert torch.isfinite(y).all()
    assert torch.equal(y.t(), ref)


def frozen_layer(preset: str, *, rank: int, k: int = 192, n: int = 96) -> QLinear:
    spec = get_preset(preset).default.replace(rank=rank)
    lin = nn.Linear(k, n).half()
    if rank or preset.startswith("w4a16"):
        smooth = (torch.rand(k) + 0.5).half()
        layer = QLinearLowRank.from_float(lin, spec, rank=rank, smooth=smooth)
    else:
        layer = QLinear.from_float(lin, spec)
    return layer.freeze().eval()


@pytest.mark.parametrize("preset", ["w4a16", "w4a16-nvfp4"])
@pytest.mark.parametrize("rank", [0, 32], ids=["r0", "r32"])
@pytest.mark.parametrize("m", [1, 33], ids=["M1", "M33"])
def test_frozen_lowrank_layer_through_dispatcher(interpret_env, preset, rank, m):
    layer = frozen_layer(preset, rank=rank)
    x = torch.randn(m, 192, dtype=torch.float16)
    name, _ = vk.select("qlinear", layer.spec.kernel, layer.kernel_key, x=x, layer=layer)
    assert name == "triton.w4a16"
    with torch.no_grad(), vk.prefer("triton"):
        y = layer(x)
    with torch.no_grad(), vk.prefer("reference"):
        ref = layer(x)
    assert y.dtype == ref.dtype == torch.float16
    assert sqnr_db(ref, y) >= MIN_LAYER_SQNR_DB


def test_accepts_only_what_it_runs(interpret_env):
    x = torch.randn(4, 192, dtype=torch.float16)
    assert w4a16.accepts(x, frozen_layer("w4a16", rank=32))
    assert w4a16.accepts(x, frozen_layer("w4a16-nvfp4", rank=0))
    assert not w4a16.accepts(x.float(), frozen_layer("w4a16", rank=0)), "fp32 activations would be TF32 MMA"
    assert not w4a16.accepts(x, frozen_layer("w4a8", rank=0)), "8-bit activations belong to another family"
    assert not w4a16.accepts(x, frozen_layer("w8a16", rank=0)), "8-bit weights"
    per_channel = QLinear.from_float(nn.Linear(192, 96).half(), QuantSpec(weight="int4")).freeze()
    assert not w4a16.accepts(x, per_channel), "per-channel INT4 is not a grouped layout this kernel reads"
    fake_quant = QLinear.from_float(nn.Linear(192, 96).half(), get_preset("w4a16").default)
    assert not w4a16.accepts(x, fake_quant), "fake-quant layers have no packed storage"
    assert not w4a16.accepts(torch.randn(4, 128, dtype=torch.float16), frozen_layer("w4a16", rank=0))


def test_reference_preference_still_wins(interpret_env):
    layer = frozen_layer("w4a16", rank=32)
    x = torch.randn(3, 192, dtype=torch.float16)
    with vk.prefer("reference"):
        name, _ = vk.select("qlinear", layer.spec.kernel, layer.kernel_key, x=x, layer=layer)
    assert name == "reference"


def test_dispatcher_ignores_cpu_without_interpreter():
    """Without TRITON_INTERPRET the dispatcher never offers Triton for CPU tensors."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        layer = frozen_layer("w4a16", rank=0)
        x = torch.randn(2, 192, dtype=torch.float16)
        name, _ = vk.select("qlinear", layer.spec.kernel, layer.kernel_key, x=x, layer=layer)
        assert not name.startswith("triton")  # the reference, or the CPU family (vqsuite.kernels.cpu)
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("fmt", "group"), FORMATS)
@pytest.mark.parametrize("m", [1, 16, 300], ids=["M1", "M16", "M300"])
def test_gpu_matches_twin(fmt, group, m):
    wt = make_weight(fmt, group, 512, 1024)
    wt = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in wt.items()}
    x = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
    n, k = 512, 1024
    extra = {
        "wzeros": wt["wzeros"],
        "wtscale": wt["wtscale"],
        "smooth": torch.rand(k, device="cuda") + 0.5,
        "proj_down": torch.randn(k, 32, device="cuda") / k**0.5,
        "proj_up": torch.randn(n, 32, device="cuda"),
        "bias": torch.randn(n, device="cuda"),
    }
    spec = wt["spec"]
    y = w4a16.gemm_w4a16(x, wt["qweight"], wt["wscales"], spec.weight, spec.weight_group_size, **extra)
    ref = gemm_w4a16_reference(x, wt["qweight"], wt["wscales"], spec, **extra)
    assert sqnr_db(ref, y) >= MIN_SQNR_DB


# ------------------------------------------------------------------------------------------ benchmark scripts
# Never timed here: only that they refuse politely without a GPU and that their code path runs end to end.
BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
@pytest.mark.parametrize("name", ["gemm", "block"])
def test_bench_refuses_without_gpu(name, capsys):
    mod = load_bench(name)
    assert mod.main(["--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


def test_gemm_bench_rows_smoke_cpu(interpret_env):
    """The GEMM benchmark's whole path (layers, reference check, ratios) on a tiny shape on CPU, w4a16 only."""
    mod = load_bench("gemm")
    args = mod.parse_args(
        ["--smoke-cpu", "--shapes", "128,64", "--m", "1", "--kernels", "w4a16 int4", "--dtype", "fp16"]
    )
    rows = mod.run(args)
    by_kernel = {r["kernel"]: r for r in rows}
    assert by_kernel["torch fp16 F.linear"]["ratio_vs_bf16"] == 1.0
    for label in ("w4a16 int4-g64", "w4a16 int4-g64 +r32"):
        row = by_kernel[label]
        assert row["impl"] == "triton.w4a16"
        assert row["sqnr_vs_reference_db"] >= MIN_LAYER_SQNR_DB
        assert row["us"] > 0 and row["M"] == 1 and (row["K"], row["N"]) == (128, 64)
    assert "lowrank_overhead_pct" in by_kernel["w4a16 int4-g64 +r32"]


# ------------------------------------------------------------------------------------------ Hopper assembly
# Triton compiles for sm_90 without a GPU (its bundled ptxas); the SASS shows whether the MMA is Hopper's wgmma
# (HGMMA) and whether registers spill to local memory (LDL/STL).
def _nvidia_tool(name: str) -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def compile_sm90(fmt: str, config: tuple, small: bool) -> tuple[str, str]:
    """``(cuobjdump -res-usage line, SASS)`` of the GEMM kernel for ``fmt`` and one autotune ``config``."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, bk, warps, stages, swap = config
    fn = w4a16._kernels(False).gemm_large.fn
    group = w4a16.SUPPORTED_GROUPS[fmt][0]
    sig = {
        "X": "*bf16",
        "QW": "*u8",
        "S": "*u8" if fmt == "nvfp4" else "*bf16",
        "Z": "*u8" if fmt == "int4_asym" else "*bf16",
        "TS": "*fp32" if fmt == "nvfp4" else "*bf16",
        "LAM": "*bf16",
        "T": "*fp32",
        "UP": "*bf16",
        "BIAS": "*bf16",
        "Y": "*fp32" if small else "*bf16",
        **dict.fromkeys(("M", "N", "K", "R", "K_PER_SPLIT", "stride_xm"), "i32"),
    }
    const = {
        "G": group,
        "FMT": w4a16.FMT_IDS[fmt],
        "HAS_SMOOTH": True,
        "HAS_LR": True,
        "HAS_BIAS": True,
        "SPLIT_K": 4 if small else 1,
        "DOT_F32": False,
        "RNE_BF16": False,
        "W_MAX": float(torch.finfo(torch.bfloat16).max),
        "SWAP_AB": swap,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": 1 if small else 8,
    }
    sig |= dict.fromkeys(const, "constexpr")
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(_nvidia_tool("cuobjdump")), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([str(_nvidia_tool("nvdisasm")), str(cubin)], capture_output=True, text=True, check=True)
    return usage.strip().splitlines()[-1], sass.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    any(_nvidia_tool(t) is None for t in ("ptxas", "cuobjdump", "nvdisasm")),
    reason="triton's bundled CUDA tools (ptxas, cuobjdump, nvdisasm) are missing",
)
@pytest.mark.parametrize(
    ("fmt", "config", "small"),
    [
        pytest.param("int4", w4a16.LARGE_M_CONFIGS[0], False, id="int4-large"),
        pytest.param("nvfp4", w4a16.LARGE_M_CONFIGS[2], False, id="nvfp4-large-swap"),
        pytest.param("int4_asym", w4a16.SMALL_M_CONFIGS[0], True, id="int4asym-splitk-swap"),
        pytest.param("nvfp4", w4a16.SMALL_M_CONFIGS[2], True, id="nvfp4-splitk-swap"),
    ],
)
def test_sm90_assembly(fmt, config, small):
    """The Hopper build uses wgmma (HGMMA) and keeps everything in registers (no local-memory spills)."""
    usage, sass = compile_sm90(fmt, config, small)
    assert sass.count("HGMMA") > 0, "expected Hopper wgmma instructions"
    assert "STACK:0" in usage and sass.count("LDL") == 0, f"register spills: {usage}"


@pytest.mark.slow
@pytest.mark.skipif(
    any(_nvidia_tool(t) is None for t in ("ptxas", "cuobjdump", "nvdisasm")),
    reason="triton's bundled CUDA tools (ptxas, cuobjdump, nvdisasm) are missing",
)
@pytest.mark.parametrize(("block_m", "block_r"), [(64, 32), (16, 256)], ids=["M64-r32", "M16-r256"])
def test_sm90_lowrank_down_no_spills(block_m, block_r):
    """The down-projection kernel's tiles as the launcher picks them compile for sm_90 without register spills."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = w4a16._kernels(False).lowrank_down
    sig = {"X": "*bf16", "LAM": "*bf16", "PD": "*bf16", "TACC": "*fp32"}
    sig |= dict.fromkeys(("M", "K", "R", "K_PER_SPLIT", "stride_xm"), "i32")
    const = {"HAS_SMOOTH": True, "DOT_F32": False, "RNE_BF16": False, "BLOCK_M": block_m, "BLOCK_K": 64}
    const["BLOCK_R"] = block_r
    sig |= dict.fromkeys(const, "constexpr")
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(_nvidia_tool("cuobjdump")), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    assert "STACK:0" in usage, f"register spills: {usage.strip()}"
