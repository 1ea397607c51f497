"""Every quantized layer's ``forward`` takes its float layer's exact signature: the same parameter names (diffusers
calls ``proj_in(input=x)``), positional and keyword calls give identical results, fake-quant and frozen."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from vqsuite.config import QuantSpec, get_preset
from vqsuite.finetune.ofq import QATConv2d, QATLinear
from vqsuite.nn import CONV_TWINS, QLinear, QLinearLowRank

#: (float layer builder, quantized class, input shape); the specs quantize weights and activations
LAYERS: dict[str, tuple[Callable[[], nn.Module], type, tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(32, 16), QLinear, (3, 32)),
    "linear-lowrank": (lambda: nn.Linear(32, 16), QLinearLowRank, (2, 3, 32)),
    "conv1d": (lambda: nn.Conv1d(16, 8, 3, padding=1), CONV_TWINS[nn.Conv1d], (2, 16, 6)),
    "conv2d": (lambda: nn.Conv2d(16, 8, 3, padding=1), CONV_TWINS[nn.Conv2d], (2, 16, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(16, 8, 3, padding=1), CONV_TWINS[nn.Conv3d], (1, 16, 3, 4, 4)),
    "conv-t1d": (lambda: nn.ConvTranspose1d(16, 8, 3, stride=2), CONV_TWINS[nn.ConvTranspose1d], (2, 16, 5)),
    "conv-t2d": (lambda: nn.ConvTranspose2d(16, 8, 3, stride=2), CONV_TWINS[nn.ConvTranspose2d], (1, 16, 4, 4)),
    "conv-t3d": (lambda: nn.ConvTranspose3d(16, 8, 3, stride=2), CONV_TWINS[nn.ConvTranspose3d], (1, 16, 2, 3, 3)),
}
SPEC = get_preset("w8a8").default
LOWRANK_SPEC = QuantSpec(weight="int8", act="int8", act_mode="dynamic_per_token", rank=4)


def _params(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _quantized(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    build, cls, shape = LAYERS[name]
    torch.manual_seed(0)
    f = build()
    q = cls.from_float(f, LOWRANK_SPEC if cls is QLinearLowRank else SPEC)
    return f, q, torch.randn(shape)


def test_every_conv_twin_is_covered() -> None:
    assert {cls for _, cls, _ in LAYERS.values()} >= set(CONV_TWINS.values()) | {QLinear, QLinearLowRank}


@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_has_the_float_layers_parameter_names(name: str) -> None:
    build, cls, _ = LAYERS[name]
    assert _params(cls.forward) == _params(type(build()).forward)


@pytest.mark.parametrize("wrapper, float_type", [(QATLinear, nn.Linear), (QATConv2d, nn.Conv2d)])
def test_finetune_layer_replacements_have_the_float_layers_parameter_names(wrapper: type, float_type: type) -> None:
    assert _params(wrapper.forward) == _params(float_type.forward)


@pytest.mark.parametrize("name", list(LAYERS))
def test_positional_and_keyword_calls_agree_fake_quant_and_frozen(name: str) -> None:
    f, q, x = _quantized(name)
    with torch.no_grad():
        for _state in ("fake-quant", "frozen"):
            y = q(x)
            assert y.shape == f(x).shape
            assert torch.equal(q(input=x), y)
            if "conv-t" in name:
                size = [s + 1 for s in y.shape[2:]]  # stride 2: one more than the default is valid
                y_sized = q(x, size)
                assert list(y_sized.shape[2:]) == size
                assert torch.equal(q(input=x, output_size=size), y_sized)
                assert torch.equal(q(x, output_size=size), y_sized)
            q.freeze()


def test_finetune_layer_replacements_accept_input_keyword() -> None:
    torch.manual_seed(0)
    lin, conv = QATLinear(nn.Linear(8, 4), w_bits=4, a_bits=None), QATConv2d(nn.Conv2d(8, 4, 3))
    x, xc = torch.randn(2, 8), torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(lin(input=x), lin(x))
        assert torch.equal(conv(input=xc), conv(xc))
