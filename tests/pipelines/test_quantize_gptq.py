"""``method="gptq"`` through ``quantize_model``: a tiny CNN with a depthwise conv, a transposed conv and a Linear
gets a higher output SQNR than round-to-nearest under the same format (symmetric and asymmetric INT4), static
activation scales are still calibrated (on the GPTQ weights), the codes GPTQ chose survive save/load bit for bit,
and a missing calib_data or a bad option is one clear ConfigError that leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqsuite
from vqsuite.config import QuantConfig, QuantSpec, get_preset, list_presets
from vqsuite.errors import ConfigError
from vqsuite.nn import QuantLayer

#: GPTQ must beat RTN's held-out output SQNR by at least this much (measured +9.4 to +10.4 dB on this net)
MODEL_GPTQ_MIN_GAIN_DB = 4.0
GPTQ_PRESETS = ("w8a16-gptq", "w8a8-gptq", "w4a16-gptq", "w4a8-gptq", "w4a16-asym-gptq")


class TinyCNN(nn.Module):
    """Stem conv, depthwise 4x4, pointwise, stride-2 transposed conv, 3x3 head, and a Linear on pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 4, padding=2, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.up = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem(x))
        x = F.relu(self.dw(x))
        x = F.relu(self.pw(x))
        x = F.relu(self.up(x))
        x = self.head(x)
        return x, self.fc(x.mean(dim=(2, 3)))


def _net() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth, skewed 'images' (neighbouring pixels and channels correlated, one channel strong)."""
    gen = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 3, 12, 12, generator=gen), 5, stride=1, padding=2, count_include_pad=False)
    return (x + x.mean(dim=1, keepdim=True)) * torch.tensor([3.0, 1.0, 0.5]).view(1, 3, 1, 1)


CALIB = [_images(16, 1), _images(16, 2)]
TEST = _images(16, 3)


def _sqnr(ref: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> float:
    num = sum(float(r.double().pow(2).sum()) for r in ref)
    den = sum(float((r - g).double().pow(2).sum()) for r, g in zip(ref, got, strict=True))
    return 10.0 * torch.log10(torch.tensor(num / den)).item()


_CACHE: dict[str, tuple[float, nn.Module]] = {}


@torch.no_grad()
def _quantized_sqnr(config: str | QuantConfig, **kw) -> tuple[float, nn.Module]:
    """Output SQNR on TEST and the quantized net; preset runs are cached (the save/load test reuses one)."""
    key = config if isinstance(config, str) else None
    if key in _CACHE:
        return _CACHE[key]
    net = _net()
    ref = net(TEST)
    q = vqsuite.quantize_model(copy.deepcopy(net), config, **kw)
    out = _sqnr(ref, q(TEST)), q
    if key is not None:
        _CACHE[key] = out
    return out


def test_presets_are_registered() -> None:
    assert set(GPTQ_PRESETS) | {"w4a16-asym"} <= set(list_presets())
    for name in GPTQ_PRESETS:
        assert get_preset(name).method == "gptq"
        base = get_preset(name.removesuffix("-gptq"))
        assert get_preset(name).default == base.default


@pytest.mark.parametrize(
    ("rtn", "gptq", "options"),
    [
        ("w4a16", "w4a16-gptq", {}),
        ("w4a16-asym", "w4a16-asym-gptq", {}),
        ("w4a16", "w4a16-gptq", {"sequential": True, "scale_mode": "static"}),
    ],
    ids=["int4-one-pass", "int4-asym-one-pass", "int4-sequential-act-order"],
)
def test_gptq_beats_rtn_on_a_cnn_with_depthwise_and_transposed_convs(rtn: str, gptq: str, options: dict) -> None:
    s_rtn, _ = _quantized_sqnr(rtn)
    cfg = gptq
    if options:
        cfg = get_preset(gptq).with_overrides(method_options={**get_preset(gptq).options, **options})
    s_gptq, q = _quantized_sqnr(cfg, calib_data=CALIB)
    assert s_gptq - s_rtn >= MODEL_GPTQ_MIN_GAIN_DB, f"{gptq} {options}: RTN {s_rtn:.2f} dB vs GPTQ {s_gptq:.2f} dB"
    report = q.vqsuite_report
    quantized = {e.name: e for e in report.quantized}
    assert set(quantized) == {"stem", "dw", "pw", "up", "head", "fc"}
    assert all("gptq" in e.reason for e in quantized.values()), [e.reason for e in quantized.values()]


def test_static_activation_scales_are_calibrated_after_gptq() -> None:
    spec = QuantSpec(weight="int4", weight_group_size=16, act="int8", act_mode="static")
    cfg = QuantConfig(default=spec, overrides={"stem": QuantSpec(weight="int8")}, method="gptq")
    net = _net()
    q = vqsuite.quantize_model(copy.deepcopy(net), cfg, calib_data=CALIB, freeze=False)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    for name, layer in layers.items():
        assert layer.pending_qtensor() is not None, f"{name} lost its GPTQ codes"
        if layer.spec.act_mode == "static":
            scale = layer.current_act_scale()
            assert scale is not None and float(scale) > 0, f"{name}: no static activation scale"
    pending = {n: layer.pending_qtensor() for n, layer in layers.items()}
    vqsuite.freeze(q)  # the frozen layers store exactly the codes GPTQ chose
    for name, layer in layers.items():
        assert torch.equal(layer.stored_qtensor().codes, pending[name].codes), name


def test_save_load_round_trip_is_bit_identical(tmp_path) -> None:
    _, q = _quantized_sqnr("w4a16-asym-gptq", calib_data=CALIB)
    vqsuite.save_quantized(q, tmp_path / "ckpt")
    loaded = vqsuite.load_quantized(tmp_path / "ckpt", _net())
    saved = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    back = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLayer)}
    assert set(saved) == set(back)
    for name, layer in saved.items():
        for buf in ("qweight", "wscales", "wzeros"):
            a, b = getattr(layer, buf, None), getattr(back[name], buf, None)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{name}.{buf}"
    with torch.no_grad():
        for a, b in zip(q(TEST), loaded(TEST), strict=True):
            assert torch.equal(a, b)


def test_gptq_without_calib_data_is_one_config_error_and_leaves_the_model() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match="method='gptq' needs calib_data"):
        vqsuite.quantize_model(net, "w4a16-gptq")
    assert not any(isinstance(m, QuantLayer) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_gptq_option_is_a_config_error() -> None:
    cfg = get_preset("w8a8-gptq").with_overrides(method_options={"damp": -1.0})
    with pytest.raises(ConfigError, match="damp"):
        vqsuite.quantize_model(_net(), cfg, calib_data=CALIB)
    cfg = get_preset("w8a8-gptq").with_overrides(method_options={"blocksize": 64})
    with pytest.raises(ConfigError, match="unknown gptq option"):
        vqsuite.quantize_model(_net(), cfg, calib_data=CALIB)
