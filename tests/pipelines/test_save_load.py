"""save_quantized / load_quantized: bit-identical outputs after a round trip for every preset (float8 and E8M0
scales, low-rank branches, static scales, fake-quant state), no pickle, one readable CheckpointError per kind
of damage with the model left as it was, atomic saves, tied weights and reused layers."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vqsuite
from vqsuite.config import QuantConfig, QuantSpec, get_preset
from vqsuite.nn import QConv2d, QConvTranspose2d, QLinear, QLinearLowRank, QuantLayer
from vqsuite.pipelines.io import CONFIG_NAME, WEIGHTS_NAME

ROUND_TRIP_PRESETS = ["w8a8", "w8a8-fp8", "w4a16", "w4a8", "w4a4", "nvfp4", "w4a16-nvfp4", "mxfp4"]
LOWRANK = QuantConfig(
    default=get_preset("w4a8").default,
    overrides=(("fc*", get_preset("w4a8").default.replace(rank=8)),),
)
STATIC = QuantConfig(default=QuantSpec(weight="int8", act="int8", act_mode="static"))


class Net(nn.Module):
    """Conv, depthwise conv, transposed conv and linears: ``x [B, 64, 8, 8] -> [B, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.up = nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)  # K = 9: only per-channel specs take it
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.relu(self.up(torch.relu(self.conv(x))))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(7))


def _quantized(config, seed: int = 0, **kw) -> Net:
    model = _net(seed)
    calib = [torch.randn(2, 64, 8, 8) for _ in range(2)] if config is STATIC else None
    return vqsuite.quantize_model(model, config, calib_data=calib, **kw)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (compares float8 and NaN payloads exactly)."""
    return t.detach().reshape(-1).view(torch.uint8)


def _types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "config",
    [pytest.param(p, id=p) for p in ROUND_TRIP_PRESETS]
    + [pytest.param(LOWRANK, id="lowrank-r8"), pytest.param(STATIC, id="static-int8")],
)
def test_round_trip_is_bit_identical(config, tmp_path: Path) -> None:
    model = _quantized(config)
    x = _x()
    with torch.no_grad():
        y = model(x)
    vqsuite.save_quantized(model, tmp_path / "ck")
    fresh = _net(seed=123)  # different float weights: all must come from the checkpoint
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=fresh)
    assert loaded is fresh
    assert _types(loaded) == _types(model)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b)), n
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert loaded.vqsuite_config == model.vqsuite_config
    assert all(m.frozen for m in loaded.modules() if isinstance(m, QuantLayer))


def test_block_format_scales_keep_their_storage_dtypes(tmp_path: Path) -> None:
    for preset, scale_dtype in (("nvfp4", torch.float8_e4m3fn), ("mxfp4", torch.uint8), ("w4a16", torch.bfloat16)):
        vqsuite.save_quantized(_quantized(preset), tmp_path / preset)
        tensors = load_file(str(tmp_path / preset / WEIGHTS_NAME))
        assert tensors["fc1.wscales"].dtype == scale_dtype, preset
        assert tensors["fc1.qweight"].dtype == torch.uint8 and tensors["fc1.qweight"].shape == (64, 32)
        assert "fc1.weight" not in tensors
    assert load_file(str(tmp_path / "nvfp4" / WEIGHTS_NAME))["fc1.wtscale"].dtype == torch.float32


def test_layer_classes_are_restored(tmp_path: Path) -> None:
    vqsuite.save_quantized(_quantized(LOWRANK), tmp_path / "ck")
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=_net())
    assert type(loaded.conv) is QConv2d and type(loaded.up) is QConvTranspose2d
    assert type(loaded.fc1) is QLinearLowRank and loaded.fc1.rank == 8
    # K = 9 takes no 4-bit group nor 4-bit packing: the group fallback gives it per-channel INT8, restored as such
    assert type(loaded.dw) is QConv2d and loaded.dw.spec.short() == "W:int8/ch A:int8/tok"
    assert isinstance(loaded.fc1.proj_down, nn.Parameter)


def test_fake_quant_state_round_trips(tmp_path: Path) -> None:
    model = _quantized("w4a4", freeze=False)
    x = _x()
    with torch.no_grad():
        y = model(x)
    vqsuite.save_quantized(model, tmp_path / "ck")
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=_net(5))
    assert not loaded.fc1.frozen and isinstance(loaded.fc1.weight, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    vqsuite.freeze(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_load_into_meta_device_model(tmp_path: Path) -> None:
    model = _quantized("nvfp4")
    vqsuite.save_quantized(model, tmp_path / "ck")
    with torch.device("meta"):
        skeleton = Net().eval()
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=skeleton)
    assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "arch, preset", [("test_vit", "w4a16"), ("test_resnet", "nvfp4")], ids=["vit-w4a16", "resnet-nvfp4"]
)
def test_timm_model_loads_without_a_model(arch: str, preset: str, tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=7).eval()
    vqsuite.quantize_model(model, preset)
    x = torch.randn(2, 3, 64, 64) if arch == "test_resnet" else torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        y = model(x)
    vqsuite.save_quantized(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    assert meta["model_source"] == {"library": "timm", "name": arch, "kwargs": {"num_classes": 7}}
    loaded = vqsuite.load_quantized(tmp_path / "ck")
    assert not loaded.training  # built for inference: train-mode BN would normalise with batch statistics
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _quantized(LOWRANK)
    vqsuite.save_quantized(model, tmp_path / "ck")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a vqsuite checkpoint")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs) -> None:
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=_net(3))
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------- damage
def _edit_tensors(ck: Path, edit) -> None:
    tensors = load_file(str(ck / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(ck / WEIGHTS_NAME), metadata={"format": "pt"})


def _edit_meta(ck: Path, edit) -> None:
    meta = json.loads((ck / CONFIG_NAME).read_text())
    edit(meta)
    (ck / CONFIG_NAME).write_text(json.dumps(meta))


DAMAGE = {
    "missing-key": (
        lambda ck: _edit_tensors(ck, lambda t: t.pop("fc1.wscales")),
        "missing 1 tensor(s), first 'fc1.wscales'",
    ),
    "extra-key": (
        lambda ck: _edit_tensors(ck, lambda t: t.update({"fc1.bogus": torch.zeros(3)})),
        "1 unexpected tensor(s), first 'fc1.bogus'",
    ),
    "wrong-shape": (
        lambda ck: _edit_tensors(ck, lambda t: t.update({"fc2.qweight": torch.zeros(10, 16, dtype=torch.uint8)})),
        "tensor 'fc2.qweight' has shape (10, 16), the model expects (10, 32)",
    ),
    "wrong-dtype": (
        lambda ck: _edit_tensors(ck, lambda t: t.update({"fc2.wscales": t["fc2.wscales"].float()})),
        "tensor 'fc2.wscales' has dtype torch.float32, the model expects torch.bfloat16",
    ),
    "config-version": (
        lambda ck: _edit_meta(ck, lambda m: m.update({"config_version": 99})),
        "config version 99 is not supported",
    ),
    "recipe-version": (
        lambda ck: _edit_meta(ck, lambda m: m["config"].update({"version": 2})),
        "config version=2 is not supported",
    ),
    "checkpoint-version": (
        lambda ck: _edit_meta(ck, lambda m: m.update({"checkpoint_version": 0})),
        "checkpoint version 0 is not supported",
    ),
    "not-vqsuite-json": (
        lambda ck: _edit_meta(ck, lambda m: m.update({"format": "other"})),
        "is not a vqsuite-quantized",
    ),
    "invalid-json": (lambda ck: (ck / CONFIG_NAME).write_text("{not json"), f"{CONFIG_NAME} is not valid JSON"),
    "corrupt-safetensors": (
        lambda ck: (ck / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10),
        f"{WEIGHTS_NAME} is corrupt or unreadable",
    ),
    "truncated-safetensors": (
        lambda ck: (ck / WEIGHTS_NAME).write_bytes((ck / WEIGHTS_NAME).read_bytes()[:-100]),
        f"{WEIGHTS_NAME} is corrupt or unreadable",
    ),
    "missing-weights-file": (lambda ck: (ck / WEIGHTS_NAME).unlink(), f"has no {WEIGHTS_NAME}"),
    "missing-folder": (lambda ck: shutil.rmtree(ck), "no checkpoint at"),
    "unknown-layer-class": (
        lambda ck: _edit_meta(ck, lambda m: m["layers"]["fc1"].update({"class": "QEmbedding"})),
        "layer 'fc1': unknown quantized class 'QEmbedding'",
    ),
    "layer-not-in-model": (
        lambda ck: _edit_meta(ck, lambda m: m["layers"].update({"fc9": m["layers"]["fc1"]})),
        "layer 'fc9' of the checkpoint does not exist in the model",
    ),
    "layer-type-mismatch": (
        lambda ck: _edit_meta(ck, lambda m: m["layers"].update({"conv": m["layers"]["fc1"]})),
        "layer 'conv' is a Conv2d in the model but a Linear in the checkpoint",
    ),
    "bad-layer-args": (
        lambda ck: _edit_meta(ck, lambda m: m["layers"]["fc1"]["args"].update({"in_features": 33})),
        "layer 'fc1': invalid entry",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_gives_checkpoint_error_and_leaves_model_alone(damage: str, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    vqsuite.save_quantized(_quantized("w4a16"), ck)
    damage_fn, needle = DAMAGE[damage]
    damage_fn(ck)
    fresh = _net(9)
    before_types = _types(fresh)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(vqsuite.CheckpointError) as err:
        vqsuite.load_quantized(ck, model=fresh)
    msg = str(err.value)
    assert needle in msg, msg
    assert "\n" not in msg
    assert _types(fresh) == before_types  # the float model was not left half converted
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(vqsuite.CheckpointError, ValueError)


def test_path_that_is_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(vqsuite.CheckpointError, match="is a file"):
        vqsuite.load_quantized(f, model=_net())


def test_model_none_without_recorded_source(tmp_path: Path) -> None:
    vqsuite.save_quantized(_quantized("w8a8"), tmp_path / "ck")
    with pytest.raises(
        vqsuite.CheckpointError, match=r"does not record how to build .*Net.*load_quantized\(path, model="
    ):
        vqsuite.load_quantized(tmp_path / "ck")


# ---------------------------------------------------------------------------- saving
def test_atomic_save_keeps_existing_checkpoint_when_writing_crashes(tmp_path: Path, monkeypatch) -> None:
    ck = tmp_path / "ck"
    first = _quantized("w8a8")
    vqsuite.save_quantized(first, ck)
    files_before = {p.name: p.read_bytes() for p in ck.iterdir()}

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        vqsuite.save_quantized(_quantized("w4a4", seed=1), ck)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folder left behind
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == files_before
    monkeypatch.undo()
    x = _x()
    with torch.no_grad():
        assert torch.equal(vqsuite.load_quantized(ck, model=_net(4))(x), first(x))


def test_saving_again_replaces_the_checkpoint_cleanly(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    vqsuite.save_quantized(_quantized("w8a8"), ck)
    second = _quantized("nvfp4", seed=2)
    vqsuite.save_quantized(second, ck)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    loaded = vqsuite.load_quantized(ck, model=_net())
    assert loaded.fc1.spec == get_preset("nvfp4").default
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), second(x))


def test_saving_onto_something_else_is_refused(tmp_path: Path) -> None:
    model = _quantized("w8a8")
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    with pytest.raises(vqsuite.CheckpointError, match="not a vqsuite checkpoint folder; refusing"):
        vqsuite.save_quantized(model, f)
    assert f.read_text() == "precious"
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"jpg")
    with pytest.raises(vqsuite.CheckpointError, match="refusing"):
        vqsuite.save_quantized(model, d)
    assert [p.name for p in d.iterdir()] == ["a.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    vqsuite.save_quantized(model, empty)  # an empty folder is fine
    assert (empty / WEIGHTS_NAME).is_file() and (empty / CONFIG_NAME).is_file()


def test_saving_a_float_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(vqsuite.CheckpointError, match="no quantized layers"):
        vqsuite.save_quantized(_net(), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------------- tied weights, reused layers
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, 50]."""
        return self.head(torch.relu(self.fc(self.emb(tokens))))


@pytest.mark.parametrize("quantize_head", [False, True], ids=["head-float-tied", "head-quantized"])
def test_tied_weights_save_and_load(quantize_head: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM().eval()
    vqsuite.quantize_model(model, "w8a8", exclude=None if quantize_head else ["head"])
    tokens = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        y = model(tokens)
    vqsuite.save_quantized(model, tmp_path / "ck")
    stored = load_file(str(tmp_path / "ck" / WEIGHTS_NAME))
    meta = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    torch.manual_seed(1)
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=TiedLM().eval())
    with torch.no_grad():
        assert torch.equal(loaded(tokens), y)
    if quantize_head:
        assert isinstance(loaded.head, QLinear) and meta["aliases"] == {}
    else:
        assert meta["aliases"] == {"head.weight": "emb.weight"} and "head.weight" not in stored
        assert loaded.head.weight is loaded.emb.weight  # still one Parameter, not two sharing a storage


def test_reused_layer_is_quantized_everywhere_and_round_trips(tmp_path: Path) -> None:
    def build() -> nn.Sequential:
        shared = nn.Linear(64, 64)
        return nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(64, 8))

    torch.manual_seed(0)
    model = build()
    vqsuite.quantize_model(model, "w4a16")
    assert isinstance(model[0], QLinear) and model[2] is model[0]
    assert [e.name for e in model.vqsuite_report.quantized] == ["0", "4"]
    assert model.vqsuite_report.bytes_after < model.vqsuite_report.bytes_before / 3
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x)
    vqsuite.save_quantized(model, tmp_path / "ck")
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=build())
    assert isinstance(loaded[0], QLinear) and loaded[2] is loaded[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
