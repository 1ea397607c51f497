"""The CPU kernel family (``vqsuite.kernels.cpu``) against the plain-PyTorch reference: per format, group, M and
odd shapes (declined ones fall back to the reference), packing exactness, a frozen model end to end, save/load,
``prefer("reference")``, memory accounting and ``torch.compile``. Runs on every CPU; timings are never asserted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqsuite
import vqsuite.kernels as vk
from vqsuite.config import QuantSpec, get_preset
from vqsuite.kernels import reference
from vqsuite.kernels.cpu import qlinear as cpu
from vqsuite.kernels.triton import mma8
from vqsuite.nn import QLinear, QLinearLowRank

#: CPU family vs reference, one layer, weight-only: x (and fp32 weight scales) rounded to bf16 at the op boundary and
#: the bf16 output, against the reference's fp32 math. Measured 2026-12-03 on AVX2: 49.5-53.7 dB over int4 g32-g256,
#: int4 per channel, int3, int2, int8, int6 and M = 1/7/64/257; ~10 dB left for other CPUs' summation orders.
MIN_SQNR_WEIGHT_ONLY_DB = 40.0
#: the same with activation fake-quant first (w8a8, w4a4, w4a8, w2a8, svdquant-int4[-w8a8], fp32 and bf16 x): an
#: activation near a rounding boundary may land on the neighbouring code after the bf16 rounding of x / λ.
#: Measured 48.1-56.0 dB.
MIN_SQNR_ACT_DB = 38.0
#: a whole frozen tiny MLP (two quantized layers, GELU between): the second layer re-quantizes a perturbed input.
#: Measured 49.6 (w4a16), 48.0 (w8a16), 41.0 (w8a8), 33.9 dB (w4a4).
MIN_SQNR_MODEL_DB = 28.0

M_VALUES = (1, 7, 64, 257)


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    err = (y.double() - ref).pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(ref.pow(2).sum() / err))


def _frozen(spec: QuantSpec, k: int = 256, n: int = 96, *, rank: int = 0, bias: bool = True) -> QLinear:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    if rank:
        q = QLinearLowRank.from_float(lin, spec, rank=rank, smooth=torch.rand(k) + 0.5)
    else:
        q = QLinear.from_float(lin, spec)
    return q.freeze()


def _run_both(q: QLinear, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The CPU family (M gate off: these tests hold the kernels to the reference at every M) and the reference."""
    saved = dict(cpu.MAX_M)
    cpu.MAX_M.clear()
    try:
        return _run_both_ungated(q, x)
    finally:
        cpu.MAX_M.update(saved)


def _run_both_ungated(q: QLinear, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        name, _ = vk.select("qlinear", "auto", q.kernel_key, x=x, ops=q.qlinear_operands())
        y = q(x)
        with vk.prefer("reference"):
            y_ref = q(x)
    return name, y, y_ref


WEIGHT_ONLY = {
    "int4-g32": QuantSpec(weight="int4", weight_group_size=32, scale_dtype="bfloat16"),
    "int4-g64": get_preset("w4a16").default,
    "int4-g128": QuantSpec(weight="int4", weight_group_size=128, scale_dtype="bfloat16"),
    "int4-g256": QuantSpec(weight="int4", weight_group_size=256, scale_dtype="bfloat16"),
    "int4-per-channel-fp32-scales": QuantSpec(weight="int4"),
    "int3-g64": QuantSpec(weight="int3", weight_group_size=64, scale_dtype="bfloat16"),
    "int2-g64": QuantSpec(weight="int2", weight_group_size=64, scale_dtype="bfloat16"),
    "int8-per-channel": get_preset("w8a16").default,
    "int6-per-channel": QuantSpec(weight="int6"),
}


@pytest.mark.parametrize("m", M_VALUES, ids=[f"M{m}" for m in M_VALUES])
@pytest.mark.parametrize("fmt", list(WEIGHT_ONLY), ids=list(WEIGHT_ONLY))
def test_weight_only_matches_reference(fmt: str, m: int) -> None:
    q = _frozen(WEIGHT_ONLY[fmt])
    x = torch.randn(m, 256)
    name, y, y_ref = _run_both(q, x)
    assert name == "cpu.qlinear"
    assert y.dtype == x.dtype and y.shape == (m, 96)
    assert sqnr_db(y, y_ref) >= MIN_SQNR_WEIGHT_ONLY_DB


ACT_PRESETS = ("w8a8", "w4a4", "w4a8", "w2a8", "svdquant-int4", "svdquant-int4-w8a8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", M_VALUES, ids=[f"M{m}" for m in M_VALUES])
@pytest.mark.parametrize("preset", ACT_PRESETS)
def test_quantized_activations_match_reference(preset: str, m: int, dtype: torch.dtype) -> None:
    spec = get_preset(preset).default
    q = _frozen(spec, rank=spec.rank).to(dtype)
    x = torch.randn(2, m, 256, dtype=dtype)  # 3-D input: leading dims are flattened and restored
    name, y, y_ref = _run_both(q, x)
    assert name == "cpu.qlinear"
    assert y.shape == (2, m, 96) and y.dtype == dtype
    assert sqnr_db(y, y_ref) >= MIN_SQNR_ACT_DB


def test_static_activations_match_reference() -> None:
    spec = QuantSpec(weight="int8", act="int8", act_mode="static")
    q = _frozen(spec)
    q.act_scale.fill_(4.0 / 127)
    x = torch.randn(7, 256)
    name, y, y_ref = _run_both(q, x)
    assert name == "cpu.qlinear" and sqnr_db(y, y_ref) >= MIN_SQNR_ACT_DB
    q.act_scale.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(x)


@pytest.mark.parametrize("m", M_VALUES, ids=[f"M{m}" for m in M_VALUES])
def test_int_mm_route_is_the_8bit_reference_math(m: int) -> None:
    """The AVX512-VNNI/AMX route, forced here on any CPU: exact int32 accumulation, the mma8 twin's rescale."""
    q = _frozen(get_preset("w8a8").default, bias=False)
    ops = q.qlinear_operands()
    avx512 = "AVX512+VNNI"
    assert cpu.plan_for(ops, capability=avx512).act_route == "int_mm"
    assert cpu.plan_for(ops, capability="AVX2").act_route == "fake_quant"
    assert cpu.plan_for(ops, capability="AVX512").act_route == "fake_quant"  # no VNNI: no fast int8 GEMM
    x = torch.randn(m, 256)
    with torch.no_grad():
        y = cpu.qlinear(x, ops.replace(packed=cpu.pack(ops, capability=avx512)), capability=avx512)
        assert torch.equal(y, mma8.qlinear_twin(x, ops))
    # with bias and a low-rank branch: same math, additions in another order
    spec = get_preset("svdquant-int4-w8a8").default
    q = _frozen(spec, rank=spec.rank)
    ops = q.qlinear_operands()
    with torch.no_grad():
        y = cpu.qlinear(x, ops, capability=avx512)
        assert sqnr_db(y, mma8.qlinear_twin(x, ops)) >= 100.0


DECLINED = {
    "n-not-multiple-of-16": (get_preset("w4a16").default, 256, 40),
    "int4-g16": (QuantSpec(weight="int4", weight_group_size=16, scale_dtype="bfloat16"), 256, 96),
    "int4-asym": (QuantSpec(weight="int4_asym", weight_group_size=64), 256, 96),
    "int8-grouped": (QuantSpec(weight="int8", weight_group_size=64), 256, 96),
    "int8-asym": (QuantSpec(weight="int8_asym"), 256, 96),
    "fp8": (get_preset("w8a8-fp8").default, 256, 96),
    "nvfp4": (get_preset("nvfp4").default, 256, 96),
    "mxfp4": (get_preset("mxfp4").default, 256, 96),
    "per-channel-k-not-multiple-of-32": (QuantSpec(weight="int4"), 200, 96),
    # _weight_int8pack_mm segfaults at K < 8 and miscomputes at K = 9..28 not divisible by 8 (timm csatv2: K = 1)
    "int8-k-1": (get_preset("w8a8").default, 1, 3),
    "int8-k-12": (get_preset("w8a16").default, 12, 16),
    "int8-k-28": (get_preset("w8a8").default, 28, 17),
}


@pytest.mark.parametrize("case", list(DECLINED), ids=list(DECLINED))
def test_unsupported_layers_fall_back_to_the_reference(case: str) -> None:
    spec, k, n = DECLINED[case]
    q = _frozen(spec, k, n)
    x = torch.randn(7, k)
    name, y, y_ref = _run_both(q, x)
    assert name == "reference"
    assert torch.equal(y, y_ref)
    assert not any(b.startswith("packed_") for b, _ in q.named_buffers())


@pytest.mark.parametrize(("k", "n", "g"), [(96, 32, 32), (480, 48, 32), (320, 16, 64), (1280, 112, 256)])
def test_odd_shapes_the_kernel_takes(k: int, n: int, g: int) -> None:
    q = _frozen(QuantSpec(weight="int4", weight_group_size=g, scale_dtype="bfloat16"), k, n)
    for m in (1, 7):
        name, y, y_ref = _run_both(q, torch.randn(m, k))
        assert name == "cpu.qlinear" and sqnr_db(y, y_ref) >= MIN_SQNR_WEIGHT_ONLY_DB


def test_declines_inputs_it_cannot_take() -> None:
    q = _frozen(get_preset("w4a16").default)
    ops = q.qlinear_operands()
    assert cpu.accepts(torch.randn(3, 256), ops)
    assert not cpu.accepts(torch.randn(3, 255), ops)  # K mismatch
    assert not cpu.accepts(torch.randn(3, 256, dtype=torch.float64), ops)
    assert not cpu.accepts(torch.randn(0, 256), ops)
    assert not cpu.accepts(torch.randn(3, 256, requires_grad=True), ops)
    with torch.no_grad():
        assert cpu.accepts(torch.randn(3, 256, requires_grad=True), ops)
    fake = QLinear.from_float(nn.Linear(256, 96), get_preset("w4a16").default)
    assert not cpu.accepts(torch.randn(3, 256), layer=fake)  # fake-quant: no stored codes


# ------------------------------------------------------------------------------------------- packing exactness
@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64", "int4-g256", "int3-g64", "int2-g64"])
def test_int4pack_dequantizes_our_codes_bit_exactly(fmt: str) -> None:
    """The packed weight times an fp32 identity (the op is exact in fp32) is the reference's dequantized weight."""
    q = _frozen(WEIGHT_ONLY[fmt])
    ops = q.qlinear_operands()
    packed = cpu.pack(ops)
    plan = cpu.plan_for(ops)
    eye = torch.eye(256)
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(
        eye, packed["int4_weight"], plan.group, packed["int4_scales_zeros"].float()
    )
    assert torch.equal(w.t(), reference.operands_weight(ops, torch.float32))


def test_int8pack_scales_are_the_stored_scales_in_bf16() -> None:
    q = _frozen(get_preset("w8a16").default)
    ops = q.qlinear_operands()
    packed = cpu.pack(ops)
    assert torch.equal(packed["int8_scales"], ops.wscales.reshape(-1).bfloat16())
    w = torch.ops.aten._weight_int8pack_mm(torch.eye(256), ops.qweight, ops.wscales.reshape(-1).float())
    assert torch.equal(w.t(), reference.operands_weight(ops, torch.float32))


def test_packing_happens_once_and_follows_the_codes() -> None:
    q = _frozen(get_preset("w4a16").default)
    x = torch.randn(3, 256)
    with torch.no_grad():
        q(x)
        first = q.packed_int4_weight
        q(x)
        assert q.packed_int4_weight is first  # not repacked per call
        q.qweight.copy_(torch.flip(q.qweight, dims=[0]))  # new codes (a checkpoint load writes in place)
        y = q(x)
        assert q.packed_int4_weight is not first
        with vk.prefer("reference"):
            assert sqnr_db(y, q(x)) >= MIN_SQNR_WEIGHT_ONLY_DB


def test_memory_report_counts_the_packed_copy() -> None:
    q = _frozen(get_preset("w4a16").default)
    before = vqsuite.module_nbytes(q)
    with torch.no_grad():
        q(torch.randn(2, 256))
    packed = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if n.startswith("packed_"))
    assert packed > 0
    assert vqsuite.module_nbytes(q) == before + packed
    q.drop_packed()
    assert vqsuite.module_nbytes(q) == before


# ------------------------------------------------------------------------------------------- models
def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()


@pytest.mark.parametrize("preset", ["w4a16", "w8a16", "w8a8", "w4a4"])
def test_frozen_model_end_to_end(preset: str) -> None:
    model = vqsuite.quantize_model(_tiny_mlp(), preset)
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = model(x)
        assert any(
            n.endswith("packed_int4_weight") or n.endswith("packed_int8_scales") for n, _ in model.named_buffers()
        )
        with vk.prefer("reference"):
            y_ref = model(x)
    assert sqnr_db(y, y_ref) >= MIN_SQNR_MODEL_DB


@pytest.mark.parametrize("preset", ["w4a16", "w8a8", "w4a4"])
def test_transposed_view_input(preset: str) -> None:
    """A batch-1 ``[1, K, M]`` transposed view (a channels-first block feeding a Linear) reshapes to a view whose
    rows are not contiguous; the packed kernels take it (they used to raise "A must be contiguous")."""
    model = vqsuite.quantize_model(_tiny_mlp(), preset)
    x = torch.randn(1, 128, 6).transpose(1, 2)
    with torch.no_grad():
        y = model(x)
        with vk.prefer("reference"):
            y_ref = model(x)
    assert sqnr_db(y, y_ref) >= MIN_SQNR_MODEL_DB


def test_prefer_reference_forces_the_reference() -> None:
    q = _frozen(get_preset("w4a16").default)
    x = torch.randn(4, 256)
    with torch.no_grad(), vk.prefer("reference"):
        assert torch.equal(q(x), reference.qlinear(x, q.qlinear_operands()))
    assert not any(n.startswith("packed_") for n, _ in q.named_buffers())


def test_save_load_round_trip_is_unchanged_by_the_cpu_kernels(tmp_path) -> None:  # noqa: ANN001
    model = vqsuite.quantize_model(_tiny_mlp(), "w4a16")
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = model(x)  # packs
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    vqsuite.save_quantized(model, tmp_path / "ckpt")
    loaded = vqsuite.load_quantized(tmp_path / "ckpt", _tiny_mlp())
    assert loaded.state_dict().keys() == state_before.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state_before.items())
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_device_or_dtype_change_drops_the_packed_copy() -> None:
    q = _frozen(get_preset("w4a16").default)
    with torch.no_grad():
        q(torch.randn(2, 256))
    assert hasattr(q, "packed_int4_weight")
    q.to(torch.bfloat16)
    assert not any(n.startswith("packed_") for n, _ in q.named_buffers())
    with torch.no_grad():
        assert q(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_ops_are_registered_with_fake_impls() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = _frozen(get_preset("w4a16").default)
    ops = q.qlinear_operands()
    packed = cpu.pack(ops)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.vqsuite.int4pack_linear(
            torch.empty(5, 256), packed["int4_weight"], packed["int4_scales_zeros"], 64, 96
        )
        assert y.shape == (5, 96) and y.dtype == torch.float32
        y = torch.ops.vqsuite.int8_int_mm(torch.empty(5, 256, dtype=torch.int8), torch.empty(96, 256, dtype=torch.int8))
        assert y.shape == (5, 96) and y.dtype == torch.int32


@pytest.mark.slow
def test_torch_compile_fullgraph_one_w4a16_layer() -> None:
    q = _frozen(get_preset("w4a16").default)
    x = torch.randn(4, 256)
    with torch.no_grad():
        y = q(x)  # packs eagerly: the compiled graph only reads the buffers
        compiled = torch.compile(q, fullgraph=True)
        assert torch.equal(compiled(x), y)


def test_auto_leaves_large_m_on_small_int8_layers_to_the_reference() -> None:
    """``MAX_M``: where the reference (dequantize + fp32 sgemm) is measured faster, ``auto`` takes it; the cached
    per-layer choice follows M, and ``prefer("triton")`` still demands the CPU family."""
    q = _frozen(get_preset("w8a16").default)
    m_min, nk_max = cpu.MAX_M["int8pack"]
    assert 256 * 96 <= nk_max
    small, large = torch.randn(m_min - 1, 256), torch.randn(m_min, 256)
    ops = q.qlinear_operands()
    assert vk.select("qlinear", "auto", q.kernel_key, x=small, ops=ops)[0] == "cpu.qlinear"
    assert vk.select("qlinear", "auto", q.kernel_key, x=large, ops=ops)[0] == "reference"
    with torch.no_grad():
        with vk.prefer("reference"):
            want = q(large)
        assert torch.equal(q(large), want)  # auto ran the reference itself
        assert q.__dict__["_kernel_call"][1].name == "reference"
        q(small)
        assert q.__dict__["_kernel_call"][1].name == "cpu.qlinear"
        with vk.prefer("triton"):
            y = q(large)
            assert q.__dict__["_kernel_call"][1].name == "cpu.qlinear"
    assert sqnr_db(y, want) >= MIN_SQNR_WEIGHT_ONLY_DB


def test_cached_call_follows_buffer_writes_and_preference() -> None:
    q = _frozen(get_preset("w4a16").default)
    x = torch.randn(2, 256)
    with torch.no_grad():
        y0 = q(x)
        cached = q.__dict__["_kernel_call"]
        assert q(x).equal(y0) and q.__dict__["_kernel_call"] is cached  # reused, not rebuilt
        q.bias.add_(1.0)  # an in-place write bumps the version: the operands are rebuilt
        assert torch.allclose(q(x), y0 + 1.0, atol=1e-5)
        with vk.prefer("reference"):
            assert q.__dict__["_kernel_call"][1].name == "cpu.qlinear"
            q(x)
            assert q.__dict__["_kernel_call"][1].name == "reference"


@pytest.mark.parametrize("fmt", ["int4-g64", "int8-per-channel"])
def test_strided_input_matches_contiguous(fmt: str) -> None:
    # a transposed view, as a frozen 1x1 conv (Sana's GLUMBConv) hands its channels-last activations over: the aten
    # int4pack/int8pack kernels reject a non-contiguous A, and .to(bf16) keeps the strides
    q = _frozen(WEIGHT_ONLY[fmt])
    x = torch.randn(256, 7).t()
    assert not x.is_contiguous()
    name, y, y_ref = _run_both(q, x)
    assert name == "cpu.qlinear"
    assert torch.equal(y, q(x.contiguous()))
    assert sqnr_db(y, y_ref) >= MIN_SQNR_WEIGHT_ONLY_DB
