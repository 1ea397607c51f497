"""GPTQ: beats round-to-nearest on the output error of the same layer, reduces to RTN bit for bit with an identity
Hessian, returns a QTensor in the format's own layout; a layer frozen from that QTensor stores exactly its codes
and its fake-quant output equals the frozen one bit for bit."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from vqsuite.calibrators.gptq import gptq_quantize, hessian_from_inputs
from vqsuite.config import QuantSpec, get_preset
from vqsuite.formats import QTensor, dequantize, quantize
from vqsuite.kernels.reference import unpack_weight_codes
from vqsuite.nn import QLinear

K, N = 256, 128
#: GPTQ must cut the held-out output error of RTN by at least this factor (measured 1.5-1.65x on correlated inputs)
GPTQ_MIN_GAIN = 1.2

SPECS = {
    "int4-g64": get_preset("w4a4").default,
    "nvfp4": get_preset("nvfp4").default,
    "int8-channel": get_preset("w8a8").default,
    "mxfp4": get_preset("mxfp4").default,
    "int4-asym-g64": QuantSpec(weight="int4_asym", weight_group_size=64),
    "fp8-channel": QuantSpec(weight="fp8_e4m3"),
}
BRIEF_SPECS = ["int4-g64", "nvfp4", "int8-channel"]


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight [N, K], correlated calibration inputs [2048, K] and held-out inputs from the same distribution."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=gen) / K**0.5 + torch.eye(K)
    w = torch.randn(N, K, generator=gen) * K**-0.5
    return w, torch.randn(2048, K, generator=gen) @ mix, torch.randn(1024, K, generator=gen) @ mix


def _err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.t() - x @ wq.t()).double().pow(2).sum())


def _rtn(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    return quantize(w, spec.weight, group_size=spec.weight_group_size, scale_dtype=spec.torch_scale_dtype)


def _bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


def _same_qtensor(a: QTensor, b: QTensor) -> bool:
    pairs = [(a.codes, b.codes), (a.scales, b.scales), (a.zero_points, b.zero_points), (a.tensor_scale, b.tensor_scale)]
    return (a.fmt, a.group_size) == (b.fmt, b.group_size) and all(
        (p is None and q is None)
        or (p is not None and q is not None and p.dtype == q.dtype and torch.equal(_bytes(p), _bytes(q)))
        for p, q in pairs
    )


@pytest.mark.parametrize("scale_mode", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_beats_rtn_on_held_out_output_error(name: str, scale_mode: str) -> None:
    spec = SPECS[name]
    w, x, x_test = _problem()
    qt = gptq_quantize(w, hessian_from_inputs(x), spec, scale_mode=scale_mode)
    e_gptq = _err(x_test, w, dequantize(qt))
    e_rtn = _err(x_test, w, dequantize(_rtn(w, spec)))
    assert e_rtn / e_gptq >= GPTQ_MIN_GAIN, f"{name}/{scale_mode}: RTN {e_rtn:.4g} vs GPTQ {e_gptq:.4g}"


@pytest.mark.parametrize("scale_mode", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(SPECS))
def test_identity_hessian_gives_rtn_bit_for_bit(name: str, scale_mode: str) -> None:
    """No correlation, nothing to compensate: the codes and scales are round-to-nearest's, in its layout."""
    spec = SPECS[name]
    w, _, _ = _problem(1)
    qt = gptq_quantize(w, torch.eye(K, dtype=torch.float64), spec, scale_mode=scale_mode)
    assert _same_qtensor(qt, _rtn(w, spec))


def test_group_scales_come_from_the_updated_weights() -> None:
    """dynamic: the second INT4 group's scale is its amax after the first group's errors were pushed onto it, so it
    differs from the scale of the unmodified weight; static uses the unmodified one."""
    spec = SPECS["int4-g64"]
    w, x, _ = _problem(2)
    h = hessian_from_inputs(x)
    dyn, sta = gptq_quantize(w, h, spec), gptq_quantize(w, h, spec, scale_mode="static")
    rtn = _rtn(w, spec)
    assert torch.equal(dyn.scales[:, 0], rtn.scales[:, 0])  # the first group sees the weight as it was
    assert not torch.equal(dyn.scales[:, 1:], rtn.scales[:, 1:])
    assert torch.equal(sta.scales, rtn.scales)


def test_dead_inputs_zero_their_columns() -> None:
    spec = SPECS["int8-channel"]
    w, x, _ = _problem(3)
    x[:, 5] = 0
    qt = gptq_quantize(w, hessian_from_inputs(x), spec)
    assert torch.all(qt.codes[:, 5] == 0)


def test_bad_arguments_are_rejected() -> None:
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, torch.eye(32), SPECS["int4-g64"])
    with pytest.raises(ValueError, match="no weight format"):
        gptq_quantize(w, torch.eye(64), QuantSpec(weight=None, act="int8", act_mode="dynamic_per_token"))
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(torch.full((8, 64), float("nan")), torch.eye(64), SPECS["int4-g64"])


# ------------------------------------------------------------------ layers frozen from a QTensor
def _layer(spec: QuantSpec, seed: int = 0) -> tuple[QLinear, QTensor, torch.Tensor]:
    w, x, x_test = _problem(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = QLinear.from_float(lin, spec)
    return q, gptq_quantize(w, hessian_from_inputs(x), spec), x_test


@pytest.mark.parametrize("name", BRIEF_SPECS)
def test_pending_qtensor_fake_quant_equals_frozen_bit_for_bit(name: str) -> None:
    spec = SPECS[name]
    q, qt, x = _layer(spec)
    q.set_pending_qtensor(qt)
    assert torch.equal(q.weight, dequantize(qt))
    y_fake = q(x)
    q.freeze()
    assert torch.equal(q(x), y_fake)
    stored = unpack_weight_codes(q.qweight, spec.weight)
    assert torch.equal(_bytes(stored), _bytes(qt.codes))
    assert torch.equal(_bytes(q.wscales), _bytes(qt.scales))
    assert q.pending_qtensor() is None


@pytest.mark.parametrize("name", BRIEF_SPECS)
def test_freeze_from_a_given_qtensor_stores_it(name: str) -> None:
    spec = SPECS[name]
    q, qt, x = _layer(spec)
    ref = copy.deepcopy(q)
    ref.set_pending_qtensor(qt)
    q.freeze(qt)
    assert torch.equal(q(x), ref(x))
    assert torch.equal(_bytes(unpack_weight_codes(q.qweight, spec.weight)), _bytes(qt.codes))


@pytest.mark.parametrize(
    "name, scale_mode", [("int8-channel", "dynamic"), ("int4-g64", "static"), ("nvfp4", "static")], ids=str
)
def test_requantizing_the_gptq_weight_would_not_give_its_values(name: str, scale_mode: str) -> None:
    """Why the QTensor is kept: error feedback pushes weights past the scale's range (codes clamp at -128/127,
    -8/7, ±6), so round-to-nearest of the dequantized GPTQ weight picks other scales and other values."""
    spec = SPECS[name]
    w, x, _ = _problem()
    qt = gptq_quantize(w, hessian_from_inputs(x), spec, scale_mode=scale_mode)
    assert not torch.equal(dequantize(_rtn(dequantize(qt), spec)), dequantize(qt))


def test_pending_qtensor_follows_copies_and_conversions() -> None:
    spec = SPECS["nvfp4"]
    q, qt, x = _layer(spec)
    q.set_pending_qtensor(qt)
    y = q(x)
    clone = copy.deepcopy(q)
    assert clone.pending_qtensor() is not None and torch.equal(clone(x), y)
    q.to(torch.bfloat16)  # the master weight is re-cast; the codes stay
    assert q.pending_qtensor() is not None
    xb = x.to(torch.bfloat16)
    assert torch.equal(q(xb), q.freeze()(xb))


def test_a_changed_master_weight_drops_the_pending_qtensor(caplog: pytest.LogCaptureFixture) -> None:
    spec = SPECS["int4-g64"]
    q, qt, x = _layer(spec)
    q.set_pending_qtensor(qt)
    with torch.no_grad():
        q.weight.add_(0.01)  # an optimizer step
    with caplog.at_level(logging.WARNING, logger="vqsuite.nn.base"):
        y = q(x)
    assert "changed after its codes were chosen" in caplog.text
    assert q.pending_qtensor() is None
    rtn = QLinear.from_float(nn.Linear(K, N), spec)
    with torch.no_grad():
        rtn.weight.copy_(q.weight)
        rtn.bias.copy_(q.bias)
    assert torch.equal(y, rtn(x))


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda qt: QTensor(qt.codes, qt.scales, "int8", qt.group_size), "does not match spec.weight"),
        (lambda qt: QTensor(qt.codes, qt.scales, qt.fmt, 128), "group_size=128"),
        (lambda qt: QTensor(qt.codes[:, :128], qt.scales[:, :2], qt.fmt, qt.group_size), "codes has shape"),
        (lambda qt: QTensor(qt.codes, qt.scales.float(), qt.fmt, qt.group_size), "wscales"),
    ],
    ids=["format", "group", "shape", "scale-dtype"],
)
def test_a_mismatched_qtensor_is_rejected(change, needle: str) -> None:
    q, qt, _ = _layer(SPECS["int4-g64"])
    bad = change(qt)
    with pytest.raises(ValueError, match=needle):
        q.freeze(bad)
    with pytest.raises(ValueError, match=needle):
        q.set_pending_qtensor(bad)
    assert not q.frozen
    q.freeze()
    with pytest.raises(RuntimeError, match="already frozen"):
        q.freeze(qt)


def test_pending_probe_addresses_large_weights() -> None:
    """The change detector indexes the weight exactly (a float32 linspace would overrun past 2^24 elements)."""
    from vqsuite.nn.base import PENDING_PROBE_ELEMENTS, _probe

    w = torch.arange(2**24 + 3, dtype=torch.float64)
    p = _probe(w)
    assert p.shape == (PENDING_PROBE_ELEMENTS,) and p[0] == 0 and p[-1] == 2**24 + 2
    assert _probe(torch.ones(1)).shape == (1,)
