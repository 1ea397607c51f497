"""Layer adapters: timm/diffusers layers that subclass Linear/Conv2d with their own ``forward`` are quantized as the
plain float layer they compute (effective weight, dynamic TF-"SAME" padding), and survive save/load bit for bit."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.errors import UserError
from vqsuite.nn import QConv2d, QConv2dSame, QLinear, QuantLayer, SamePadConv2d
from vqsuite.nn.conv_same import same_padding
from vqsuite.pipelines import LAYER_ADAPTERS, LayerAdapter, register_layer_adapter
from vqsuite.pipelines.layer_adapters import adapter_for, class_key

timm = pytest.importorskip("timm")

#: an adapter's effective float layer vs the original layer on the same input (same ops: equal up to rounding)
EFFECTIVE_RTOL = 1e-5
EFFECTIVE_ATOL = 1e-6
#: whole-model output SQNR vs float at W8A8 (measured 27.1-37.4 dB on the random-init timm models, BiT aside;
#: 35.8 dB on the diffusers layers, 44.8 dB on the registered-adapter conv)
MODEL_SQNR_W8A8_DB = 20.0
#: one adapted layer's output SQNR vs its float original on its real input (measured minimum over the models:
#: W8A8 37.9 dB, W4A16 16.9 dB)
LAYER_SQNR_DB = {"w8a8": 30.0, "w4a16": 13.0}
#: a two-Linear MLP (GELU between) after SVDQuant W4A4 with calibration (measured 28.8-29.7 dB, seeds 0-2)
SVDQUANT_SQNR_DB = 22.0


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    size: int  # input height = width (odd where TF-"SAME" padding is asymmetric)
    adapted: tuple[str, ...]  # adapted class names the model must contain
    registered: bool  # a timm registry name with default shape: load_quantized(path) rebuilds it alone
    model_sqnr: bool = True  # whole-output SQNR is meaningful (per-layer SQNR is checked for every case)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()


CASES = [
    # BiT ResNetV2 (StdConv2d everywhere), narrowed so that it runs in a second
    Case(
        "resnetv2_bit-StdConv2d",
        _timm("resnetv2_50x1_bit", channels=(128, 128, 128, 128)),
        32,
        ("StdConv2d",),
        False,
        model_sqnr=False,  # random-init BiT is chaotic: even W8A16 (weights only) keeps 7.6 dB of its output
    ),
    # ViT hybrid: a StdConv2dSame stem (7x7 stride 2: dynamic padding), one tiny block
    Case(
        "vit_r_hybrid-StdConv2dSame",
        _timm("vit_tiny_r_s16_p8_224", img_size=64, depth=1, embed_dim=64, num_heads=2),
        64,
        ("StdConv2dSame",),
        False,
    ),
    Case("test_nfnet-ScaledStdConv2d", _timm("test_nfnet"), 32, ("ScaledStdConv2d",), True),
    # tf_ MobileNetV3: Conv2dSame (stride-2 convs pad asymmetrically at odd sizes) and a timm.layers.Linear head
    Case(
        "tf_mobilenetv3-Conv2dSame-Linear",
        _timm("tf_mobilenetv3_small_minimal_100"),
        35,
        ("Conv2dSame", "Linear"),
        True,
    ),
]
IDS = [c.id for c in CASES]


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().pow(2).mean() / (ref.double() - out.double()).pow(2).mean()))


def _adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and adapter_for(m) is not None}


def _layer_io(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (input, output) of each named layer during one forward of ``model``."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # clones: these models apply activations in place, to the very tensors a hook sees
            seen.setdefault(name, (args[0].clone(), output.clone()))

        return record

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _quantize(model: nn.Module, preset: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # W4A16 leaves some odd-K depthwise convs 16-bit: a coverage warning
        return vqsuite.quantize_model(model, preset)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_effective_layer_reproduces_the_original(case: Case) -> None:
    model = case.build()
    layers = _adapted_layers(model)
    assert set(case.adapted) <= {type(m).__name__ for m in layers.values()}
    io = _layer_io(model, list(layers), torch.randn(2, 3, case.size, case.size))
    assert set(io) == set(layers)
    for name, layer in layers.items():
        x, y = io[name]
        effective = adapter_for(layer).effective(layer)
        assert effective is layer or type(effective) in (nn.Linear, nn.Conv2d, SamePadConv2d), name
        with torch.no_grad():
            torch.testing.assert_close(effective(x), y, rtol=EFFECTIVE_RTOL, atol=EFFECTIVE_ATOL, msg=name)


@pytest.mark.parametrize("preset", ["w8a8", "w4a16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapted_layers_are_quantized_accurately(case: Case, preset: str) -> None:
    model = case.build()
    x = torch.randn(2, 3, case.size, case.size)
    names = list(_adapted_layers(model))
    io = _layer_io(model, names, x)
    with torch.no_grad():
        ref = model(x)
    q = _quantize(copy.deepcopy(model), preset)
    report = q.vqsuite_report
    assert not report.unadapted_classes
    entries = {e.name: e for e in report.layers}
    quantized = [n for n in names if entries[n].status == "quantized"]
    for n in names:
        if entries[n].status == "skipped":  # only a group that does not fit K may leave one in float
            assert preset == "w4a16" and "must divide" in entries[n].reason, (n, entries[n].reason)
    if preset == "w8a8":
        assert quantized == names
    for n in quantized:
        layer = q.get_submodule(n)
        assert isinstance(layer, QuantLayer) and "layer adapter" in entries[n].reason
        same_pad = getattr(model.get_submodule(n), "same_pad", type(model.get_submodule(n)).__name__ == "Conv2dSame")
        assert isinstance(layer, QConv2dSame) == bool(same_pad), n
        inp, out = io[n]
        with torch.no_grad():
            got = layer(inp)
        if not out.any():  # NFNet's last conv of a block starts with gain 0 (skipinit): zero stays zero
            assert not got.any(), n
            continue
        db = _sqnr_db(out, got)
        assert db >= LAYER_SQNR_DB[preset], f"{n}: {db:.1f} dB"
    if preset == "w8a8" and case.model_sqnr:
        with torch.no_grad():
            assert _sqnr_db(ref, q(x)) >= MODEL_SQNR_W8A8_DB


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip_is_bit_identical(case: Case, tmp_path: Path) -> None:
    x = torch.randn(2, 3, case.size, case.size)
    q = _quantize(case.build(), "w8a8")
    with torch.no_grad():
        out = q(x)
    vqsuite.save_quantized(q, tmp_path / "ckpt")
    torch.manual_seed(1)  # the fresh float model has other random weights: everything must come from the file
    fresh = case.build()
    adapted = list(_adapted_layers(fresh))
    loaded = vqsuite.load_quantized(tmp_path / "ckpt", model=fresh)
    assert all(isinstance(loaded.get_submodule(n), QuantLayer) for n in adapted)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    if case.registered:  # the self-rebuilding path: timm builds the float model from the checkpoint's record
        rebuilt = vqsuite.load_quantized(tmp_path / "ckpt")
        with torch.no_grad():
            assert torch.equal(rebuilt(x), out)


def test_same_padding_matches_tf_output_size() -> None:
    for n in range(5, 12):
        for k, s, d in ((3, 2, 1), (5, 2, 1), (3, 1, 2), (1, 2, 1)):
            before, after = same_padding(n, k, s, d)
            assert after - before in (0, 1)
            assert (n + before + after - d * (k - 1) - 1) // s + 1 == -(-n // s)  # TF: ceil(n / s) outputs


# ------------------------------------------------------------------------------------- diffusers layers
@pytest.mark.slow  # importing diffusers' model modules takes seconds; the layers themselves are tiny
def test_diffusers_motion_linear_and_lora_compatible_layers() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear
    from diffusers.models.transformers.transformer_wan_animate import MotionLinear

    def build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LoRACompatible* are deprecated in diffusers
            return nn.Sequential(
                LoRACompatibleConv(8, 16, 3, padding=1),
                nn.Flatten(),
                LoRACompatibleLinear(16 * 8 * 8, 64),
                MotionLinear(64, 64),
                MotionLinear(64, 32),
            ).eval()

    model = build()
    x = torch.randn(4, 8, 8, 8)
    io = _layer_io(model, ["0", "2", "3", "4"], x)
    for name in ("3", "4"):  # MotionLinear's effective weight is weight * scale
        layer = model.get_submodule(name)
        inp, out = io[name]
        with torch.no_grad():
            torch.testing.assert_close(
                adapter_for(layer).effective(layer)(inp), out, rtol=EFFECTIVE_RTOL, atol=EFFECTIVE_ATOL
            )
    with torch.no_grad():
        ref = model(x)
    q = _quantize(copy.deepcopy(model), "w8a8")
    assert [type(m) for m in q] == [QConv2d, nn.Flatten, QLinear, QLinear, QLinear]
    with torch.no_grad():
        out = q(x)
    assert _sqnr_db(ref, out) >= MODEL_SQNR_W8A8_DB


@pytest.mark.slow
def test_diffusers_layers_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan_animate import MotionLinear

    def build() -> nn.Module:
        return nn.Sequential(MotionLinear(64, 64), MotionLinear(64, 32)).eval()

    q = _quantize(build(), "w8a8")
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = q(x)
    vqsuite.save_quantized(q, tmp_path / "m")
    loaded = vqsuite.load_quantized(tmp_path / "m", model=build())  # MotionLinear is no nn.Linear: the adapter says
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
        # Wan-Animate calls its MotionLinears with channel_dim= (positional or keyword): the quantized layers take it,
        # before and after a save/load
        for model in (q, loaded):
            assert torch.equal(model[0](x, channel_dim=1), model[0](x))
            assert torch.equal(model[1](model[0](x), 1), out)
    # SVDQuant builds its layers itself (calibrated branch): they take channel_dim= too
    svdq = vqsuite.quantize_model(build(), "svdquant-int4", calib_data=[torch.randn(8, 64)])
    with torch.no_grad():
        assert torch.equal(svdq[0](x, channel_dim=1), svdq[0](x))


# ------------------------------------------------------------------------------- unknown classes, registry
class Doubled(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_unknown_subclass_with_own_forward_is_reported_by_class_name(caplog: pytest.LogCaptureFixture) -> None:
    from timm.layers import StdConv2d

    class MyStd(StdConv2d):  # an adapted class's subclass with its own forward inherits no adapter
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1

    model = nn.Sequential(Doubled(8, 8, 3), Doubled(8, 8, 3), MyStd(8, 8, 3), StdConv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    with caplog.at_level(logging.INFO, logger="vqsuite"):
        _quantize(model, "w8a8")
    report = model.vqsuite_report
    assert {c: [e.name for e in v] for c, v in report.unadapted_classes.items()} == {
        "Doubled": ["0", "1"],
        "MyStd": ["2"],
    }
    assert "Doubled subclasses Conv2d but overrides forward" in {e.reason for e in report.skipped}
    assert "Doubled (2)" in report.summary() and "MyStd (1)" in report.summary()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("class Doubled" in m for m in messages) == 1  # one line per class, not one per layer
    assert not any("(Doubled)" in m for m in messages)
    assert isinstance(model[3], QConv2d) and isinstance(model[4], QConv2d)
    assert type(model[0]) is Doubled and type(model[2]) is MyStd


def test_register_layer_adapter_teaches_a_new_class() -> None:
    key = class_key(Doubled)

    def doubled_as_conv(m: Doubled) -> nn.Conv2d:
        conv = copy.deepcopy(m)
        conv.__class__ = nn.Conv2d
        with torch.no_grad():
            conv.weight.mul_(2)
            conv.bias.mul_(2)
        return conv

    adapter = LayerAdapter(key, nn.Conv2d, doubled_as_conv, "output doubled: weight and bias doubled")
    register_layer_adapter(adapter)
    try:
        with pytest.raises(UserError, match="already registered"):
            register_layer_adapter(adapter)
        model = nn.Sequential(Doubled(8, 16, 3), nn.ReLU()).eval()
        x = torch.randn(2, 8, 10, 10)
        with torch.no_grad():
            ref = model(x)
        _quantize(model, "w8a8")
        assert isinstance(model[0], QConv2d)
        with torch.no_grad():
            assert _sqnr_db(ref, model(x)) >= MODEL_SQNR_W8A8_DB
    finally:
        LAYER_ADAPTERS.pop(key, None)


def test_svdquant_calibrates_adapted_linears() -> None:
    """SVDQuant's capture hooks sit on the model's own (adapted) layers; its weights are the effective ones."""
    from timm.layers import Linear

    model = nn.Sequential(Linear(64, 64), nn.GELU(), Linear(64, 48)).eval()  # both wider than rank 32
    x = torch.randn(48, 64)
    with torch.no_grad():
        ref = model(x)
    vqsuite.quantize_model(model, "svdquant-int4", calib_data=x)
    entries = {e.name: e for e in model.vqsuite_report.quantized}
    assert set(entries) == {"0", "2"}
    assert all(e.reason.startswith("svdquant rank") and "layer adapter" in e.reason for e in entries.values())
    with torch.no_grad():
        assert _sqnr_db(ref, model(x)) >= SVDQUANT_SQNR_DB


def test_qconv2d_same_pads_like_its_float_twin_and_refuses_static_padding() -> None:
    conv = SamePadConv2d(4, 8, 3, stride=2).eval()
    x = torch.randn(2, 4, 9, 10)  # odd/even sizes: asymmetric padding on one axis
    with torch.no_grad():
        ref = conv(x)
    q = QConv2dSame.from_float(conv, vqsuite.get_preset("w8a8").default)
    with torch.no_grad():
        out = q(x)
    assert out.shape == ref.shape == (2, 8, 5, 5)
    assert _sqnr_db(ref, out) >= LAYER_SQNR_DB["w8a8"]
    with pytest.raises(UserError, match="padding=0"):
        QConv2dSame(4, 8, 3, padding=1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_quantized_structure_swaps_adapted_layers_like_quantize_model(case: Case) -> None:
    """The meta-device memory accounting (``quantized_structure``) swaps exactly the layers ``quantize_model``
    quantizes, adapted subclasses included, with storage of the same size."""
    from vqsuite.pipelines.rules import quantized_structure

    torch.manual_seed(0)
    model = case.build()
    with torch.device("meta"):
        meta_model = case.build()
    vqsuite.quantize_model(model, "w8a8")
    swapped = quantized_structure(meta_model, "w8a8", apply_rule=False)
    assert sorted(swapped) == sorted(e.name for e in model.vqsuite_report.quantized)
    assert vqsuite.module_nbytes(meta_model) == vqsuite.module_nbytes(model)
