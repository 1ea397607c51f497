"""QLinear: fake-quant and frozen states agree bit for bit, frozen storage really is small, gradients pass
straight through, activation quantization really runs, and the output error meets a per-format SQNR bar."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqsuite
import vqsuite.kernels.reference as kernel_reference
from vqsuite.config import QuantSpec, get_preset
from vqsuite.nn import QLinear
from vqsuite.nn.quantizers import quantize_activation

#: presets usable without calibration (static-activation presets need calib_data: their fake-quant == frozen check
#: runs calibrated in tests/config/test_config_lowbit_presets.py)
ALL_PRESETS = [p for p in vqsuite.list_presets() if vqsuite.get_preset(p).default.act_mode != "static"]

#: minimum SQNR (dB) of a frozen 512x512 QLinear's output vs float, Gaussian weights and inputs (M=64).
#: w8a8 and w4a16 bars come from the issue; the others were measured on 10 seeds (min shown) and set ~1.3 dB lower.
SQNR_MIN_DB = {
    "w8a16": 40.0,  # measured 42.5
    "w8a8": 30.0,  # measured 39.5
    "w8a8-fp8": 27.0,  # measured 28.5
    "w4a16": 18.0,  # measured 19.2
    "w4a8": 18.0,  # measured 19.2
    "w4a4": 15.0,  # measured 16.3
    "w4a16-nvfp4": 19.0,  # measured 20.4
    "nvfp4": 16.0,  # measured 17.4
    "mxfp4": 14.5,  # measured 15.7
}
#: any real quantizer stays far below this; a silent pass-through of float values would exceed it
NO_OP_CEILING_DB = 60.0
SQNR_SHAPE = (512, 512)
SQNR_TOKENS = 64
STUDENT_T_DF = 3.0

#: frozen bytes vs a bf16 nn.Linear: W4 g64 (bf16 scales) must shrink >= 3.5x, int8 per channel ~2x
MEM_BIG = 4096
W4_MIN_COMPRESSION = 3.5
INT8_MIN_COMPRESSION = 1.95
INT8_MAX_COMPRESSION = 2.0


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def _linear(k: int = 128, n: int = 96, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


# ---------------------------------------------------------------------------- fake-quant == frozen
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_fake_quant_equals_frozen_bit_for_bit(preset: str, dtype: torch.dtype) -> None:
    lin = _linear(dtype=dtype)
    q = QLinear.from_float(lin, get_preset(preset).default)
    x = torch.randn(2, 5, 128, dtype=dtype)  # [B, T, K]: per-token quantization over the last dim
    w_fake = q.effective_weight()
    y_fake = q(x)
    q.freeze()
    y_frozen = q(x)
    assert q.frozen and y_frozen.shape == (2, 5, 96) and y_frozen.dtype == dtype
    assert torch.equal(y_fake, y_frozen)
    assert torch.equal(w_fake, q.weight)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_frozen_has_no_weight_parameter_but_weight_reads_dequantized(bias: bool) -> None:
    lin = _linear(bias=bias)
    q = QLinear.from_float(lin, get_preset("w4a16").default)
    w_fake = q.effective_weight().detach().clone()
    q.freeze()
    params = dict(q.named_parameters())
    assert "weight" not in params
    assert set(params) == ({"bias"} if bias else set())
    w = q.weight
    assert not isinstance(w, nn.Parameter)
    assert w.shape == lin.weight.shape and w.dtype == lin.weight.dtype
    assert torch.equal(w, w_fake)
    assert not torch.equal(w, lin.weight)  # it is the quantized weight, not a hidden float copy
    buffers = {n: (tuple(t.shape), t.dtype) for n, t in q.named_buffers()}
    assert buffers == {"qweight": ((96, 64), torch.uint8), "wscales": ((96, 2), torch.bfloat16)}


def test_freeze_is_idempotent() -> None:
    q = QLinear.from_float(_linear(), get_preset("w8a8").default).freeze()
    codes = q.qweight.clone()
    assert q.freeze() is q and torch.equal(q.qweight, codes)


def test_fake_quant_weight_is_a_parameter() -> None:
    q = QLinear.from_float(_linear(), get_preset("w8a8").default)
    assert isinstance(q.weight, nn.Parameter) and not q.frozen
    assert "qweight" not in dict(q.named_buffers())


def test_dtype_conversion_leaves_packed_storage_alone() -> None:
    q = QLinear.from_float(_linear(), get_preset("w8a8-fp8").default).freeze()
    before = {n: t.clone() for n, t in q.named_buffers()}
    q.half()
    for name, t in q.named_buffers():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert q.weight_dtype == torch.float16 and q.weight.dtype == torch.float16
    assert q(torch.randn(3, 128, dtype=torch.float16)).dtype == torch.float16


def test_constructor_rejects_group_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="weight_group_size=64 must divide in_features=96"):
        QLinear(96, 32, spec=QuantSpec(weight="int4", weight_group_size=64))


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("preset", ["w8a8", "w4a4", "nvfp4"])
def test_straight_through_gradients_reach_weight_bias_and_input(preset: str) -> None:
    spec = get_preset(preset).default
    q = QLinear.from_float(_linear(), spec)
    x = torch.randn(6, 128, requires_grad=True)
    g = torch.randn(6, 96)
    q(x).backward(g)
    # STE: y = Q(x) @ Q(W)^T + b, and the quantizers' Jacobians are identities
    xq = quantize_activation(x.detach(), spec)
    wq = q.effective_weight().detach()
    assert torch.allclose(q.weight.grad, g.t() @ xq, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, g @ wq, rtol=1e-5, atol=1e-5)
    assert torch.allclose(q.bias.grad, g.sum(0))
    assert q.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_frozen_layer_still_passes_gradient_to_input() -> None:
    q = QLinear.from_float(_linear(), get_preset("w4a8").default).freeze()
    x = torch.randn(4, 128, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, q.weight.sum(0).expand(4, -1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- activation quantization is real
def test_w4a4_output_differs_from_w4a16_on_same_weights() -> None:
    lin = _linear()
    x = torch.randn(8, 128)
    a16 = QLinear.from_float(lin, get_preset("w4a16").default).freeze()
    a4 = QLinear.from_float(lin, get_preset("w4a4").default).freeze()
    assert torch.equal(a16.weight, a4.weight)  # same weight quantization (int4 g64 bf16 scales)
    assert not torch.allclose(a16(x), a4(x), atol=1e-3)


def test_activation_quantizer_runs_in_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = _linear()
    x = torch.randn(8, 128)
    a16 = QLinear.from_float(lin, get_preset("w4a16").default).freeze()
    a4 = QLinear.from_float(lin, get_preset("w4a4").default).freeze()
    y_a4 = a4(x)
    calls: list[tuple[str | None, tuple[int, ...]]] = []

    real = kernel_reference.fake_quantize_input

    def spy(t: torch.Tensor, ops: vqsuite.kernels.QLinearOperands) -> torch.Tensor:
        calls.append((ops.act, tuple(t.shape)))
        return real(t, ops)

    # the frozen reference kernel quantizes activations as the layer's operands say (vqsuite.kernels.reference)
    monkeypatch.setattr(kernel_reference, "fake_quantize_input", spy)
    assert torch.equal(a4(x), y_a4)
    assert calls == [("int4", (8, 128))]

    # with the activation quantizer made an identity, W4A4 collapses to W4A16: it was the only difference
    monkeypatch.setattr(kernel_reference, "fake_quantize_input", lambda t, ops: t)
    assert torch.equal(a4(x), a16(x))


def test_static_layer_refuses_to_run_uncalibrated() -> None:
    spec = QuantSpec(weight="int8", act="int8", act_mode="static")
    q = QLinear.from_float(_linear(), spec)
    assert torch.isnan(q.act_scale)
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(torch.randn(2, 128))


# ---------------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    "preset, size, lo, hi",
    [("w4a16", MEM_BIG, W4_MIN_COMPRESSION, 4.0), ("w8a8", 1024, INT8_MIN_COMPRESSION, INT8_MAX_COMPRESSION)],
    ids=["w4-g64-4096", "int8-1024"],
)
def test_frozen_memory_drops(preset: str, size: int, lo: float, hi: float) -> None:
    lin = nn.Linear(size, size, dtype=torch.bfloat16)
    before = vqsuite.module_nbytes(lin)
    assert before >= 2 * size * size
    q = QLinear.from_float(lin, get_preset(preset).default)
    assert vqsuite.module_nbytes(q) >= before  # fake-quant still holds the float master weight
    q.freeze()
    ratio = before / vqsuite.module_nbytes(q)
    assert lo <= ratio <= hi, f"{preset}: {ratio:.3f}x"


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("preset", sorted(SQNR_MIN_DB))
def test_sqnr_meets_per_format_bar(preset: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SQNR_SHAPE, generator=gen)
    x = torch.randn(SQNR_TOKENS, SQNR_SHAPE[1], generator=gen)
    lin = nn.Linear(SQNR_SHAPE[1], SQNR_SHAPE[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = QLinear.from_float(lin, get_preset(preset).default).freeze()
    db = sqnr_db(x @ w.t(), q(x))
    assert SQNR_MIN_DB[preset] <= db < NO_OP_CEILING_DB, f"{preset}: {db:.2f} dB"


def test_sqnr_bars_cover_every_required_format() -> None:
    assert {"w8a8", "w8a8-fp8", "w4a16", "nvfp4", "mxfp4"} <= set(SQNR_MIN_DB)


def test_nvfp4_beats_int4_g64_on_heavy_tailed_weights() -> None:
    torch.manual_seed(1)
    w = torch.distributions.StudentT(STUDENT_T_DF).sample(SQNR_SHAPE)
    x = torch.randn(SQNR_TOKENS, SQNR_SHAPE[1])
    lin = nn.Linear(SQNR_SHAPE[1], SQNR_SHAPE[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    ref = x @ w.t()
    nv = sqnr_db(ref, QLinear.from_float(lin, get_preset("w4a16-nvfp4").default).freeze()(x))
    i4 = sqnr_db(ref, QLinear.from_float(lin, get_preset("w4a16").default).freeze()(x))
    assert nv >= i4, f"NVFP4 {nv:.2f} dB < INT4 g64 {i4:.2f} dB"
