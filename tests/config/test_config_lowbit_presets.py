"""Low-bit presets: ``w2a8``, EfficientDM's ``w4a4-static`` / ``w4a8-static`` (static per-step activation scales,
end to end through ``quantize_pipeline`` on the tiny SD pipeline) and the ``vit-w6a6-*`` / ``vit-w3a3-*`` ViT PTQ
presets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite import quantize_model
from vqsuite.config import QuantConfig, get_preset
from vqsuite.formats import get_format
from vqsuite.nn import QLinear, QuantLayer
from vqsuite.nn.steps import StepInfo, publish

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusers"))

STATIC_PRESETS = {"w4a4-static": "int4", "w4a8-static": "int8"}
VIT_VARIANTS = ("ptq", "repq", "ptq4vit", "minmax")
VIT_BITS = {6: "int6", 3: "int3"}
CAL_STEPS = 3
WIDTH = 64
#: the calibration loop's activations grow this much per step, so per-step scales must differ
STEP_GROWTH = 4.0


def test_w2a8_preset() -> None:
    spec = get_preset("w2a8").default
    assert (spec.weight, spec.weight_group_size, spec.act, spec.act_mode) == ("int2", None, "int8", "dynamic_per_token")
    assert get_format(spec.weight).storage_bits == 4


@pytest.mark.parametrize("preset, act", STATIC_PRESETS.items(), ids=list(STATIC_PRESETS))
def test_static_preset_specs(preset: str, act: str) -> None:
    cfg = get_preset(preset)
    spec = cfg.default
    assert (spec.weight, spec.weight_group_size, spec.act, spec.act_mode) == ("int4", None, act, "static")
    assert spec.act_granularity == "per_step" and spec.n_buckets is None
    assert spec.scale_dtype in ("float32", "bfloat16")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bits, wfmt", VIT_BITS.items(), ids=[f"w{b}a{b}" for b in VIT_BITS])
@pytest.mark.parametrize("variant", VIT_VARIANTS)
def test_vit_lowbit_preset_specs(bits: int, wfmt: str, variant: str) -> None:
    cfg = get_preset(f"vit-w{bits}a{bits}-{variant}")
    ref = get_preset(f"vit-w4a4-{variant}")  # same activation treatment, other bits
    assert cfg.method == "vit-ptq" and cfg.default.weight == wfmt and cfg.default.weight_group_size is None
    assert cfg.default.weight_range == ref.default.weight_range
    assert cfg.options == {**ref.options, "act_bits": bits}
    assert f"W{bits}A{bits}" in vqsuite.describe_presets()[f"vit-w{bits}a{bits}-{variant}"]


# ---------------------------------------------------------------------------- static presets, plain model
class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, WIDTH, generator=g) * STEP_GROWTH**i for i in range(CAL_STEPS)]


def _loop(model: nn.Module, seed: int) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for i, x in enumerate(_inputs(seed)):
            with publish(StepInfo(i, float(1000 - 300 * i), CAL_STEPS)):
                outs.append(model(x))
    return outs


@pytest.mark.parametrize("preset", list(STATIC_PRESETS))
def test_static_preset_calibrates_per_step_and_freezes_bit_for_bit(preset: str) -> None:
    frozen = quantize_model(_Mlp(), preset, calib_data=lambda m: _loop(m, seed=1), freeze=True)
    layers = [m for m in frozen.modules() if isinstance(m, QLinear)]
    assert len(layers) == 2 and all(m.frozen for m in layers)
    for m in layers:
        steps = m.act_scale_steps
        assert steps.shape == (CAL_STEPS,) and bool(torch.isfinite(steps).all())
    first = layers[0].act_scale_steps  # fc1 sees the inputs, whose range grows STEP_GROWTH x per step
    assert bool((first[1:] / first[:-1] > STEP_GROWTH / 2).all()), first


def test_static_preset_fake_quant_equals_frozen() -> None:
    """Calibrated once, then frozen: each step's output is unchanged by freezing (what the nn preset sweeps check
    for the presets that need no calibration)."""
    for preset in STATIC_PRESETS:
        torch.manual_seed(0)
        model = quantize_model(_Mlp(), preset, calib_data=lambda m: _loop(m, seed=1), freeze=False)
        before = _loop(model, seed=2)
        for m in model.modules():
            if isinstance(m, QuantLayer):
                m.freeze()
        after = _loop(model, seed=2)
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), preset


def test_static_preset_without_calib_data_is_refused() -> None:
    with pytest.raises(ValueError, match="static activation scales.*pass calib_data"):
        quantize_model(_Mlp(), "w4a4-static")


# ---------------------------------------------------------------------------- static presets, tiny SD pipeline
@pytest.mark.parametrize("preset", list(STATIC_PRESETS))
def test_static_preset_quantize_pipeline_end_to_end(preset: str) -> None:
    pytest.importorskip("diffusers")
    import tiny_pipelines as tp

    pipe, images = tp.quantized("sd15", preset)
    assert images.shape == (1, 32, 32, 3) and bool(torch.isfinite(images).all())
    comp = pipe.vqsuite_report.components["unet"]
    assert comp.calibration["ran"] and comp.calibration["steps"] == 2
    assert comp.bytes_after < comp.bytes_before
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantLayer)]
    static = [m for m in layers if m.spec.act_mode == "static"]
    assert static and all(m.frozen for m in layers)
    assert all(m.spec.act == STATIC_PRESETS[preset] and m.spec.act_granularity == "per_step" for m in static)
    tables = [m.act_scale_steps for m in static]
    assert all(t.shape == (2,) and bool(torch.isfinite(t).all()) for t in tables)
    assert any(not torch.equal(t[0], t[1]) for t in tables), "every layer got one scale for both steps"
    # a trajectory longer than the calibration one still samples (steps map to the nearest calibrated slot)
    assert bool(torch.isfinite(tp.generate(pipe, "sd15", steps=3)).all())


# ---------------------------------------------------------------------------- ViT PTQ at 6 and 3 bits
def _tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("bits", list(VIT_BITS), ids=[f"w{b}a{b}" for b in VIT_BITS])
@pytest.mark.parametrize("variant", VIT_VARIANTS)
def test_vit_lowbit_presets_quantize(bits: int, variant: str) -> None:
    pytest.importorskip("timm")
    from vqsuite.calibrators.vit_ptq import ActQuantizer

    vit = _tiny_vit().eval()
    quantize_model(vit, f"vit-w{bits}a{bits}-{variant}", calib_data=[torch.randn(16, 1, 8, 8)])
    quants = [m for m in vit.modules() if isinstance(m, ActQuantizer)]
    assert quants and all(q.mode == "quant" and q.bits == bits for q in quants)
    linears = [m for m in vit.modules() if isinstance(m, QLinear)]
    assert linears and all(m.spec.weight == VIT_BITS[bits] for m in linears)
    assert any(e.name == "blocks.0.attn.qkv" for e in vit.vqsuite_report.quantized)
    with torch.no_grad():
        assert bool(torch.isfinite(vit(torch.randn(4, 1, 8, 8))).all())
