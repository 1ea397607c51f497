"""Calibration sees a layer called by keyword (``proj_in(input=x)``, as diffusers' UNetMotionModel does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.calibrators.layer_input import layer_input


class KeywordCaller(nn.Module):
    """Calls ``proj`` by keyword and ``head`` positionally; ``by_keyword=False`` calls both positionally."""

    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.proj = nn.Linear(64, 64)
        self.head = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(input=x) if self.by_keyword else self.proj(x)
        return self.head(torch.relu(h))


def _quantized(by_keyword: bool, preset: str) -> nn.Module:
    torch.manual_seed(0)
    model = KeywordCaller(by_keyword)
    data = [torch.randn(8, 64) for _ in range(2)]
    return vqsuite.quantize_model(model, preset, calib_data=data)


def test_layer_input_positional_and_keyword() -> None:
    x = torch.randn(2, 3)
    assert layer_input((x,), {}) is x
    assert layer_input((), {"input": x}) is x
    assert layer_input((), {}) is None
    assert layer_input(("not a tensor",), {}) is None


@pytest.mark.parametrize("preset", ["w4a4-static", "w4a8-static"])
def test_static_scales_of_a_keyword_called_layer_match_positional(preset: str) -> None:
    """The static activation scale of ``proj`` is calibrated the same whether it is called by keyword or not."""
    by_kw, by_pos = _quantized(True, preset), _quantized(False, preset)
    scale_kw, scale_pos = by_kw.proj.current_act_scale(), by_pos.proj.current_act_scale()
    assert scale_kw is not None and scale_pos is not None
    torch.testing.assert_close(scale_kw, scale_pos, rtol=0, atol=0)


def test_svdquant_calibrates_a_keyword_called_layer() -> None:
    """SVDQuant captures the keyword-called layer's input: same smoothing as the positional call."""
    by_kw, by_pos = _quantized(True, "svdquant-int4"), _quantized(False, "svdquant-int4")
    assert by_kw.proj.smooth is not None
    torch.testing.assert_close(by_kw.proj.smooth, by_pos.proj.smooth, rtol=0, atol=0)
