"""An empty batch (zero tokens or zero samples) is a valid forward for every quantized layer: it returns the empty
output of the right shape and dtype in fake-quant and frozen state, for every activation mode and under every kernel
preference; calibration ignores empty batches; quantizing an empty *weight* is still an error."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.calibrators.capture import capture_inputs
from vqsuite.config import QuantSpec, get_preset
from vqsuite.errors import UserError
from vqsuite.formats import quantize
from vqsuite.kernels import prefer
from vqsuite.nn import CONV_TWINS, QLinear, QLinearLowRank, QuantLayer

#: one spec per activation mode (and the low-rank and 4-bit/FP4 forms of the dynamic ones)
SPECS: dict[str, QuantSpec] = {
    "dynamic-int8-token": get_preset("w8a8").default,
    "dynamic-int4-group": get_preset("w4a4").default,
    "dynamic-nvfp4": get_preset("nvfp4").default,
    "dynamic-lowrank": get_preset("svdquant-int4").default.replace(rank=8),
    "static-int8": QuantSpec(weight="int8", act="int8", act_mode="static"),
    "static-per-step": get_preset("w4a8-static").default,
    "none-int4": get_preset("w4a16").default,
    "none-int8": get_preset("w8a16").default,
}
#: the frozen QLinear's kernel preferences ("triton" demands any fast kernel: the CPU family here)
PREFERENCES = ["reference", "auto", "triton"]
STATIC_SCALE = 0.05
K, N = 64, 32


def _calibrated(layer: QuantLayer) -> QuantLayer:
    if layer.spec.act_mode == "static":
        layer._buffers["act_scale"].fill_(STATIC_SCALE)
    return layer


def _linear(spec_name: str, dtype: torch.dtype) -> QuantLayer:
    spec = SPECS[spec_name]
    torch.manual_seed(0)
    f = nn.Linear(K, N).to(dtype)
    return _calibrated((QLinearLowRank if spec.rank else QLinear).from_float(f, spec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_linear_empty_batch_fake_quant_and_frozen_every_preference(spec_name: str, dtype: torch.dtype) -> None:
    q = _linear(spec_name, dtype)
    frozen = copy.deepcopy(q).freeze()
    for shape in [(0, K), (2, 0, K), (0, 3, K)]:
        x = torch.randn(shape, dtype=dtype)
        expected_shape = (*shape[:-1], N)
        y = q(x)
        assert y.shape == expected_shape and y.dtype == dtype
        for pref in PREFERENCES:
            with prefer(pref):
                yf = frozen(x)
            assert yf.shape == expected_shape and yf.dtype == dtype, pref
    # the same layers still compute non-empty batches (the empty path changed no cached kernel choice)
    x = torch.randn(3, K, dtype=dtype)
    with prefer("reference"):
        assert torch.equal(frozen(x), q(x))


@pytest.mark.parametrize("spec_name", ["dynamic-int8-token", "static-int8", "none-int8"])
@pytest.mark.parametrize("float_type", list(CONV_TWINS), ids=lambda t: t.__name__)
def test_conv_empty_batch_fake_quant_and_frozen(float_type: type, spec_name: str) -> None:
    torch.manual_seed(0)
    f = float_type(16, 8, 3, stride=2, padding=1)
    dims = len(f.kernel_size)
    q = _calibrated(CONV_TWINS[float_type].from_float(f, SPECS[spec_name]))
    x = torch.randn(0, 16, *([5] * dims))
    expected = f(x).shape
    assert expected[0] == 0
    for state in ("fake-quant", "frozen"):
        y = q(x)
        assert y.shape == expected and y.dtype == x.dtype, state
        q.freeze()


def test_empty_batch_gradients_flow_and_are_zero() -> None:
    q = _linear("dynamic-int8-token", torch.float32)
    x = torch.randn(0, K, requires_grad=True)
    q(x).sum().backward()
    assert q.weight.grad is not None and torch.equal(q.weight.grad, torch.zeros_like(q.weight))
    assert x.grad is not None and x.grad.shape == (0, K)


def test_empty_weight_is_still_an_error() -> None:
    with pytest.raises(UserError, match="empty"):
        quantize(torch.empty(0, 16), "int8")


def test_cpu_kernel_family_declines_an_empty_batch() -> None:
    """The dispatcher's fast families never see zero rows (the layer answers them; called directly, the CPU family
    declines; the Triton families' ``accepts`` decline too, not imported here: importing triton costs seconds)."""
    from vqsuite.kernels.cpu import qlinear as cpu_qlinear

    frozen = _linear("none-int4", torch.bfloat16).freeze()
    assert not cpu_qlinear.accepts(torch.randn(0, K, dtype=torch.bfloat16), layer=frozen)
    assert cpu_qlinear.accepts(torch.randn(2, K, dtype=torch.bfloat16), layer=frozen)


# ---------------------------------------------------------------------------- calibration skips empty batches
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, 2 * K), nn.GELU(), nn.Linear(2 * K, K))


@pytest.mark.parametrize("spec_name", ["static-int8", "static-per-step"])
def test_static_calibration_ignores_empty_batches(spec_name: str) -> None:
    x = torch.randn(8, K)
    plain, with_empty = _net(), _net()
    vqsuite.quantize_model(plain, SPECS[spec_name], calib_data=[x])
    vqsuite.quantize_model(with_empty, SPECS[spec_name], calib_data=[x[:0], x, torch.randn(2, 0, K)])
    for (n, a), (_, b) in zip(plain.state_dict().items(), with_empty.state_dict().items(), strict=True):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), n
    assert torch.isfinite(plain[0].act_scale)


def test_input_capture_ignores_empty_batches() -> None:
    """The capture that SVDQuant, smoothing and GPTQ calibrate from: an empty batch adds no row, no range."""
    layers: dict[str, Callable] = {"lin": nn.Linear(K, N), "conv": nn.Conv1d(K, N, 3)}
    x, xc = torch.randn(4, K), torch.randn(2, K, 5)
    stats = []
    for extra in (False, True):
        with capture_inputs(layers, track_gram=True) as st:
            if extra:
                layers["lin"](x[:0])
                layers["conv"](xc[:0])
            layers["lin"](x)
            layers["conv"](xc)
        stats.append(st)
    for name in layers:
        a, b = stats[0][name], stats[1][name]
        assert a.n_rows == b.n_rows and torch.equal(a.absmax, b.absmax) and torch.equal(a.gram, b.gram)
        assert torch.equal(a.sample, b.sample)
    assert stats[0]["conv"].n_rows == 2 * 5  # a Conv1d's rows are its positions, channels last


def test_shared_input_tracking_ignores_empty_batches() -> None:
    """Two unrelated empty inputs both have data pointer 0: they must not make their layers look like q/k/v
    partners (which would share a smoothing vector)."""
    from vqsuite.calibrators.shared_inputs import track_shared_inputs

    a, b, c = nn.Linear(K, N), nn.Linear(K, N), nn.Linear(K, N)
    x = torch.randn(3, K)
    with track_shared_inputs({"a": a, "b": b, "c": c}) as tracker:
        a(torch.randn(0, K))
        b(torch.randn(0, K))
        b(x)
        c(x)
    assert tracker.groups(["a", "b", "c"]) == [["a"], ["b", "c"]]


def test_quantize_model_skips_a_layer_with_an_empty_weight() -> None:
    """``Linear(K, 0)`` (a width rounded down to zero) is a valid float layer: it is skipped and reported, the rest
    is quantized, and the model still runs."""
    model = nn.Sequential(nn.Linear(64, 0), nn.Linear(64, 64))
    vqsuite.quantize_model(model, "w8a8")
    entries = {e.name: e for e in model.vqsuite_report.layers}
    assert entries["0"].status == "skipped" and "empty weight" in entries["0"].reason
    assert entries["1"].status == "quantized" and isinstance(model[1], QLinear)
    x = torch.randn(3, 64)
    assert model[0](x).shape == (3, 0) and model[1](x).shape == (3, 64)
