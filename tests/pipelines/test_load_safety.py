"""Loading a module checkpoint folder is safe by construction: no pickle is ever opened (a hostile pickle under any
name a loader could look at never runs), nothing the JSON names is imported, no file outside the folder is read,
every malformed field is one readable CheckpointError line naming the file and field (never echoing the file's
bytes), and stored NaN/Inf values are refused at load. The same through ``vqsuite info`` (exit 2, one line)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pickle_bait import plant_pickle, refuse_unpickling
from safetensors.torch import load_file, save_file
from torch import nn

import vqsuite
from vqsuite.config import QuantConfig, QuantSpec, get_preset
from vqsuite.nn import QConv2d, QConvTranspose2d, QLinear, QLinearLowRank
from vqsuite.pipelines.io import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint_meta
from vqsuite.pipelines.schema import LAYER_ARGS

#: the longest message allowed once the (machine-dependent) temporary path is taken out
MAX_MESSAGE = 300
LOWRANK = QuantConfig(default=get_preset("w4a8").default.replace(rank=8))
MARKER_NAME = "PWNED"


class Net(nn.Module):
    """Conv, transposed conv and two linears: ``x [B, 16, 4, 4] -> [B, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.up = nn.ConvTranspose2d(64, 64, 2, stride=2)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(torch.relu(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _saved(tmp_path: Path, config: object = "w4a16") -> Path:
    ck = tmp_path / "ck"
    vqsuite.save_quantized(vqsuite.quantize_model(_net(), config), ck)
    return ck


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every unpickling entry point records its use (and refuses); the test asserts the list stays empty."""
    return refuse_unpickling(monkeypatch, "loading a checkpoint")


def _one_line(fn: Callable[[], object], needle: str, root: Path) -> str:
    with pytest.raises(vqsuite.CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert needle in msg, msg
    assert len(msg.replace(str(root), "")) <= MAX_MESSAGE, msg
    return msg


# ---------------------------------------------------------------------------- pickle bait
BAIT_NAMES = ["model.bin", "pytorch_model.bin", "diffusion_pytorch_model.bin", "model.pt", "model.pth", "model.pkl",
              "model.ckpt", "vqsuite_config.pkl", "model.safetensors.bin", "optimizer.pt"]  # fmt: skip


@pytest.mark.parametrize("name", BAIT_NAMES)
def test_pickle_beside_the_weights_is_ignored(name: str, tmp_path: Path, no_unpickling: list[str]) -> None:
    ck = _saved(tmp_path)
    marker = tmp_path / MARKER_NAME
    plant_pickle(ck / name, marker)
    x = torch.randn(2, 16, 4, 4)
    loaded = vqsuite.load_quantized(ck, model=_net(3))
    assert loaded(x).shape == (2, 10)
    assert not marker.exists() and no_unpickling == []


@pytest.mark.parametrize("name", [*BAIT_NAMES, WEIGHTS_NAME])
def test_pickle_instead_of_the_weights_is_refused(name: str, tmp_path: Path, no_unpickling: list[str]) -> None:
    ck = _saved(tmp_path)
    marker = tmp_path / MARKER_NAME
    (ck / WEIGHTS_NAME).unlink()
    plant_pickle(ck / name, marker)
    needle = "is corrupt or unreadable" if name == WEIGHTS_NAME else f"has no {WEIGHTS_NAME}"
    _one_line(lambda: vqsuite.load_quantized(ck, model=_net()), needle, tmp_path)
    assert not marker.exists() and no_unpickling == []


def test_pickle_instead_of_the_config_is_refused(tmp_path: Path, no_unpickling: list[str]) -> None:
    ck = _saved(tmp_path)
    marker = tmp_path / MARKER_NAME
    plant_pickle(ck / CONFIG_NAME, marker)
    msg = _one_line(lambda: vqsuite.load_quantized(ck, model=_net()), "is not valid JSON", tmp_path)
    assert "PWNED" not in msg and "builtins" not in msg  # the file's bytes are not echoed
    assert not marker.exists() and no_unpickling == []


# ---------------------------------------------------------------------------- nothing the JSON names is imported
def _edit_meta(ck: Path, edit: Callable[[dict], object]) -> None:
    meta = json.loads((ck / CONFIG_NAME).read_text())
    edit(meta)
    (ck / CONFIG_NAME).write_text(json.dumps(meta))


def _source(**fields: object) -> Callable[[dict], object]:
    base = {"library": "timm", "name": "test_vit", "kwargs": {}}
    return lambda m: m.update({"model_source": {**base, **fields}})


HOSTILE_SOURCES = {
    "library-os": (_source(library="os"), "model_source.library='os' is not an allowed model source"),
    "library-subprocess": (_source(library="subprocess"), "model_source.library='subprocess' is not an allowed"),
    "library-in-folder": (_source(library="evil_ck_module"), "'evil_ck_module' is not an allowed model source"),
    "timm-checkpoint-path": (
        _source(kwargs={"checkpoint_path": "/etc/passwd"}),
        "model_source.kwargs.checkpoint_path is not an allowed model argument",
    ),
    "timm-pretrained-cfg": (
        _source(kwargs={"pretrained_cfg_overlay": {"file": "/x.pth"}}),
        "model_source.kwargs.pretrained_cfg_overlay is not an allowed",
    ),
    "timm-pretrained": (_source(kwargs={"pretrained": True}), "model_source.kwargs.pretrained is not an allowed"),
    "timm-table-kwarg": (_source(kwargs={"act_layer": {"a": 1}}), "must be a number, string"),
    "timm-hub-name": (_source(name="hf-hub:evil/model"), "model_source.name='hf-hub:evil/model' is not a model name"),
    "timm-path-name": (_source(name="../../evil"), "is not a model name"),
    "timm-unknown-name": (_source(name="no_such_arch_xyz"), "timm has no such architecture"),
    "zoo-unknown-name": (_source(library="vqsuite.zoo", name="no-such-model"), "no such zoo model"),
    "zoo-kwargs": (_source(library="vqsuite.zoo", name="mnist-cnn2", kwargs={"a": 1}), "must be empty"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SOURCES))
def test_model_source_is_an_allow_list(case: str, tmp_path: Path, no_unpickling: list[str]) -> None:
    ck = _saved(tmp_path)
    (ck / "evil_ck_module.py").write_text(f"open({str(tmp_path / MARKER_NAME)!r}, 'w').close()\n")
    edit, needle = HOSTILE_SOURCES[case]
    _edit_meta(ck, edit)
    sys.path.insert(0, str(ck))
    try:
        _one_line(lambda: vqsuite.load_quantized(ck), needle, tmp_path)
    finally:
        sys.path.remove(str(ck))
    assert "evil_ck_module" not in sys.modules
    assert not (tmp_path / MARKER_NAME).exists() and no_unpickling == []


# ---------------------------------------------------------------------------- no file outside the folder
@pytest.mark.parametrize("fname", [WEIGHTS_NAME, CONFIG_NAME])
def test_symlink_out_of_the_folder_is_refused(fname: str, tmp_path: Path) -> None:
    ck = _saved(tmp_path)
    outside = tmp_path / f"outside-{fname}"
    shutil.move(ck / fname, outside)  # a perfectly valid file, but not in the folder
    os.symlink(outside, ck / fname)
    _one_line(lambda: vqsuite.load_quantized(ck, model=_net()), "is a link to outside the checkpoint folder", tmp_path)


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    ck = _saved(tmp_path)
    (ck / "weights").mkdir()
    shutil.move(ck / WEIGHTS_NAME, ck / "weights" / "real.safetensors")
    os.symlink(Path("weights") / "real.safetensors", ck / WEIGHTS_NAME)
    assert isinstance(vqsuite.load_quantized(ck, model=_net()).fc1, QLinear)


def test_symlinked_checkpoint_folder_is_fine(tmp_path: Path) -> None:
    ck = _saved(tmp_path)
    os.symlink(ck, tmp_path / "alias")
    assert isinstance(vqsuite.load_quantized(tmp_path / "alias", model=_net()).fc1, QLinear)


# ---------------------------------------------------------------------------- schema: one line per malformed field
def _layer(key: str, value: object) -> Callable[[dict], object]:
    return lambda m: m["layers"]["fc1"].update({key: value})


def _arg(key: str, value: object) -> Callable[[dict], object]:
    return lambda m: m["layers"]["fc1"]["args"].update({key: value})


def _spec(key: str, value: object) -> Callable[[dict], object]:
    return lambda m: m["layers"]["fc1"]["spec"].update({key: value})


MALFORMED = {
    "layers-string": (lambda m: m.update(layers="fc1"), "layers must be a table, not a string"),
    "layers-list": (lambda m: m.update(layers=["fc1"]), "layers must be a table, not a list"),
    "layer-string": (lambda m: m["layers"].update(fc1="QLinear"), "layers['fc1'] must be a table, not a string"),
    "layer-empty-name": (lambda m: m["layers"].update({"": m["layers"]["fc1"]}), "layers[''] is not a module name"),
    "layer-dots-name": (lambda m: m["layers"].update({"a..b": {}}), "layers['a..b'] is not a module name"),
    "dtype-float128": (_layer("weight_dtype", "float128"), "layers['fc1'].weight_dtype='float128' is not a float"),
    "dtype-Tensor": (_layer("weight_dtype", "Tensor"), "layers['fc1'].weight_dtype='Tensor' is not a float dtype"),
    "dtype-int8": (_layer("weight_dtype", "int8"), "layers['fc1'].weight_dtype='int8' is not a float dtype"),
    "dtype-number": (_layer("weight_dtype", 16), "layers['fc1'].weight_dtype=16 is not a float dtype"),
    "dtype-table": (_layer("weight_dtype", {"a": 1}), "layers['fc1'].weight_dtype is a table"),
    "dtype-missing": (lambda m: m["layers"]["fc1"].pop("weight_dtype"), "layers['fc1'].weight_dtype is missing"),
    "class-number": (_layer("class", 5), "layer 'fc1': unknown quantized class 5"),
    "class-missing": (lambda m: m["layers"]["fc1"].pop("class"), "layers['fc1'].class is missing"),
    "unknown-entry-key": (_layer("loader", "os.system"), "layers['fc1'].loader is not a known field"),
    "args-string": (_layer("args", "in_features=64"), "layers['fc1'].args must be a table, not a string"),
    "args-string-int": (_arg("in_features", "64"), "layers['fc1'].args.in_features='64' must be a positive integer"),
    "args-bool-int": (_arg("in_features", True), "layers['fc1'].args.in_features=True must be a positive integer"),
    "args-negative": (_arg("out_features", -4), "layers['fc1'].args.out_features=-4 must be a positive integer"),
    "args-float": (_arg("out_features", 64.0), "layers['fc1'].args.out_features=64.0 must be"),
    "args-huge": (_arg("out_features", 2**40), "must be a positive integer"),
    "args-bias-int": (_arg("bias", 1), "layers['fc1'].args.bias=1 must be true or false"),
    "args-unknown": (_arg("device", "cuda"), "layers['fc1'].args.device is not a known field"),
    "args-missing": (lambda m: m["layers"]["fc1"]["args"].pop("in_features"), "args.in_features is missing"),
    "conv-kernel-list3": (
        lambda m: m["layers"]["conv"]["args"].update(kernel_size=[3, 3, 3]),
        "layers['conv'].args.kernel_size is a list; must be a positive integer or a pair",
    ),
    "conv-padding-mode": (
        lambda m: m["layers"]["conv"]["args"].update(padding_mode="evil"),
        "layers['conv'].args.padding_mode='evil' must be",
    ),
    "spec-string": (_layer("spec", "w4a16"), "layers['fc1'].spec must be a table, not a string"),
    "spec-bad-format": (_spec("weight", "int5"), "layers['fc1'].spec is not a valid QuantSpec (weight='int5'"),
    "spec-unknown-field": (_spec("evil", 1), "layers['fc1'].spec is not a valid QuantSpec (unknown QuantSpec field"),
    "spec-missing": (lambda m: m["layers"]["fc1"].pop("spec"), "layers['fc1'].spec is missing"),
    "frozen-string": (_layer("frozen", "yes"), "layers['fc1'].frozen='yes' must be true or false"),
    "aliases-list": (lambda m: m.update(aliases=["a"]), "aliases must be a table, not a list"),
    "alias-number": (lambda m: m.update(aliases={"fc2.weight": 5}), "aliases['fc2.weight']=5 must be a tensor name"),
    "config-string": (lambda m: m.update(config="w4a16"), "config must be a table, not a string"),
    "config-default-number": (lambda m: m["config"].update(default=5), "config.default must be a table"),
    "config-overrides-string": (lambda m: m["config"].update(overrides="fc*"), "config.overrides must be a list"),
    "config-override-pair": (lambda m: m["config"].update(overrides=[["fc*"]]), "config.overrides[0] must be"),
    "config-exclude-number": (lambda m: m["config"].update(exclude=[1]), "config.exclude must be a list"),
    "config-method-unknown": (lambda m: m["config"].update(method="evil"), "bad config (method='evil'"),
    "config-options-list": (lambda m: m["config"].update(method_options=[1]), "config.method_options must be a"),
    "model-source-string": (lambda m: m.update(model_source="timm"), "model_source must be a table, not a string"),
    "model-source-extra": (_source(loader="x"), "model_source.loader is not a known field"),
    "model-source-kwargs-list": (_source(kwargs=[1]), "model_source.kwargs must be a table, not a list"),
    "vqsuite-version-number": (lambda m: m.update(vqsuite_version=1), "vqsuite_version must be a string"),
    "model-class-table": (lambda m: m.update(model_class={}), "model_class must be a string, not a table"),
    "no-format": (lambda m: m.pop("format"), "is not a vqsuite-quantized config"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_field_is_one_line_naming_it(case: str, tmp_path: Path) -> None:
    ck = _saved(tmp_path)
    edit, needle = MALFORMED[case]
    _edit_meta(ck, edit)
    fresh = _net(9)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    msg = _one_line(lambda: vqsuite.load_quantized(ck, model=fresh), needle, tmp_path)
    if "version" not in needle:
        assert str(ck / CONFIG_NAME) in msg  # names the file
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    assert type(fresh.fc1) is nn.Linear
    _one_line(lambda: read_checkpoint_meta(ck), needle, tmp_path)  # what `vqsuite info` reads


def test_long_values_are_clipped_and_not_echoed(tmp_path: Path) -> None:
    ck = _saved(tmp_path)
    secret = "SECRET-" * 40
    _edit_meta(ck, _layer("weight_dtype", secret))
    msg = _one_line(lambda: vqsuite.load_quantized(ck, model=_net()), "weight_dtype='SECRET-", tmp_path)
    assert secret not in msg


def test_invalid_json_does_not_echo_bytes(tmp_path: Path) -> None:
    ck = _saved(tmp_path)
    (ck / CONFIG_NAME).write_bytes(b'{"format": SECRETSECRET}')
    msg = _one_line(lambda: vqsuite.load_quantized(ck, model=_net()), "is not valid JSON (Expecting value", tmp_path)
    assert "SECRET" not in msg
    (ck / CONFIG_NAME).write_bytes(b'{"format": "\xff\xfeSECRET"}')
    msg = _one_line(lambda: vqsuite.load_quantized(ck, model=_net()), "not UTF-8 text at byte", tmp_path)
    assert "SECRET" not in msg and "\\xff" not in msg


def test_corrupt_safetensors_header_does_not_echo_it(tmp_path: Path) -> None:
    ck = _saved(tmp_path)
    header = json.dumps({"fc1.qweight": {"dtype": "SECRETDTYPE", "shape": [1], "data_offsets": [0, 1]}}).encode()
    (ck / WEIGHTS_NAME).write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    msg = _one_line(lambda: vqsuite.load_quantized(ck, model=_net()), "is corrupt or unreadable", tmp_path)
    assert "SECRET" not in msg


@pytest.mark.parametrize("cls", [QLinear, QLinearLowRank, QConv2d, QConvTranspose2d], ids=lambda c: c.__name__)
def test_layer_args_schema_matches_what_layers_record(cls: type) -> None:
    """``schema.LAYER_ARGS`` lists every constructor argument ``ctor_kwargs()`` writes, and accepts its values."""
    spec = QuantSpec(weight="int8", act=None)
    layer = {
        QLinear: lambda: QLinear(64, 32, spec=spec),
        QLinearLowRank: lambda: QLinearLowRank(64, 32, spec=spec, rank=4),
        QConv2d: lambda: QConv2d(16, 32, 3, stride=2, padding=1, spec=spec),
        QConvTranspose2d: lambda: QConvTranspose2d(16, 32, 4, stride=2, padding=1, spec=spec),
    }[cls]()
    recorded = json.loads(json.dumps(layer.ctor_kwargs()))  # as the checkpoint holds them (tuples become lists)
    checks, required = LAYER_ARGS[cls.__name__]
    assert set(recorded) == set(checks) and required <= set(recorded)
    for key, value in recorded.items():
        assert checks[key][0](value), (key, value)


# ---------------------------------------------------------------------------- NaN / Inf in stored tensors
def _poison(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        t = tensors[name].clone()
        flat = t.view(-1)
        flat[0] = torch.tensor(value, dtype=torch.float32).to(t.dtype)
        tensors[name] = t

    return edit


POISON = {
    "wscales-nan": ("w4a16", "fc1.wscales", float("nan")),
    "wscales-inf": ("w4a16", "fc2.wscales", float("inf")),
    "bias-nan": ("w4a16", "fc1.bias", float("nan")),
    "conv-bias-neginf": ("w4a16", "conv.bias", float("-inf")),
    "float8-scales-nan": ("nvfp4", "fc1.wscales", float("nan")),
    "global-scale-inf": ("nvfp4", "fc1.wtscale", float("inf")),
    "proj-down-nan": (LOWRANK, "fc1.proj_down", float("nan")),
    "proj-up-inf": (LOWRANK, "fc1.proj_up", float("inf")),
    "smooth-nan": (LOWRANK, "fc1.smooth", float("nan")),
}


@pytest.mark.filterwarnings("ignore:quantize_model quantized only")
@pytest.mark.parametrize("case", list(POISON))
def test_nan_or_inf_in_a_stored_tensor_is_refused(case: str, tmp_path: Path) -> None:
    config, tensor, value = POISON[case]
    ck = _saved(tmp_path, config)
    tensors = load_file(str(ck / WEIGHTS_NAME))
    if tensor not in tensors:
        pytest.skip(f"{tensor} is not stored by this preset")
    _poison(tensor, value)(tensors)
    save_file(tensors, str(ck / WEIGHTS_NAME), metadata={"format": "pt"})
    fresh = _net(9)
    msg = _one_line(lambda: vqsuite.load_quantized(ck, model=fresh), f"tensor '{tensor}' holds NaN or Inf", tmp_path)
    assert str(ck / WEIGHTS_NAME) in msg
    assert type(fresh.fc1) is nn.Linear  # left as it was


def test_a_model_with_nan_state_still_saves_but_does_not_load(tmp_path: Path) -> None:
    model = vqsuite.quantize_model(_net(), "w4a16")
    with torch.no_grad():
        model.fc2.bias[3] = float("nan")
    vqsuite.save_quantized(model, tmp_path / "ck")
    assert torch.isnan(load_file(str(tmp_path / "ck" / WEIGHTS_NAME))["fc2.bias"]).any()
    _one_line(lambda: vqsuite.load_quantized(tmp_path / "ck", model=_net()), "'fc2.bias' holds NaN", tmp_path)


# ---------------------------------------------------------------------------- through the CLI
CLI_CASES = ["layers-string", "dtype-float128", "dtype-Tensor", "args-string-int", "spec-string", "config-string"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_info_is_exit_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vqsuite.cli.main import EXIT_USAGE, main

    ck = _saved(tmp_path)
    edit, needle = MALFORMED[case]
    _edit_meta(ck, edit)
    for argv in (["info", str(ck)], ["info", str(ck), "--json"]):
        assert main(argv) == EXIT_USAGE
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("vqsuite info: error: ") and needle in err, err
        assert captured.out == ""


def test_cli_info_refuses_a_symlink_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vqsuite.cli.main import EXIT_USAGE, main

    ck = _saved(tmp_path)
    shutil.move(ck / CONFIG_NAME, tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", ck / CONFIG_NAME)
    assert main(["info", str(ck)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a link to outside the checkpoint folder" in err, err


def test_e8m0_nan_code_in_mxfp4_scales_is_refused(tmp_path: Path) -> None:
    """MXFP4 block scales are uint8 E8M0 exponents: NaN is the code 0xFF, which the float check cannot see."""
    ck = _saved(tmp_path, "mxfp4")
    tensors = load_file(str(ck / WEIGHTS_NAME))
    assert tensors["fc1.wscales"].dtype == torch.uint8
    assert vqsuite.load_quantized(ck, model=_net(9)) is not None  # intact: loads
    scales = tensors["fc1.wscales"].clone()
    scales.view(-1)[0] = 0xFF
    tensors["fc1.wscales"] = scales
    save_file(tensors, str(ck / WEIGHTS_NAME), metadata={"format": "pt"})
    fresh = _net(9)
    _one_line(lambda: vqsuite.load_quantized(ck, model=fresh), "'fc1.wscales' holds the E8M0 NaN code", tmp_path)
    assert type(fresh.fc1) is nn.Linear
