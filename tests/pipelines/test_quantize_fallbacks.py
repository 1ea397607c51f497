"""quantize_model's fallbacks (issue 17): a Linear narrower than the rank gets a smaller rank (or rank 0), a conv
under a low-rank recipe rank 0, and a reduction length below every integer group per-channel weights / per-token
activations (a 4-bit weight on an odd K its 8-bit format). Block formats (NVFP4, MXFP4) still skip, saying why."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.calibrators.svdquant import sqnr_db
from vqsuite.config import QuantConfig, get_preset
from vqsuite.nn import QConv2d, QLinear, QLinearLowRank
from vqsuite.pipelines.modules import MIN_FALLBACK_RANK
from vqsuite.pipelines.report import LayerEntry

#: a small timm ResNet-18 (random init) must have at least this fraction of its matrix weights quantized
MIN_QUANTIZED_FRACTION = 0.9
#: output SQNR of that ResNet vs float under svdquant-int4 (W4A4 in every layer of a random-init network: measured
#: 10.3-12.2 dB over seeds 0-2) and under svdquant-int4-w8a8 (measured 34.6-37.1 dB)
RESNET_W4A4_SQNR_DB = 8.0
RESNET_W8A8_SQNR_DB = 30.0
#: output SQNR of one w4a4 fallback conv vs its float twin (INT4 g32 activations dominate): per-channel INT8
#: weights on K = 9 and 25 measured 20.2-20.9 dB, per-channel INT4 weights on K = 18 18.6-19.0 dB (seeds 0-3)
FALLBACK_CONV_SQNR_DB = 15.0


def _svdq(preset: str = "svdquant-int4") -> QuantConfig:
    return get_preset(preset).with_overrides(method_options={"fast": True})


def _rows(model: nn.Module) -> dict[str, LayerEntry]:
    return {e.name: e for e in model.vqsuite_report.layers}


def _quietly(model: nn.Module, config, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every case here quantizes most of the model
        return vqsuite.quantize_model(model, config, **kw)


# ---------------------------------------------------------------------------- QuantSpec.with_fallbacks
@pytest.mark.parametrize(
    ("preset", "k", "act", "expected"),
    [
        ("w4a4", 288, None, "W:int4/g32 A:int4/g32"),  # halving, as before
        ("w4a4", 18, 32, "W:int4/ch A:int4/g32"),  # no group divides 18: per channel (even K: still INT4)
        ("w4a4", 9, 32, "W:int8/ch A:int4/g32"),  # depthwise 3x3: per channel, odd K -> INT8
        ("w4a4", 147, 3, "W:int8/ch A:int4/tok"),  # 7x7 RGB stem: 3 activation channels -> per token
        ("w4a16", 25, None, "W:int8/ch A:16"),  # depthwise 5x5
        ("w4a8-static", 27, 3, "W:int8/ch A:int8/static/step"),  # per-channel INT4 already: only the packing
        ("w8a8", 9, 32, "W:int8/ch A:int8/tok"),  # fits as is
        ("nvfp4", 9, 32, None),  # the block is the format
        ("nvfp4", 32, 3, None),  # activation blocks of 16 over 3 channels
        ("mxfp4", 16, 16, None),
    ],
    ids=["K288", "K18", "dw3x3", "stem7x7", "dw5x5-w4a16", "stem-static", "fits", "nvfp4-K9", "nvfp4-C3", "mxfp4"],
)
def test_with_fallbacks_gives_the_nearest_spec(preset: str, k: int, act: int | None, expected: str | None) -> None:
    spec = get_preset(preset).default
    got = spec.with_fallbacks(k, act_features=act)
    if expected is None:
        assert got is None
        return
    fitted, notes = got
    assert fitted.short() == expected
    fitted.validate_for(k, act_features=act)  # the layers' own check accepts it
    assert bool(notes) == (fitted != spec)
    assert fitted.act == spec.act and fitted.scale_dtype == spec.scale_dtype and fitted.rank == spec.rank


# ---------------------------------------------------------------------------- a small timm ResNet
def _resnet(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    # resnet18 with 1/4 of the block widths: stem K = 147 (3 -> 64), 3x3 convs K = 144 (g16), 288 (g32), 576, 1152;
    # 10-class head (128 -> 10)
    return timm.create_model(
        "resnet18", pretrained=False, num_classes=10, channels=(16, 32, 64, 128), stem_width=16
    ).eval()


def test_small_resnet_under_svdquant_is_quantized() -> None:
    """Before the fallbacks svdquant-int4 quantized nothing here: stem (g64 vs K = 147), head (rank 32 vs 10 classes)
    and every conv (then without a low-rank branch) were skipped. Convs now take the branch at the useful rank of
    their GEMM view (``vqsuite.nn.conv_lowrank``)."""
    float_model = _resnet()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = float_model(x)
    model = _quietly(copy.deepcopy(float_model), "svdquant-int4", calib_data=calib)
    report = model.vqsuite_report
    assert report.quantized_fraction >= MIN_QUANTIZED_FRACTION and report.skipped == []
    rows = _rows(model)
    stem = rows["conv1"]
    assert stem.spec == "W:int8/ch A:int4/tok r16"  # GEMM [64, 147]: rank min(N, K) / 4
    for note in ("conv low-rank rank 16", "group fallback", "per channel", "int4 -> int8"):
        assert note in stem.reason, stem.reason
    assert rows["layer1.0.conv2"].spec == "W:int4/g16 A:int4/g16 r4"  # K = 144: halved group; N = 16: rank 4
    assert all("conv low-rank rank" in e.reason for e in report.quantized if e.type == "Conv2d")
    assert isinstance(model.fc, QLinearLowRank) and model.fc.rank == 0  # SVDQuant-calibrated, no branch
    assert rows["fc"].reason.startswith("svdquant rank 0")
    assert "rank 32 -> 0: layer narrower than the rank (min(N, K) = 10)" in rows["fc"].reason
    with torch.no_grad():
        y = model(x)
    assert bool(torch.isfinite(y).all())
    assert sqnr_db(ref, y) >= RESNET_W4A4_SQNR_DB
    model8 = _quietly(copy.deepcopy(float_model), "svdquant-int4-w8a8", calib_data=calib)
    with torch.no_grad():
        assert sqnr_db(ref, model8(x)) >= RESNET_W8A8_SQNR_DB


# ---------------------------------------------------------------------------- rank fallback
@pytest.mark.parametrize(
    ("n", "k", "rank"),
    [(32, 256, 8), (256, 24, 4), (16, 128, 4), (12, 128, 0), (10, 128, 0), (48, 128, 32)],
    ids=["N32", "K24", "N16", "N12-rank0", "N10-rank0", "N48-keeps"],
)
def test_narrow_linear_gets_the_fallback_rank(n: int, k: int, rank: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n)).eval()
    x = torch.randn(64, k)
    _quietly(model, _svdq(), calib_data=x)
    (row,) = model.vqsuite_report.layers
    q = model[0]
    assert row.status == "quantized" and isinstance(q, QLinearLowRank) and q.rank == rank
    assert row.reason.startswith(f"svdquant rank {rank}")
    if rank == 32:
        assert "narrower" not in row.reason
    else:
        assert f"rank 32 -> {rank}: layer narrower than the rank (min(N, K) = {min(n, k)})" in row.reason
        assert rank == 0 or rank >= MIN_FALLBACK_RANK


def test_rank_fallback_can_be_turned_off() -> None:
    model = nn.Sequential(nn.Linear(64, 10), nn.Conv2d(64, 8, 1))
    with pytest.warns(UserWarning, match="quantized NOTHING"):
        vqsuite.quantize_model(model, "svdquant-int4", rank_fallback=False)
    reasons = {e.name: e.reason for e in model.vqsuite_report.skipped}
    assert reasons["0"] == "rank=32 exceeds min(in_features, out_features)=10"
    assert reasons["1"] == "rank=32 exceeds min(N, K)=8 of the conv's GEMM view [8, 64]"


class _Attention(nn.Module):
    """q/k/v read the same tensor (a shared-input group); ``x [B, T, 64] -> [B, T, 64]``."""

    def __init__(self, kv: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, kv), nn.Linear(64, kv)
        self.out = nn.Linear(64 + 2 * kv, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1))


def test_shared_input_groups_share_one_rank() -> None:
    """Members of a shared-input group share ``proj_down`` only when they have the same rank."""
    torch.manual_seed(0)
    calib = torch.randn(4, 16, 64)
    model = _quietly(_Attention(kv=16).eval(), _svdq(), calib_data=calib)
    q, k, v = model.q, model.k, model.v
    assert (q.rank, k.rank, v.rank) == (32, 4, 4)  # 64 wide keeps 32; 16 wide: 16/4 = 4
    assert k.proj_down is v.proj_down and q.proj_down is not k.proj_down
    assert torch.equal(k.smooth, v.smooth)
    reasons = {e.name: e.reason for e in model.vqsuite_report.quantized}
    assert "shares lambda and proj_down with v" in reasons["k"] and "shares" not in reasons["q"]
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        assert bool(torch.isfinite(model(x)).all())


# ---------------------------------------------------------------------------- group fallback, block formats
class _Stem(nn.Module):
    """RGB stem (K = 27), depthwise 3x3 (K = 9) and 5x5 (K = 25), grouped conv (K = 18), pointwise (K = 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw3 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.dw5 = nn.Conv2d(32, 32, 5, padding=2, groups=32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(32, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.dw3, self.dw5, self.grouped, self.pw):
            x = torch.relu(conv(x))
        return x


EXPECTED_W4A4 = {
    "stem": "W:int8/ch A:int4/tok",
    "dw3": "W:int8/ch A:int4/g32",
    "dw5": "W:int8/ch A:int4/g32",
    "grouped": "W:int4/ch A:int4/g32",
    "pw": "W:int4/g32 A:int4/g32",
}


def test_depthwise_and_stem_layers_get_per_channel_specs() -> None:
    torch.manual_seed(0)
    float_model = _Stem().eval()
    model = _quietly(copy.deepcopy(float_model), "w4a4")
    rows = _rows(model)
    assert {n: rows[n].spec for n in EXPECTED_W4A4} == EXPECTED_W4A4
    assert "per token (length=3)" in rows["stem"].reason and "int4 -> int8" in rows["dw3"].reason
    assert "per channel (length=18)" in rows["grouped"].reason and "int4 -> int8" not in rows["grouped"].reason
    x = torch.randn(2, 32, 8, 8)
    for name in ("dw3", "dw5", "grouped"):
        q = model.get_submodule(name)
        assert isinstance(q, QConv2d) and q.frozen
        with torch.no_grad():
            assert sqnr_db(float_model.get_submodule(name)(x), q(x)) >= FALLBACK_CONV_SQNR_DB, name


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "svdquant-nvfp4"])
def test_block_formats_skip_with_a_clear_reason(preset: str) -> None:
    with pytest.warns(UserWarning, match="quantized only"):
        model = vqsuite.quantize_model(_Stem().eval(), preset)
    reasons = {e.name: e.reason for e in model.vqsuite_report.skipped}
    block = {"nvfp4": 16, "mxfp4": 32, "svdquant-nvfp4": 16}[preset]
    fmt = preset.removeprefix("svdquant-")
    assert reasons["dw3"].startswith(f"weight_group_size={block} must divide in_features=9")
    assert f"{fmt} blocks of {block} are fixed by the format: no group fallback" in reasons["dw3"]
    assert "stem" in reasons and isinstance(model.pw, QConv2d)  # K = 32 fits either block
    if preset.startswith("svdquant"):
        assert "conv low-rank rank 8" in _rows(model)["pw"].reason


# ---------------------------------------------------------------------------- save / load
class _Tiny(nn.Module):
    """All three fallbacks: stem K = 27 and depthwise K = 9 (per channel, INT8), convs (rank 0), a Linear narrower
    than the rank (rank 8) and a 10-class head (rank 0). ``x [B, 3, 8, 8] -> [B, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 64, 1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def test_round_trip_with_every_fallback_is_bit_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Tiny().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    _quietly(model, _svdq(), calib_data=calib)
    assert (model.fc1.rank, model.fc2.rank) == (8, 0)
    assert model.stem.spec.short() == "W:int8/ch A:int4/tok r4" and model.dw.spec.short() == "W:int8/ch A:int4/g16"
    assert model.pw.spec.short() == "W:int4/g16 A:int4/g16 r4"  # GEMM [16, 27] and [64, 16]: rank 4
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    vqsuite.save_quantized(model, tmp_path / "ck")
    torch.manual_seed(1)  # other float weights: everything comes from the checkpoint
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=_Tiny().eval())
    for name in ("stem", "dw", "pw", "fc1", "fc2"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert type(a) is type(b) and a.spec == b.spec, name
    assert loaded.fc1.rank == 8 and isinstance(loaded.fc2, QLinearLowRank) and loaded.fc2.rank == 0
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_rtn_narrow_head_without_calibration_is_a_plain_qlinear() -> None:
    """Without calibration data a rank-0 fallback Linear has no branch to initialise: plain RTN."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    _quietly(model, "svdquant-int4")  # logs that the rank-32 layer gets the data-free branch
    assert type(model[1]) is QLinear and model[1].spec.rank == 0 and isinstance(model[0], QLinearLowRank)
    assert _rows(model)["1"].reason == "rank 32 -> 0: layer narrower than the rank (min(N, K) = 10)"


def test_quantized_structure_applies_the_fallbacks() -> None:
    """The meta-device memory accounting swaps the layers the fallbacks let ``quantize_model`` quantize, with their
    fallback specs (stem per-channel, depthwise, narrow Linear ranks)."""
    from vqsuite.pipelines.rules import quantized_structure

    torch.manual_seed(0)
    model = _Tiny().eval()
    _quietly(model, _svdq(), calib_data=[torch.randn(8, 3, 8, 8) for _ in range(2)])
    with torch.device("meta"):
        meta = _Tiny()
    swapped = quantized_structure(meta, _svdq(), apply_rule=False)
    assert swapped == {e.name: model.get_submodule(e.name).spec for e in model.vqsuite_report.quantized}
