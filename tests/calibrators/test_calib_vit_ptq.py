"""ViT PTQ quantizers (PTQ4ViT twin uniform, RepQ-ViT log-sqrt2 and LayerNorm reparameterization) and presets."""

from __future__ import annotations

import math

import pytest
import torch

from vqsuite.calibrators.vit_ptq import (
    GELU_NEG_RANGE,
    ActQuantizer,
    PTQAttention,
    QuantAfter,
    TwinUniformSoftmaxQuantizer,
    log_sqrt2_quantize,
    reparameterize_layernorm,
    twin_uniform_gelu,
    twin_uniform_softmax,
    uniform_asym,
)

#: float32 LayerNorm reparameterization vs the original block output
REPARAM_ATOL = 1e-4
#: float32 quantizer output vs the exact level
LEVEL_ATOL = 1e-6
#: W8A8 ViT PTQ output vs float, in dB
W8A8_MIN_SQNR_DB = 25.0


def assert_on_levels(y: torch.Tensor, levels: set[float]) -> None:
    """Every value of ``y`` is one of ``levels`` (up to float32 rounding of the level arithmetic)."""
    lv = torch.tensor(sorted(levels), dtype=torch.float64)
    dist = (y.double().reshape(-1, 1) - lv.reshape(1, -1)).abs().min(1).values
    assert float(dist.max()) <= LEVEL_ATOL, f"value off the level set by {float(dist.max())}"


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_twin_uniform_softmax_levels(bits):
    x = torch.rand(4000) ** 4  # mostly small, like attention probabilities
    s = 2.0**-3
    m = 2 ** (bits - 1) - 1
    y = twin_uniform_softmax(x, bits, s)
    lo = {i * (s / m) for i in range(m + 1)}
    hi = {i * (1.0 / m) for i in range(m + 1)}
    assert_on_levels(y[x < s], lo)
    assert_on_levels(y[x >= s], hi)
    # range select, not the reference code's sum: nothing above 1
    assert float(y.max()) <= 1.0 + 1e-7
    assert len(lo | hi) <= 2**bits


@pytest.mark.parametrize("bits", [4, 8])
def test_twin_uniform_gelu_levels(bits):
    x = torch.nn.functional.gelu(torch.randn(5000) * 3)
    n = 2 ** (bits - 1)
    d_pos = 0.05
    y = twin_uniform_gelu(x, bits, d_pos)
    d_neg = GELU_NEG_RANGE / n
    neg = {-j * d_neg for j in range(n + 1)}
    pos = {i * d_pos for i in range(n)}
    assert_on_levels(y[x < 0], neg)
    assert_on_levels(y[x >= 0], pos)
    assert float(y.max()) == pytest.approx((n - 1) * d_pos)


@pytest.mark.parametrize("bits", [3, 4])
def test_log_sqrt2_levels(bits):
    delta = 0.8
    x = torch.cat([torch.zeros(3), torch.rand(3000), torch.tensor([1e-9, delta, 2.0])])
    y = log_sqrt2_quantize(x, bits, delta)
    levels = {0.0} | {delta * 2.0 ** -math.ceil(q / 2) * (math.sqrt(2) if q % 2 else 1.0) for q in range(2**bits)}
    assert_on_levels(y, levels)
    assert float(y[0]) == 0.0 and float(y[3003]) == 0.0  # q >= 2^k maps to 0
    assert float(y[3004]) == pytest.approx(delta) and float(y[3005]) == pytest.approx(delta)  # clamped at q = 0
    # q = 1 is delta / sqrt(2)
    assert float(log_sqrt2_quantize(torch.tensor([delta / math.sqrt(2)]), bits, delta)) == pytest.approx(
        delta / math.sqrt(2)
    )


def test_uniform_asym_levels():
    x = torch.linspace(-1, 3, 101)
    y = uniform_asym(x, 4, 0.25, 4.0)
    assert set((y / 0.25 + 4).round().tolist()) <= set(range(16))
    assert float(y.min()) == -1.0 and float(y.max()) == pytest.approx(11 * 0.25)


def test_softmax_split_search_picks_power_of_two():
    q = TwinUniformSoftmaxQuantizer(4)
    q.mode = "observe"
    q(torch.softmax(torch.randn(8, 50, 50) * 3, -1))
    q.finish()
    assert q.mode == "quant"
    assert math.log2(float(q.split)).is_integer() and float(q.split) < 1.0


def test_layernorm_reparam_preserves_function_and_equalizes_ranges():
    torch.manual_seed(0)
    c, bits = 12, 4
    norm, lin = torch.nn.LayerNorm(c), torch.nn.Linear(c, 7)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(c) * 3 + 0.1)
        norm.bias.copy_(torch.randn(c))
    x = torch.randn(64, c)
    ref = lin(norm(x)).detach()
    out = norm(x).detach()
    lo, hi = out.min(0).values, out.max(0).values
    info = reparameterize_layernorm(norm, [lin], lo, hi, bits)
    torch.testing.assert_close(lin(norm(x)).detach(), ref, atol=REPARAM_ATOL, rtol=0)
    new = norm(x).detach()
    # every channel's minimum now sits at the shared per-tensor minimum -z~ * delta~, up to half a step
    # (z_c is rounded), and its range spans at most the shared (2^k - 1) steps
    shared_min = float(-info["zero"] * info["delta"])
    assert bool(((new.min(0).values - shared_min).abs() <= info["delta"] / 2 + REPARAM_ATOL).all())
    width = new.max(0).values - new.min(0).values
    assert bool((width <= (2**bits - 1) * info["delta"] + REPARAM_ATOL).all())
    # before folding, the channel ranges differed by far more than one step
    assert float((hi - lo).max() - (hi - lo).min()) > 4 * float(info["delta"])


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("preset", ["vit-w8a8-ptq", "vit-w4a4-ptq", "vit-w4a4-ptq4vit", "vit-w4a4-minmax"])
def test_quantize_model_vit_presets(preset):
    pytest.importorskip("timm")
    from vqsuite import quantize_model

    vit = _tiny_vit().eval()
    calib = torch.randn(16, 1, 8, 8)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = vit(x)
    quantize_model(vit, preset, calib_data=[calib])
    assert isinstance(vit.blocks[0].attn, PTQAttention) and isinstance(vit.blocks[0].norm1, QuantAfter)
    quants = [m for m in vit.modules() if isinstance(m, ActQuantizer)]
    assert quants and all(q.mode == "quant" for q in quants)
    assert any(e.name == "blocks.0.attn.qkv" for e in vit.vqsuite_report.quantized)
    with torch.no_grad():
        y = vit(x)
    assert torch.isfinite(y).all()
    if preset == "vit-w8a8-ptq":
        assert sqnr_db(ref, y) > W8A8_MIN_SQNR_DB


def test_vit_ptq_needs_calib_data():
    pytest.importorskip("timm")
    from vqsuite import quantize_model

    vit = _tiny_vit()
    with pytest.raises(ValueError, match="calib_data"):
        quantize_model(vit, "vit-w4a4-ptq")
    assert not any(isinstance(m, ActQuantizer) for m in vit.modules())
