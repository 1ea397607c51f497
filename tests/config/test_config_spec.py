"""QuantSpec / QuantConfig: every bad value is a ValueError naming it, presets round-trip through plain dicts,
overrides resolve by fnmatch with the first match winning, exclusions beat overrides."""

from __future__ import annotations

import json

import pytest

import vqsuite
from vqsuite.config import CONFIG_VERSION, QuantConfig, QuantSpec, get_preset, resolve_config

REQUIRED_PRESETS = ("w8a8", "w8a8-fp8", "w4a16", "w4a8", "w4a4", "nvfp4", "mxfp4")

# (kwargs, text the error message must contain)
INVALID_SPECS = [
    ({"weight": "int5"}, "weight='int5'"),
    ({"act": "int5", "act_mode": "dynamic_per_token"}, "act='int5'"),
    ({"weight_group_size": 0}, "weight_group_size=0"),
    ({"weight_group_size": -64}, "weight_group_size=-64"),
    ({"weight_group_size": 64.0}, "weight_group_size=64.0"),
    ({"weight_group_size": True}, "weight_group_size=True"),
    ({"act": "int8", "act_mode": "dynamic_per_group", "act_group_size": 0}, "act_group_size=0"),
    ({"act": "int8", "act_mode": "dynamic"}, "act_mode='dynamic'"),
    ({"kernel": "cuda"}, "kernel='cuda'"),
    ({"scale_dtype": "float64"}, "scale_dtype='float64'"),
    ({"rank": -1}, "rank=-1"),
    ({"rank": 2.5}, "rank=2.5"),
    ({"weight": None}, "weight=None and act=None"),
    ({"weight": "nvfp4", "weight_group_size": 32}, "weight_group_size=32"),
    ({"weight": "mxfp4", "weight_group_size": 16}, "weight_group_size=16"),
    ({"act_mode": "dynamic_per_token"}, "act_mode='dynamic_per_token'"),
    ({"act_group_size": 64}, "act_group_size=64"),
    ({"act": "int8"}, "act='int8'"),
    ({"act": "int8", "act_mode": "dynamic_per_group"}, "act_group_size"),
    ({"act": "int8", "act_mode": "dynamic_per_token", "act_group_size": 64}, "act_group_size=64"),
    ({"act": "nvfp4", "act_mode": "dynamic_per_token"}, "act='nvfp4'"),
    ({"act": "int8_asym", "act_mode": "static"}, "act='int8_asym'"),
]


@pytest.mark.parametrize(
    "kwargs, needle",
    INVALID_SPECS,
    ids=[
        "unknown-weight-format",
        "unknown-act-format",
        "zero-weight-group",
        "negative-weight-group",
        "float-weight-group",
        "bool-weight-group",
        "zero-act-group",
        "unknown-act-mode",
        "unknown-kernel",
        "unknown-scale-dtype",
        "negative-rank",
        "float-rank",
        "quantizes-nothing",
        "nvfp4-wrong-block",
        "mxfp4-wrong-block",
        "act-mode-without-act",
        "act-group-without-act",
        "act-without-mode",
        "per-group-without-group",
        "per-token-with-group",
        "block-act-per-token",
        "static-asymmetric-act",
    ],
)
def test_invalid_spec_raises_value_error_naming_the_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        QuantSpec(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "spec, in_features, kw, needle",
    [
        (QuantSpec(weight="int4", weight_group_size=48), 1000, {}, "group_size=48 must divide in_features=1000"),
        (QuantSpec(weight="nvfp4"), 72, {}, "weight_group_size=16 must divide in_features=72"),
        (QuantSpec(weight="int4"), 9, {}, "even in_features, got 9"),
        (
            QuantSpec(weight="int8", act="int4", act_mode="dynamic_per_group", act_group_size=64),
            576,
            {"act_features": 3},
            "act_group_size=64 must divide the activation channels 3",
        ),
    ],
    ids=["int4-g48-k1000", "nvfp4-k72", "int4-odd-k", "act-group-vs-channels"],
)
def test_validate_for_names_the_mismatch(spec: QuantSpec, in_features: int, kw: dict, needle: str) -> None:
    assert needle in (spec.incompatibility(in_features, **kw) or "")
    with pytest.raises(ValueError) as err:
        spec.validate_for(in_features, **kw)
    assert needle in str(err.value)


def test_validate_for_accepts_fitting_shapes() -> None:
    QuantSpec(weight="int4", weight_group_size=64).validate_for(1024)
    QuantSpec(weight="int8", rank=8).validate_for(64, act_features=64)  # a conv takes a low-rank branch too
    QuantSpec(weight="int8").validate_for(9)  # per channel: any K, 8-bit needs no packing
    assert QuantSpec(weight="int4", weight_group_size=48).incompatibility(960) is None


def test_block_formats_fill_in_their_group() -> None:
    assert QuantSpec(weight="nvfp4").weight_group_size == 16
    assert QuantSpec(weight="mxfp4").weight_group_size == 32
    spec = QuantSpec(weight="nvfp4", act="mxfp4", act_mode="dynamic_per_group")
    assert (spec.weight_group_size, spec.act_group_size) == (16, 32)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"default": "w8a8"}, "default='w8a8'"),
        ({"overrides": (("*.fc", "w4a16"),)}, "override for '*.fc'"),
        ({"overrides": ((3, QuantSpec()),)}, "override (3,"),
        ({"overrides": (("a", QuantSpec(), "b"),)}, "must be a (pattern, QuantSpec | None) pair"),
        ({"version": CONFIG_VERSION + 1}, f"version={CONFIG_VERSION + 1}"),
        ({"method": "awq"}, "method='awq'"),
    ],
    ids=["default-not-spec", "override-not-spec", "pattern-not-str", "override-triple", "future-version", "method"],
)
def test_invalid_config_raises_value_error_naming_the_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        QuantConfig(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("name", vqsuite.list_presets())
def test_every_preset_round_trips_through_dict_and_json(name: str) -> None:
    cfg = vqsuite.get_preset(name)
    assert cfg.name == name
    d = cfg.to_dict()
    assert d["version"] == CONFIG_VERSION
    assert QuantConfig.from_dict(d) == cfg
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert QuantSpec.from_dict(cfg.default.to_dict()) == cfg.default


def test_config_with_overrides_and_exclude_round_trips() -> None:
    cfg = QuantConfig(
        default=QuantSpec(weight="int4", weight_group_size=64, act="int8", act_mode="dynamic_per_token"),
        overrides={"*.attn.*": QuantSpec(weight="nvfp4"), "head": None},
        exclude=("stem.*",),
        name="custom",
        method="svdquant",
        method_options={"num_grids": 20, "gptq": False},
    )
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.overrides == (("*.attn.*", QuantSpec(weight="nvfp4")), ("head", None))
    assert back.method == "svdquant" and back.options == {"num_grids": 20, "gptq": False}


@pytest.mark.parametrize(
    "d, needle",
    [
        ({**get_preset("w8a8").to_dict(), "version": CONFIG_VERSION + 1}, f"version={CONFIG_VERSION + 1}"),
        ({**get_preset("w8a8").to_dict(), "version": None}, "version=None"),
        ({k: v for k, v in get_preset("w8a8").to_dict().items() if k != "version"}, "version=None"),
        ({**get_preset("w8a8").to_dict(), "bits": 4}, "bits"),
        ({**get_preset("w8a8").to_dict(), "default": {**QuantSpec().to_dict(), "zero": 1}}, "zero"),
        (["w8a8"], "list"),
    ],
    ids=["future-version", "null-version", "missing-version", "unknown-config-field", "unknown-spec-field", "list"],
)
def test_from_dict_rejects_bad_dicts(d: object, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        QuantConfig.from_dict(d)  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_overrides_first_match_wins() -> None:
    int4 = QuantSpec(weight="int4", weight_group_size=32)
    fp8 = QuantSpec(weight="fp8_e4m3")
    cfg = QuantConfig(default=QuantSpec(weight="int8"), overrides=(("blocks.0.*", int4), ("blocks.*", fp8)))
    assert cfg.resolve("blocks.0.fc1") == (int4, "override 'blocks.0.*'")
    assert cfg.resolve("blocks.1.fc1") == (fp8, "override 'blocks.*'")
    assert cfg.resolve("head") == (QuantSpec(weight="int8"), "default")
    # the same two patterns the other way round: the broad one now shadows the narrow one
    flipped = QuantConfig(default=QuantSpec(weight="int8"), overrides=(("blocks.*", fp8), ("blocks.0.*", int4)))
    assert flipped.spec_for("blocks.0.fc1") == fp8


def test_override_dict_keeps_insertion_order() -> None:
    a, b = QuantSpec(weight="int4", weight_group_size=32), QuantSpec(weight="fp8_e4m3")
    cfg = QuantConfig(overrides={"x.*": a, "*": b})
    assert [p for p, _ in cfg.overrides] == ["x.*", "*"]
    assert cfg.spec_for("x.y") == a and cfg.spec_for("z") == b


def test_override_to_none_keeps_float() -> None:
    cfg = QuantConfig(overrides=(("*.head", None),))
    spec, why = cfg.resolve("model.head")
    assert spec is None and "kept in float" in why and "'*.head'" in why
    assert cfg.spec_for("model.body") == cfg.default


def test_exclude_beats_overrides_and_default() -> None:
    cfg = QuantConfig(overrides=(("stem", QuantSpec(weight="int4", weight_group_size=32)),), exclude=("stem", "*.ln"))
    spec, why = cfg.resolve("stem")
    assert spec is None and "excluded" in why and "'stem'" in why
    assert cfg.spec_for("a.ln") is None
    assert cfg.spec_for("a.lnx") == cfg.default  # fnmatch is whole-name: '*.ln' does not match 'a.lnx'


def test_exclude_string_is_one_pattern() -> None:
    assert QuantConfig(exclude="head*").exclude == ("head*",)


def test_list_presets_has_the_required_ones() -> None:
    names = vqsuite.list_presets()
    assert names == sorted(names)
    missing = [n for n in REQUIRED_PRESETS if n not in names]
    assert not missing, f"missing presets: {missing}"
    assert set(vqsuite.describe_presets()) == set(names)


@pytest.mark.parametrize(
    "name, weight, group, act, act_mode",
    [
        ("w8a8", "int8", None, "int8", "dynamic_per_token"),
        ("w8a8-fp8", "fp8_e4m3", None, "fp8_e4m3", "dynamic_per_token"),
        ("w4a16", "int4", 64, None, "none"),
        ("w4a8", "int4", 64, "int8", "dynamic_per_token"),
        ("w4a4", "int4", 64, "int4", "dynamic_per_group"),
        ("nvfp4", "nvfp4", 16, "nvfp4", "dynamic_per_group"),
        ("mxfp4", "mxfp4", 32, "mxfp4", "dynamic_per_group"),
    ],
    ids=["w8a8", "w8a8-fp8", "w4a16", "w4a8", "w4a4", "nvfp4", "mxfp4"],
)
def test_presets_mean_what_their_names_say(name: str, weight: str, group, act, act_mode: str) -> None:
    spec = vqsuite.get_preset(name).default
    assert (spec.weight, spec.weight_group_size, spec.act, spec.act_mode) == (weight, group, act, act_mode)


def test_unknown_preset_and_duplicate_registration() -> None:
    with pytest.raises(ValueError, match="unknown preset 'w3a3'"):
        vqsuite.get_preset("w3a3")
    with pytest.raises(ValueError, match="'w8a8' is already registered"):
        vqsuite.register_preset("w8a8", QuantConfig(), "dup")


def test_resolve_config_accepts_every_documented_form() -> None:
    spec = QuantSpec(weight="int4", weight_group_size=32)
    assert resolve_config("w4a16") is get_preset("w4a16")
    assert resolve_config(spec) == QuantConfig(default=spec)
    assert resolve_config(get_preset("w8a8").to_dict()) == get_preset("w8a8")
    with pytest.raises(ValueError, match="config=42"):
        resolve_config(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec, label",
    [
        (get_preset("w4a4").default, "W:int4/g64 A:int4/g64"),
        (get_preset("w8a8").default, "W:int8/ch A:int8/tok"),
        (QuantSpec(weight=None, rank=16), "W:16 A:16 r16"),
        (QuantSpec(weight="int8", act="int8", act_mode="static"), "W:int8/ch A:int8/static"),
    ],
    ids=["w4a4", "w8a8", "lowrank-only", "static"],
)
def test_short_label(spec: QuantSpec, label: str) -> None:
    assert spec.short() == label
