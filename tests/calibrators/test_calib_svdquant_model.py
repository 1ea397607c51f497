"""quantize_model with method="svdquant": one capture pass, shared-input groups found from the data, SVDQuant
beats RTN W4A4 on a small timm ViT, options flow from the config, the report says what was chosen, the data-free
fallback warns, and save/load round-trips bit for bit with the shared proj_down re-tied."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.calibrators.svdquant import sqnr_db
from vqsuite.nn import QLinear, QLinearLowRank
from vqsuite.pipelines.io import CONFIG_NAME

#: SVDQuant INT4 must beat RTN W4A4 on the random-init ViT by this much output SQNR (measured 13.65 vs 10.29 dB)
VIT_MIN_GAIN_DB = 1.5
VIT_KW = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=10)
#: the 3-channel patch embedding cannot take 64-channel activation groups; the 10-class head is below rank 32
VIT_EXCLUDE = ["patch_embed.*", "head"]
C = 128


def _vit(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW).eval()


@pytest.fixture(scope="module")
def vit_case() -> dict:
    model = _vit()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(4)]
    x = torch.randn(8, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = model(x)
    svdq = vqsuite.quantize_model(copy.deepcopy(model), "svdquant-int4", calib_data=calib, exclude=VIT_EXCLUDE)
    rtn = vqsuite.quantize_model(copy.deepcopy(model), "w4a4", exclude=VIT_EXCLUDE)
    return {"model": model, "x": x, "ref": ref, "svdq": svdq, "rtn": rtn}


def test_vit_svdquant_beats_rtn_w4a4(vit_case: dict) -> None:
    with torch.no_grad():
        s_svdq = sqnr_db(vit_case["ref"], vit_case["svdq"](vit_case["x"]))
        s_rtn = sqnr_db(vit_case["ref"], vit_case["rtn"](vit_case["x"]))
    assert s_svdq >= s_rtn + VIT_MIN_GAIN_DB, f"svdquant-int4 {s_svdq:.2f} dB vs w4a4 {s_rtn:.2f} dB"
    report = vit_case["svdq"].vqsuite_report
    assert len(report.quantized) == 8
    for e in report.quantized:
        assert "svdquant rank 32" in e.reason and "alpha=" in e.reason and "beta=" in e.reason, e.reason
    assert all(isinstance(m, QLinearLowRank) and m.frozen for m in vit_case["svdq"].modules() if isinstance(m, QLinear))


def test_vit_svdquant_round_trips_bit_exactly(vit_case: dict, tmp_path: Path) -> None:
    vqsuite.save_quantized(vit_case["svdq"], tmp_path / "vit")
    loaded = vqsuite.load_quantized(tmp_path / "vit", model=_vit(seed=5))
    with torch.no_grad():
        assert torch.equal(loaded(vit_case["x"]), vit_case["svdq"](vit_case["x"]))
    a, b = vit_case["svdq"].blocks[0].attn.qkv, loaded.blocks[0].attn.qkv
    assert (
        torch.equal(a.smooth, b.smooth) and torch.equal(a.proj_down, b.proj_down) and torch.equal(a.qweight, b.qweight)
    )


class Attention(nn.Module):
    """``x [B, T, C]``: q/k/v read one tensor (one shared-input group), ``out`` reads the attention result."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(C, C) for _ in range(4))
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.out):
                lin.weight.normal_(0, C**-0.5, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / C**0.5, dim=-1)
        return self.out(a @ v)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()
        self.head = nn.Linear(C, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


def _calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    out = []
    for _ in range(3):
        x = torch.randn(2, 16, C, generator=gen)
        x[..., :3] *= 20
        out.append(x)
    return out


def _svdq_config(**options) -> vqsuite.QuantConfig:
    return vqsuite.get_preset("svdquant-int4").with_overrides(method_options=options)


def test_quantize_model_groups_qkv_and_passes_options(tmp_path: Path) -> None:
    cfg = _svdq_config(num_grids=10, gptq=True, svd="randomized")
    model = vqsuite.quantize_model(Net().eval(), cfg, calib_data=_calib())
    q, k, v, out = model.attn.q, model.attn.k, model.attn.v, model.attn.out
    assert q.proj_down is k.proj_down is v.proj_down and out.proj_down is not q.proj_down
    assert torch.equal(q.smooth, v.smooth) and not torch.equal(q.smooth, out.smooth)
    assert q.svdquant_info["gptq"] and len(q.svdquant_info["grid_errors"]) == 19
    reasons = {e.name: e.reason for e in model.vqsuite_report.quantized}
    assert "shares lambda and proj_down with attn.k, attn.v" in reasons["attn.q"]
    assert "shares" not in reasons["attn.out"]
    # the 10-wide head is narrower than the rank: rank 0, still SVDQuant-calibrated (smoothing search, GPTQ)
    assert model.vqsuite_report.skipped == [] and model.head.rank == 0 and model.head.svdquant_info["gptq"]
    assert "rank 32 -> 0: layer narrower than the rank (min(N, K) = 10)" in reasons["head"]
    # the shared Parameter is stored once and re-tied on load
    x = _calib()[0]
    vqsuite.save_quantized(model, tmp_path / "ck")
    aliases = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())["aliases"]
    assert {aliases.get("attn.k.proj_down"), aliases.get("attn.v.proj_down")} == {"attn.q.proj_down"}
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=Net().eval())
    assert loaded.attn.q.proj_down is loaded.attn.k.proj_down is loaded.attn.v.proj_down
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_unfrozen_svdquant_model_freezes_to_the_same_outputs() -> None:
    """GPTQ codes are pending in the fake-quant layers; freezing stores exactly them."""
    model = vqsuite.quantize_model(
        Net().eval(), _svdq_config(num_grids=5, gptq=True, svd="randomized"), calib_data=_calib(), freeze=False
    )
    assert all(m.pending_qtensor() is not None for m in (model.attn.q, model.attn.k, model.attn.v, model.attn.out))
    x = _calib()[1]
    with torch.no_grad():
        y_fake = model(x)
        vqsuite.freeze(model)
        assert torch.equal(model(x), y_fake)


def test_svdquant_improves_on_the_data_free_split() -> None:
    x = _calib()[2]
    float_model = Net().eval()
    with torch.no_grad():
        ref = float_model.attn(x)
        calibrated = vqsuite.quantize_model(copy.deepcopy(float_model), "svdquant-int4", calib_data=_calib())
        data_free = vqsuite.quantize_model(copy.deepcopy(float_model), "svdquant-int4")
        s_cal, s_free = sqnr_db(ref, calibrated.attn(x)), sqnr_db(ref, data_free.attn(x))
    assert s_cal > s_free, f"calibrated {s_cal:.2f} dB vs data-free {s_free:.2f} dB"


def test_without_calib_data_svdquant_falls_back_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vqsuite.pipelines.modules"):
        model = vqsuite.quantize_model(Net().eval(), "svdquant-int4")
    assert "without calib_data" in caplog.text and "data-free" in caplog.text
    assert torch.equal(model.attn.q.smooth, torch.ones(C))
    rows = {e.name: e.reason for e in model.vqsuite_report.quantized}
    # the head, narrower than the rank, has no branch to initialise: plain RTN at rank 0
    assert rows.pop("head").startswith("rank 32 -> 0: layer narrower than the rank") and type(model.head) is QLinear
    assert all("data-free" in reason for reason in rows.values())


def test_layers_the_data_never_reaches_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    class Skippy(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn.q(x)

    with caplog.at_level(logging.WARNING, logger="vqsuite.pipelines.modules"):
        model = vqsuite.quantize_model(Skippy().eval(), _svdq_config(fast=True), calib_data=_calib())
    assert "never reached 3 low-rank layer(s)" in caplog.text
    reasons = {e.name: e.reason for e in model.vqsuite_report.quantized}
    assert reasons["attn.q"].startswith("svdquant rank 32") and "data-free" in reasons["attn.k"]


def test_rtn_presets_ignore_the_svdquant_path() -> None:
    model = vqsuite.quantize_model(Net().eval(), "w4a4", calib_data=_calib())
    assert type(model.attn.q) is QLinear and all(e.reason == "" for e in model.vqsuite_report.quantized)


def test_bad_options_are_rejected_before_the_model_changes() -> None:
    model = Net().eval()
    with pytest.raises(ValueError, match="unknown SVDQuant option"):
        vqsuite.quantize_model(model, _svdq_config(grids=3), calib_data=_calib())
    assert type(model.attn.q) is nn.Linear
