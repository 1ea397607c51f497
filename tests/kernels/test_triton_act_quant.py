"""The Triton activation stage (smoothing + activation quantization + low-rank down-projection), run on CPU
tensors by Triton's interpreter, against its plain-PyTorch twin.

Triton decides interpreter vs. compiler when a kernel is jitted, and ``vqsuite.kernels.triton.act_quant`` jits
lazily, so the ``interpret`` fixture sets ``TRITON_INTERPRET=1`` for each test's duration only (monkeypatch) and
every other test module keeps its kernel choice. Interpreter trap: ``tl.dot`` on bf16 operands is wrong under the
interpreter; the kernel upcasts its (already bf16-rounded) operands to fp32 there, so bf16 is tested too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from vqsuite.config import QuantSpec  # noqa: E402
from vqsuite.kernels.reference import act_quant_lowrank_reference  # noqa: E402
from vqsuite.nn.quantizers import quantize_activation  # noqa: E402

#: the down-projection output (fp32 accumulation, one rounding) against the twin (summation order differs)
MIN_SQNR_DB = 40.0

ACTS = [
    pytest.param("int8", "dynamic_per_token", None, id="int8_tok"),
    pytest.param("int4", "dynamic_per_group", 64, id="int4_g64"),
    pytest.param("fp8_e4m3", "dynamic_per_token", None, id="fp8_tok"),
    pytest.param("nvfp4", "dynamic_per_group", 16, id="nvfp4_g16"),
    pytest.param("int8", "static", None, id="int8_static"),
    pytest.param("fp8_e4m3", "static", None, id="fp8_static"),
]
#: (M, K, rank, dtype): M=1, M not a multiple of the 16-row block, K one group / several groups / a partial block
SHAPES = [
    pytest.param(1, 64, 0, torch.float16, id="M1-K64-r0-fp16"),
    pytest.param(17, 192, 32, torch.float16, id="M17-K192-r32-fp16"),
    pytest.param(33, 128, 32, torch.bfloat16, id="M33-K128-r32-bf16"),
    pytest.param(5, 256, 7, torch.float32, id="M5-K256-r7-fp32"),
]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def _bits(codes: torch.Tensor) -> torch.Tensor:
    return codes if codes.dtype == torch.int8 else codes.view(torch.uint8)


def _inputs(m: int, k: int, rank: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[:, : k // 8] *= 40  # outlier channels, so saturation and tiny groups both occur
    if m > 2:
        x[1] = 0  # an all-zero token: scale 0, codes 0
    smooth = torch.rand(k, generator=g) + 0.5
    proj_down = torch.randn(k, rank, generator=g) * 0.1 if rank else None
    return {
        "x": x.to(dtype),
        "smooth": smooth.to(dtype),
        "proj_down": None if proj_down is None else proj_down.to(dtype),
        "static_scale": torch.tensor(0.3),  # small: the outlier channels saturate
    }


@pytest.mark.parametrize(("m", "k", "rank", "dtype"), SHAPES)
@pytest.mark.parametrize(("act", "mode", "group"), ACTS)
def test_act_stage_matches_twin_bit_exact(interpret, act, mode, group, m, k, rank, dtype) -> None:
    from vqsuite.kernels.triton.act_quant import act_quant_lowrank

    inp = _inputs(m, k, rank, dtype)
    kw = dict(act=act, act_mode=mode, group_size=group, **{n: inp[n] for n in ("static_scale", "smooth", "proj_down")})
    codes, scales, lowrank = act_quant_lowrank(inp["x"], **kw)
    codes_ref, scales_ref, lowrank_ref = act_quant_lowrank_reference(inp["x"], **kw)
    assert codes.dtype == codes_ref.dtype and codes.shape == (m, k)
    assert torch.equal(_bits(codes), _bits(codes_ref))
    assert scales.dtype == torch.float32 and torch.equal(scales, scales_ref)
    if rank:
        assert lowrank.dtype == dtype and lowrank.shape == (m, rank)
        assert sqnr_db(lowrank_ref, lowrank) >= MIN_SQNR_DB
    else:
        assert lowrank is None and lowrank_ref is None


@pytest.mark.parametrize(("act", "mode", "group"), ACTS)
def test_twin_codes_dequantize_to_the_reference_fake_quant(act, mode, group) -> None:
    """The twin is tied to the reference path: codes x scales, rounded to x's dtype, are exactly the activations
    ``quantize_activation`` feeds the reference GEMM."""
    inp = _inputs(9, 128, 0, torch.float16, seed=1)
    codes, scales, _ = act_quant_lowrank_reference(
        inp["x"], act=act, act_mode=mode, group_size=group, static_scale=inp["static_scale"], smooth=inp["smooth"]
    )
    xs = inp["x"] / inp["smooth"]
    spec = QuantSpec(weight=None, act=act, act_mode=mode, act_group_size=None if act == "nvfp4" else group)
    expected = quantize_activation(xs, spec, inp["static_scale"])
    per_col = scales.repeat_interleave(128 // scales.shape[1], dim=1)
    assert torch.equal((codes.float() * per_col).to(torch.float16), expected)


def test_act_stage_refuses_what_it_does_not_implement() -> None:
    from vqsuite.kernels.triton.act_quant import act_quant_lowrank

    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="mxfp4"):
        act_quant_lowrank(x, act="mxfp4", act_mode="dynamic_per_group", group_size=32)
    with pytest.raises(ValueError, match="group_size=48"):
        act_quant_lowrank(x, act="int4", act_mode="dynamic_per_group", group_size=48)
    with pytest.raises(ValueError, match="rank=129"):
        act_quant_lowrank(x, act="int8", act_mode="dynamic_per_token", proj_down=torch.zeros(64, 129))
