"""Group fallback: a layer whose reduction length the recipe's integer group does not divide gets a smaller group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.config import MIN_FALLBACK_GROUP, QuantSpec, get_preset


@pytest.mark.parametrize(
    ("k", "expected"),
    [(256, 64), (288, 32), (864, 32), (32, 32), (48, 16), (24, None)],
    ids=["fits", "K288", "K864", "K32", "K48", "K24-none"],
)
def test_with_fitting_groups_halves_until_it_divides(k: int, expected: int | None) -> None:
    spec = get_preset("w4a4").default  # INT4 g64 weights and activations
    fitted = spec.with_fitting_groups(k)
    if expected is None:
        assert fitted is None
        return
    assert fitted is not None and fitted.weight_group_size == expected and fitted.incompatibility(k) is None
    if spec.act_mode == "dynamic_per_group":
        assert fitted.act_group_size == expected
    assert expected >= MIN_FALLBACK_GROUP


def test_block_formats_keep_their_block() -> None:
    spec = get_preset("nvfp4").default
    assert spec.with_fitting_groups(24) is None  # NVFP4's 16-block is the format itself


def test_quantize_model_reports_fallback_and_round_trips(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(288, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(5, 288)
    vqsuite.quantize_model(model, "w4a16")
    rows = {e.name: e for e in model.vqsuite_report.layers}
    assert rows["0"].status == "quantized" and "group fallback" in rows["0"].reason
    assert model[0].spec.weight_group_size == 32 and model[2].spec.weight_group_size == 64
    with torch.no_grad():
        y = model(x)
    vqsuite.save_quantized(model, tmp_path / "m")
    fresh = nn.Sequential(nn.Linear(288, 64), nn.ReLU(), nn.Linear(64, 10))
    loaded = vqsuite.load_quantized(tmp_path / "m", model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_fallback_can_be_turned_off() -> None:
    model = nn.Sequential(nn.Linear(288, 64))
    with pytest.warns(UserWarning):
        vqsuite.quantize_model(model, "w4a16", group_fallback=False)
    (row,) = model.vqsuite_report.layers
    assert row.status == "skipped" and "must divide" in row.reason


def test_spec_short_names_the_fallback_group() -> None:
    assert "g32" in QuantSpec(weight="int4", weight_group_size=32).short()
