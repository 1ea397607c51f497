"""LSQ quantizers: integer ranges, step initialisation, level sets, biases and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from vqsuite.finetune.lsq import LSQActQuantizer, LSQWeightQuantizer, qrange

#: y / step vs its rounding (float32 division)
CODE_ATOL = 1e-5


@pytest.mark.parametrize(("bits", "signed", "expect"), [(2, True, (-2, 1)), (4, True, (-8, 7)), (2, False, (0, 3)),
                                                        (8, False, (0, 255))])  # fmt: skip
def test_qrange(bits, signed, expect):
    assert qrange(bits, signed) == expect


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", [2, 4])
def test_act_levels_and_init(bits, signed):
    torch.manual_seed(0)
    x = torch.randn(4, 10, 6) * torch.arange(1, 7)
    q = LSQActQuantizer(bits, 6, signed=signed)
    y = q(x)
    qn, qp = qrange(bits, signed)
    s_expect = 2 * x.abs().reshape(-1, 6).mean(0) / math.sqrt(qp)
    torch.testing.assert_close(q.step.detach(), s_expect, atol=0, rtol=1e-6)
    codes = (y / q.step).detach()
    # outputs are integer multiples of the step (up to the float division)
    torch.testing.assert_close(codes, codes.round(), atol=CODE_ATOL, rtol=0)
    codes = codes.round()
    assert codes.min() >= qn and codes.max() <= qp
    assert bool(q.initialized)
    # the init happens once: a second, larger batch keeps the step
    s0 = q.step.detach().clone()
    q(10 * x)
    assert torch.equal(q.step.detach(), s0)


def test_act_biases_shift_input_and_output():
    q = LSQActQuantizer(4, None, signed=False)
    x = torch.linspace(-1, 1, 50)
    q(x)  # init
    with torch.no_grad():
        q.bias_pre.fill_(1.0)
        q.bias_post.fill_(-1.0)
    y = q(x)
    ref = torch.round(torch.clamp((x + 1) / q.step, 0, 15)) * q.step - 1
    torch.testing.assert_close(y, ref.detach(), atol=1e-6, rtol=0)
    assert y.min() < 0, "the unsigned quantizer reaches negatives through the biases"


def test_lsq_gradients():
    q = LSQActQuantizer(3, None, signed=True)
    x = torch.randn(100, requires_grad=True)
    y = q(x)
    y.sum().backward()
    inside = (x / q.step).detach().abs() < 3.5
    # STE: identity inside the range, zero where clamped
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert q.step.grad is not None and torch.isfinite(q.step.grad).all()


def test_weight_quantizer_per_row():
    torch.manual_seed(1)
    w = torch.randn(3, 20)
    q = LSQWeightQuantizer(2, 3)
    y = q(w)
    s = 2 * w.abs().mean(1) / math.sqrt(1)
    torch.testing.assert_close(q.step.detach(), s, atol=0, rtol=1e-6)
    codes = q.codes(w)
    assert set(codes.unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0}
    torch.testing.assert_close(y, codes * q.step.detach()[:, None], atol=1e-6, rtol=0)
