"""Bad input to the library raises :class:`UserError` / :class:`ConfigError` (still ``ValueError`` subclasses), one line
naming the bad value, so the CLI can tell the user's mistake from a bug."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from vqsuite.errors import ConfigError, UserError


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _static_preset() -> str:
    from vqsuite.config import get_preset, list_presets

    return next(p for p in list_presets() if get_preset(p).default.act_mode == "static")


def _quantize(x: torch.Tensor, fmt: str = "int8", **kw: object) -> object:
    from vqsuite.formats import quantize

    return quantize(x, fmt, **kw)


def _calib_empty() -> object:
    from vqsuite.calibrators.data import run_calibration_data

    return run_calibration_data(_tiny(), [])


def _svdquant_option() -> object:
    from vqsuite.calibrators.svdquant import SVDQuantOptions

    return SVDQuantOptions.from_dict({"num_grids": 0})


def _logits_of_empty(inputs: object) -> object:
    from vqsuite.evals.accuracy import collect_logits

    return collect_logits(_tiny(), inputs, transform=lambda im: im, progress=False)


# (id, call, error type, text the message must contain)
CASES: list[tuple[str, Callable[[], object], type[UserError], str]] = [
    ("spec-unknown-format", lambda: __import__("vqsuite").QuantSpec(weight="int5"), ConfigError, "weight='int5'"),
    ("spec-bad-act-mode", lambda: __import__("vqsuite").QuantSpec(act_mode="sometimes"), ConfigError, "act_mode="),
    ("unknown-preset", lambda: __import__("vqsuite").get_preset("w3a3"), ConfigError, "unknown preset 'w3a3'"),
    ("config-from-list", lambda: __import__("vqsuite").QuantConfig.from_dict([1]), ConfigError, "dict is expected"),
    ("config-no-default", lambda: __import__("vqsuite").QuantConfig.from_dict({"version": 1}), ConfigError,
     "needs a 'default'"),
    ("spec-from-list", lambda: __import__("vqsuite").QuantSpec.from_dict([1]), ConfigError, "dict is expected"),
    ("resolve-config-int", lambda: __import__("vqsuite.config").config.resolve_config(3), ConfigError, "config=3"),
    ("format-nan", lambda: _quantize(torch.tensor([1.0, float("nan")]), name="blocks.0.weight"), UserError,
     "blocks.0.weight holds non-finite values (1 NaN, 0 Inf)"),
    ("format-inf", lambda: _quantize(torch.tensor([float("inf")] * 4), name="w"), UserError, "(0 NaN, 4 Inf)"),
    ("format-unknown", lambda: _quantize(torch.ones(4), "int5"), ConfigError, "unknown format 'int5'"),
    ("format-group-not-dividing", lambda: _quantize(torch.ones(2, 6), group_size=4), ConfigError,
     "group_size=4 must divide"),
    ("format-empty", lambda: _quantize(torch.ones(0, 4)), UserError, "is empty"),
    ("quantize-model-not-a-module", lambda: __import__("vqsuite").quantize_model("resnet18"), UserError,
     "must be a torch.nn.Module"),
    ("static-without-calib-data", lambda: __import__("vqsuite").quantize_model(_tiny(), _static_preset()), UserError,
     "pass calib_data"),
    ("calib-data-empty", _calib_empty, UserError, "calib_data is empty"),
    ("svdquant-option", _svdquant_option, ConfigError, "num_grids=0"),
    ("logits-empty-tensor", lambda: _logits_of_empty(torch.zeros(0, 64)), UserError, "hold no examples"),
    ("logits-empty-file-list", lambda: _logits_of_empty([]), UserError, "no image files given"),
    ("zoo-unknown", lambda: __import__("vqsuite.zoo").zoo.load("resnet50"), UserError, "no zoo entry 'resnet50'"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_input_raises_user_error(call: Callable[[], object], error: type[UserError], needle: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, ValueError)  # callers' `except ValueError` keeps working
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_quantize_model_leaves_the_model_alone_on_user_error() -> None:
    import vqsuite

    model = _tiny()
    before = [type(m) for m in model.modules()]
    with pytest.raises(UserError):
        vqsuite.quantize_model(model, _static_preset())
    assert [type(m) for m in model.modules()] == before


def test_a_single_string_include_is_one_pattern() -> None:
    import vqsuite

    model = vqsuite.quantize_model(_tiny(), "w8a8", include="0")
    assert [e.name for e in model.vqsuite_report.layers if e.status == "quantized"] == ["0"]
