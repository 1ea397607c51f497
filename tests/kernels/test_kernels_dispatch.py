"""Kernel dispatch: ``prefer(...)`` scoping, the spec's ``kernel`` field, fast-path selection and fallback,
refusals (``"triton"`` without a fast kernel, an unknown preference)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import vqsuite.kernels as kernels
from vqsuite.config import get_preset
from vqsuite.kernels import dispatch, reference
from vqsuite.nn import QConv2d, QLinear


def _frozen_linear(kernel: str = "auto", preset: str = "w4a8") -> QLinear:
    lin = nn.Linear(64, 32)
    return QLinear.from_float(lin, get_preset(preset).default.replace(kernel=kernel)).freeze()


@pytest.fixture
def no_fast_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU runs have no fast kernels; make that explicit so a GPU machine's registrations do not leak in."""
    monkeypatch.setattr(dispatch, "_FAST", {})


@pytest.fixture
def fake_fast_qlinear(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Register a 'fast' qlinear that accepts only 2-D inputs and records its calls."""
    calls: list[str] = []

    def fn(x: torch.Tensor, ops: kernels.QLinearOperands) -> torch.Tensor:
        calls.append("fast")
        return reference.qlinear(x, ops)

    monkeypatch.setattr(dispatch, "_FAST", {})
    dispatch.register_fast("qlinear", dispatch.KernelImpl("fake-fast", fn, lambda x, ops: x.ndim == 2))
    return calls


def test_prefer_reference_runs_the_reference(no_fast_kernels: None) -> None:
    q = _frozen_linear()
    x = torch.randn(4, 64)
    with kernels.prefer("reference"):
        assert kernels.current_preference() == "reference"
        y = q(x)
    assert torch.equal(y, reference.qlinear(x, q))
    assert kernels.current_preference() == "auto"


def test_prefer_triton_without_fast_kernel_raises(no_fast_kernels: None) -> None:
    q = _frozen_linear()
    with kernels.prefer("triton"), pytest.raises(RuntimeError, match="no fast qlinear kernel"):
        q(torch.randn(4, 64))
    # the failed block did not leave "triton" behind
    assert kernels.current_preference() == "auto"
    assert q(torch.randn(4, 64)).shape == (4, 32)


def test_spec_kernel_triton_raises_and_prefer_reference_overrides_it(no_fast_kernels: None) -> None:
    q = _frozen_linear(kernel="triton")
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="'triton'"):
        q(x)
    with kernels.prefer("reference"):
        y = q(x)
    assert torch.equal(y, _frozen_linear_like(q)(x))


def _frozen_linear_like(q: QLinear) -> QLinear:
    """A kernel='auto' twin holding the same frozen storage."""
    twin = QLinear(q.in_features, q.out_features, spec=q.spec.replace(kernel="auto")).freeze_empty("cpu")
    twin.load_state_dict(q.state_dict())
    return twin


def test_conv_dequantize_path_honours_preference(no_fast_kernels: None) -> None:
    conv = nn.Conv2d(64, 16, 1)
    q = QConv2d.from_float(conv, get_preset("w4a16").default.replace(kernel="triton")).freeze()
    with pytest.raises(RuntimeError, match="no fast dequantize_weight kernel"):
        q(torch.randn(1, 64, 4, 4))
    with kernels.prefer("reference"):
        assert q(torch.randn(1, 64, 4, 4)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("bad", ["cuda", "", "Triton", "fast"])
def test_invalid_preference_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match=f"preference={bad!r}"):
        with kernels.prefer(bad):
            pass  # pragma: no cover - never entered
    assert kernels.current_preference() == "auto"


def test_innermost_preference_wins_and_unwinds() -> None:
    with kernels.prefer("triton"):
        with kernels.prefer("reference"):
            assert kernels.current_preference() == "reference"
        assert kernels.current_preference() == "triton"
    assert kernels.current_preference("reference") == "reference"  # the spec default applies outside blocks


def test_auto_takes_an_accepting_fast_kernel_and_falls_back_otherwise(fake_fast_qlinear: list[str]) -> None:
    q = _frozen_linear()
    x2 = torch.randn(4, 64)
    y_fast = q(x2)
    assert fake_fast_qlinear == ["fast"]
    assert torch.equal(y_fast, reference.qlinear(x2, q))
    q(torch.randn(2, 4, 64))  # 3-D: the fast kernel declines, auto falls back silently
    assert fake_fast_qlinear == ["fast"]
    with kernels.prefer("triton"), pytest.raises(RuntimeError):
        q(torch.randn(2, 4, 64))
    with kernels.prefer("reference"):
        q(x2)
    assert fake_fast_qlinear == ["fast"]
    with kernels.prefer("triton"):
        q(x2)
    assert fake_fast_qlinear == ["fast", "fast"]


def test_select_logs_each_choice_once(no_fast_kernels: None, caplog: pytest.LogCaptureFixture) -> None:
    key = ("test-op-key", 123)
    caplog.set_level(logging.INFO, logger="vqsuite.kernels.dispatch")
    for _ in range(3):
        name, fn = kernels.select("qlinear", "auto", key)
        assert name == "reference" and fn is reference.qlinear
    assert sum(str(key) in r.getMessage() for r in caplog.records) == 1
