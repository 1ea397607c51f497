"""quantize_model on real (random-init, offline) vision models and on small hand-built ones: finite outputs,
the error ordering W8A8 < W4A16 < W4A4, an honest report, loud warnings, include/exclude, static calibration."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.config import QuantConfig, QuantSpec, get_preset
from vqsuite.nn import QConv2d, QLinear, QuantLayer

ORDERED_PRESETS = ("w8a8", "w4a16", "w4a4")
IMG = 32  # small inputs keep the real models fast
BATCH = 4
#: relative output MSE bounds on the random-init models (measured: W8A8 <= 0.0017, W4A16 <= 0.082, W4A4 <= 0.175)
W8A8_MAX_REL_MSE = 0.02
ANY_MAX_REL_MSE = 0.6
STATIC_SPEC = QuantSpec(weight="int8", act="int8", act_mode="static")
INT8_QMAX = 127


def _wake_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN gains in [0.75, 1.25] (timm zero-inits the last BN of each residual block, which would
    switch the residual branches off and hide their quantization error)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
    return model.eval()


def _resnet18() -> nn.Module:
    import timm

    return _wake_norms(timm.create_model("resnet18", pretrained=False, num_classes=10))


def _vit_tiny() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, num_classes=10).eval()


def _mobilenet_v2() -> nn.Module:
    import torchvision

    return _wake_norms(torchvision.models.mobilenet_v2(num_classes=10))


REAL_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...] | None]] = {
    # name -> (builder, exclude patterns applied to every preset so all three quantize the same layers:
    # W4A4 cannot take the ViT patch embedding (3 input channels vs activation groups of 64))
    "resnet18": (_resnet18, None),
    "vit_tiny": (_vit_tiny, ("patch_embed.*",)),
    "mobilenet_v2": (_mobilenet_v2, None),
}


@pytest.fixture(scope="module")
def real_models() -> dict[str, nn.Module]:
    out = {}
    for name, (build, _) in REAL_MODELS.items():
        torch.manual_seed(0)
        out[name] = build()
    return out


def _rel_mse(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).pow(2).mean() / ref.pow(2).mean())


def _quantize_quietly(model: nn.Module, config, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # none of these should warn: most weights are quantized
        return vqsuite.quantize_model(model, config, **kw)


def _quantize_quietly_low(model: nn.Module, config, **kw) -> nn.Module:
    """quantize_model where low coverage is expected: its warning is checked elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return vqsuite.quantize_model(model, config, **kw)


# ---------------------------------------------------------------------------- real models
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_model_outputs_finite_and_error_ordered(name: str, real_models: dict[str, nn.Module]) -> None:
    float_model = real_models[name]
    _, exclude = REAL_MODELS[name]
    x = torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = float_model(x)
    errors = {}
    for preset in ORDERED_PRESETS:
        model = copy.deepcopy(float_model)
        out = _quantize_quietly(model, preset, exclude=exclude)
        assert out is model
        assert any(isinstance(m, QuantLayer) and m.frozen for m in model.modules())
        with torch.no_grad():
            y = model(x)
        assert y.shape == ref.shape and bool(torch.isfinite(y).all()), preset
        errors[preset] = _rel_mse(y, ref)
    assert errors["w8a8"] < errors["w4a16"] < errors["w4a4"], errors
    assert errors["w8a8"] <= W8A8_MAX_REL_MSE and errors["w4a4"] <= ANY_MAX_REL_MSE, errors


def test_mobilenet_report_lists_depthwise_skips_with_reasons(real_models: dict[str, nn.Module]) -> None:
    """Without the group fallback (on by default: tests/pipelines/test_quantize_fallbacks.py) depthwise convs
    (K = 9) stay float and the report says why."""
    float_model = real_models["mobilenet_v2"]
    float_numel = {n: m.weight.numel() for n, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    total = sum(p.numel() for p in float_model.parameters() if p.ndim >= 2)
    model = vqsuite.quantize_model(copy.deepcopy(float_model), "w4a16", group_fallback=False)
    report = model.vqsuite_report
    depthwise = [n for n, m in float_model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    skipped = {e.name: e.reason for e in report.skipped}
    for n in depthwise:
        assert "weight_group_size=64 must divide in_features=9" in skipped[n], (n, skipped.get(n))
        assert isinstance(model.get_submodule(n), nn.Conv2d)
    assert {e.name for e in report.quantized} | set(skipped) == set(float_numel)
    expected_fraction = sum(float_numel[e.name] for e in report.quantized) / total
    assert report.quantized_fraction == pytest.approx(expected_fraction)
    assert 0.5 < report.quantized_fraction < 1.0
    assert report.bytes_after < report.bytes_before
    text = str(report)
    assert "features.1.conv.0.0" in text and "must divide" in text and "layers quantized" in text
    assert report.to_dict()["quantized_fraction"] == pytest.approx(expected_fraction)


def test_mobilenet_w8a8_quantizes_depthwise_per_channel(real_models: dict[str, nn.Module]) -> None:
    model = _quantize_quietly(copy.deepcopy(real_models["mobilenet_v2"]), "w8a8")
    assert model.vqsuite_report.skipped == []
    assert model.vqsuite_report.quantized_fraction == pytest.approx(1.0)
    dw = model.get_submodule("features.1.conv.0.0")
    assert isinstance(dw, QConv2d) and dw.groups == 32 and dw.gemm_shape == (32, 9)


def test_vit_w4a4_reports_the_patch_embedding(real_models: dict[str, nn.Module]) -> None:
    """The RGB patch embedding's 3 activation channels take no group of 64: per-token activations instead (the group
    fallback), or a skip with the reason when the fallback is off."""
    model = _quantize_quietly(copy.deepcopy(real_models["vit_tiny"]), "w4a4")
    assert model.vqsuite_report.skipped == []
    (row,) = [e for e in model.vqsuite_report.quantized if e.name == "patch_embed.proj"]
    assert row.spec == "W:int4/g64 A:int4/tok", row.spec
    assert "act_group_size=64 must divide the activation channels 3" in row.reason and "per token" in row.reason
    assert isinstance(model.get_submodule("blocks.0.attn.qkv"), QLinear)
    model = _quantize_quietly(copy.deepcopy(real_models["vit_tiny"]), "w4a4", group_fallback=False)
    reasons = {e.name: e.reason for e in model.vqsuite_report.skipped}
    assert reasons == {"patch_embed.proj": "act_group_size=64 must divide the activation channels 3"}


# ---------------------------------------------------------------------------- small models
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(64, 64, 1)
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"fc1": nn.Linear(64, 128), "fc2": nn.Linear(128, 64)}) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 64, H, W] -> [B, 10]."""
        h = self.stem(x).mean((2, 3))
        for blk in self.blocks:
            h = h + blk["fc2"](torch.relu(blk["fc1"](h)))
        return self.head(self.norm(h))


def _tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def _quantized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantLayer)}


ALL_TINY_LAYERS = {"stem", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"}


def test_model_without_supported_layers_warns_and_is_unchanged() -> None:
    model = nn.Sequential(nn.Embedding(100, 32), nn.LayerNorm(32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="quantized NOTHING") as rec:
        out = vqsuite.quantize_model(model, "w8a8")
    assert "unsupported layer type Embedding" in str(rec[0].message)
    assert out is model
    assert [type(m) for m in model.modules()] == types_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.vqsuite_report.quantized == [] and model.vqsuite_report.quantized_fraction == 0.0


def test_low_coverage_warns_with_the_largest_skips() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2048))
    with pytest.warns(UserWarning, match=r"quantized only .*largest skipped: 1 \(excluded by pattern '1'\)"):
        vqsuite.quantize_model(model, "w8a8", exclude=["1"])
    assert isinstance(model[0], QLinear) and type(model[1]) is nn.Linear


def test_root_layer_cannot_be_swapped_and_says_so() -> None:
    with pytest.warns(UserWarning, match="root module cannot be swapped"):
        vqsuite.quantize_model(nn.Linear(64, 64), "w8a8")


def test_subclass_overriding_forward_is_skipped() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    class Plain(nn.Linear):
        pass

    model = nn.Sequential(Scaled(64, 64), Plain(64, 64), nn.Linear(64, 64))
    vqsuite.quantize_model(model, "w8a8")
    reasons = {e.name: e.reason for e in model.vqsuite_report.skipped}
    assert reasons == {"0": "Scaled subclasses Linear but overrides forward"}
    assert type(model[0]) is Scaled and isinstance(model[1], QLinear) and isinstance(model[2], QLinear)


def test_include_patterns_select_layers() -> None:
    model = _quantize_quietly_low(_tiny(), "w8a8", include=["blocks.0.*"])
    assert _quantized_names(model) == {"blocks.0.fc1", "blocks.0.fc2"}
    reasons = {e.name: e.reason for e in model.vqsuite_report.skipped}
    assert reasons["head"] == "not matched by include"


def test_exclude_patterns_keep_layers_float() -> None:
    model = _quantize_quietly(_tiny(), "w8a8", exclude=["head", "*.1.fc?"])
    assert _quantized_names(model) == {"stem", "blocks.0.fc1", "blocks.0.fc2"}
    reasons = {e.name: e.reason for e in model.vqsuite_report.skipped}
    assert reasons["head"] == "excluded by pattern 'head'"
    assert reasons["blocks.1.fc2"] == "excluded by pattern '*.1.fc?'"
    assert model.vqsuite_config.exclude == ("head", "*.1.fc?")


def test_config_overrides_choose_specs_and_none_keeps_float() -> None:
    nv = QuantSpec(weight="nvfp4")
    cfg = QuantConfig(default=get_preset("w8a8").default, overrides=(("blocks.1.*", nv), ("head", None), ("*", None)))
    model = _quantize_quietly_low(_tiny(), cfg)
    assert _quantized_names(model) == {"blocks.1.fc1", "blocks.1.fc2"}  # "*" -> None keeps the rest float
    assert model.get_submodule("blocks.1.fc1").spec == nv
    assert {e.name: e.reason for e in model.vqsuite_report.skipped}["head"] == "kept in float by override 'head'"


def test_every_layer_quantized_and_outputs_close() -> None:
    model = _tiny()
    x = torch.randn(3, 64, 4, 4)
    with torch.no_grad():
        ref = model(x)
    out = _quantize_quietly(model, "w8a8")
    assert out is model and _quantized_names(model) == ALL_TINY_LAYERS
    assert model.vqsuite_report.quantized_fraction == pytest.approx(1.0)
    with torch.no_grad():
        assert _rel_mse(model(x), ref) < W8A8_MAX_REL_MSE


def test_quantizing_twice_reports_already_quantized() -> None:
    model = _quantize_quietly(_tiny(), "w8a8")
    with pytest.warns(UserWarning, match="quantized NOTHING"):
        vqsuite.quantize_model(model, "w4a16")
    assert {e.reason for e in model.vqsuite_report.skipped} == {"already quantized"}
    assert model.get_submodule("head").spec == get_preset("w8a8").default


def test_freeze_later_gives_identical_outputs_and_less_memory() -> None:
    model = _quantize_quietly(_tiny(), "w4a8", freeze=False)
    assert all(not m.frozen for m in model.modules() if isinstance(m, QuantLayer))
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        y_fake = model(x)
    bytes_fake = vqsuite.module_nbytes(model)
    assert vqsuite.freeze(model) is model
    assert all(m.frozen for m in model.modules() if isinstance(m, QuantLayer))
    with torch.no_grad():
        assert torch.equal(model(x), y_fake)
    assert model.vqsuite_report.bytes_after == vqsuite.module_nbytes(model) < bytes_fake


def test_bf16_model() -> None:
    model = _tiny().to(torch.bfloat16)
    model = _quantize_quietly(model, "w4a16")
    y = model(torch.randn(2, 64, 4, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    assert model.get_submodule("head").wscales.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- static activation scales
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def test_static_without_calib_data_raises_and_leaves_model_untouched() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"2 layer\(s\) use static activation scales .*pass calib_data"):
        vqsuite.quantize_model(model, STATIC_SPEC)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_failed_calibration_leaves_model_untouched() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="calib_data is empty"):
        vqsuite.quantize_model(model, STATIC_SPEC, calib_data=[])
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


@pytest.mark.parametrize("form", ["tensor", "list", "tuples", "dicts", "callable"])
def test_static_scale_is_amax_over_qmax(form: str) -> None:
    model = _mlp()
    batches = [torch.randn(8, 32) * s for s in (1.0, 3.0, 0.5)]
    calib = {
        "tensor": torch.cat(batches),
        "list": batches,
        "tuples": [(b,) for b in batches],
        "dicts": [{"input": b} for b in batches],
        "callable": lambda m: [m(b) for b in batches],
    }[form]
    vqsuite.quantize_model(model, STATIC_SPEC, calib_data=calib)
    first, second = model[0], model[2]
    amax0 = torch.cat(batches).abs().amax()
    assert torch.equal(first.act_scale, (amax0 / INT8_QMAX).reshape(()))
    # the second layer saw the float activations of the (weight-quantized) first one
    with torch.no_grad():
        h = torch.relu(torch.nn.functional.linear(torch.cat(batches), first.weight, first.bias))
    assert torch.allclose(second.act_scale, h.abs().amax() / INT8_QMAX, rtol=1e-6)
    assert first.frozen and second.frozen
    x = torch.randn(4, 32)
    y = model(x)
    assert bool(torch.isfinite(y).all())
    # values beyond the calibrated range saturate at 127 * scale: a static scale really is used
    big = torch.full((1, 32), float(amax0) * 10)
    xq = first.act_scale * INT8_QMAX * torch.ones(1, 32)
    assert torch.allclose(first(big), torch.nn.functional.linear(xq, first.weight, first.bias), rtol=1e-5)


def test_calibration_that_misses_a_layer_raises() -> None:
    class TwoPaths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    model = TwoPaths()
    with pytest.raises(ValueError, match="never reached layer.*b"):
        vqsuite.quantize_model(model, STATIC_SPEC, calib_data=torch.randn(2, 8))
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear
