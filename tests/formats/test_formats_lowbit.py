"""INT2 / INT3 / INT6: the format descriptions, every code through the 4-bit container, quantize/dequantize against
a plain reference, truthful frozen storage (int2/int3 packed two per byte, int6 one byte), and the Triton families
declining them (they run on the reference path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqsuite.kernels as vk
from vqsuite.config import QuantSpec
from vqsuite.formats import dequantize, get_format, pack_4bit, quantize, unpack_4bit
from vqsuite.kernels.reference import unpack_weight_codes
from vqsuite.nn import QLinear
from vqsuite.pipelines.report import module_nbytes

#: (name, bits, qmin, qmax, storage bits): signed symmetric, qmax = 2^(b-1) - 1 as for int4/int8
LOWBIT = [("int2", 2, -2, 1, 4), ("int3", 3, -4, 3, 4), ("int6", 6, -32, 31, 8)]
PACKED = ["int2", "int3"]
N, K = 48, 96


@pytest.mark.parametrize("name, bits, qmin, qmax, storage", LOWBIT, ids=[c[0] for c in LOWBIT])
def test_format_description(name: str, bits: int, qmin: int, qmax: int, storage: int) -> None:
    f = get_format(name)
    assert (f.bits, f.kind, f.qmin, f.qmax, f.asymmetric, f.block_size) == (bits, "int", qmin, qmax, False, None)
    assert qmax == 2 ** (bits - 1) - 1 and qmin == -(2 ** (bits - 1))
    assert f.storage_bits == storage and f.bits_per_element == float(storage)


def test_storage_bits_of_the_existing_formats_unchanged() -> None:
    expect = {"int4": 4, "int4_asym": 4, "int8": 8, "int8_asym": 8, "fp8_e4m3": 8, "nvfp4": 4, "mxfp4": 4}
    assert {n: get_format(n).storage_bits for n in expect} == expect
    assert get_format("nvfp4").bits_per_element == 4.5


@pytest.mark.parametrize("name", PACKED)
def test_every_code_round_trips_through_the_4bit_container(name: str) -> None:
    f = get_format(name)
    codes = torch.arange(int(f.qmin), int(f.qmax) + 1, dtype=torch.int8)
    # every ordered pair of codes, so each code sits in both the low and the high nibble
    pairs = torch.cartesian_prod(codes, codes).reshape(1, -1)
    packed = pack_4bit(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (1, pairs.shape[1] // 2)
    assert torch.equal(unpack_4bit(packed, signed=True), pairs)
    assert torch.equal(unpack_weight_codes(packed, name), pairs)


def test_int6_codes_are_stored_as_is() -> None:
    codes = torch.arange(-32, 32, dtype=torch.int8).reshape(2, 32)
    assert unpack_weight_codes(codes, "int6") is codes


def _reference(x: torch.Tensor, qmax: int, qmin: int, group: int, scale_dtype: torch.dtype):
    """Plain symmetric RTN along the last dim in groups: (codes int8 [N, K], dequantized fp32 [N, K])."""
    xg = x.reshape(x.shape[0], -1, group)
    scale = (xg.abs().amax(-1, keepdim=True) / qmax).to(scale_dtype).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(xg / safe), qmin, qmax)  # torch.round: half to even
    return q.to(torch.int8).reshape(x.shape), (q * scale).reshape(x.shape)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [None, 32], ids=["per-channel", "g32"])
@pytest.mark.parametrize("name, bits, qmin, qmax, storage", LOWBIT, ids=[c[0] for c in LOWBIT])
def test_quantize_dequantize_match_plain_reference(name, bits, qmin, qmax, storage, group, scale_dtype) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(N, K, generator=g)
    x[3] = 0.0  # an all-zero row: scale 0, codes 0
    x[:, 5] *= 6.0  # an outlier channel
    qt = quantize(x, name, group_size=group, scale_dtype=scale_dtype)
    codes, deq = _reference(x, qmax, qmin, group or K, scale_dtype)
    assert qt.codes.dtype == torch.int8 and torch.equal(qt.codes, codes)
    assert torch.equal(dequantize(qt, torch.float32), deq)
    assert int(qt.codes.max()) == qmax and int(qt.codes.min()) == -qmax  # symmetric: qmin itself is never produced


@pytest.mark.parametrize(
    "name, x, codes",
    [
        ("int2", [-1.0, -0.5, 0.49, 0.5, 0.51, 1.0], [-1, 0, 0, 0, 1, 1]),  # 0.5 and -0.5: half to even (0)
        ("int3", [-3.0, -2.5, -1.0, 0.0, 1.5, 3.0], [-3, -2, -1, 0, 2, 3]),
        ("int6", [-31.0, -0.5, 1.5, 2.5, 17.0, 31.0], [-31, 0, 2, 2, 17, 31]),
    ],
    ids=["int2", "int3", "int6"],
)
def test_hand_computed_codes(name: str, x: list[float], codes: list[int]) -> None:
    qt = quantize(torch.tensor([x]), name, per_tensor=False)
    assert qt.codes.tolist() == [codes]
    assert float(qt.scales.reshape(-1)[0]) == max(abs(v) for v in x) / get_format(name).qmax


def _frozen(name: str, **kw) -> tuple[QLinear, torch.Tensor, torch.Tensor]:
    lin = nn.Linear(K, N, bias=False)
    q = QLinear.from_float(lin, QuantSpec(weight=name, **kw))
    x = torch.randn(5, K)
    w_fake, y_fake = q.effective_weight().detach().clone(), q(x).detach()
    q.freeze()
    assert torch.equal(q.weight, w_fake) and torch.equal(q(x), y_fake), "fake-quant and frozen must agree bit for bit"
    return q, w_fake, y_fake


@pytest.mark.parametrize("name", PACKED)
def test_frozen_int2_int3_storage_is_half_a_byte_per_weight(name: str) -> None:
    q, _, _ = _frozen(name)
    buffers = {n: (tuple(t.shape), t.dtype) for n, t in q.named_buffers()}
    assert buffers == {"qweight": ((N, K // 2), torch.uint8), "wscales": ((N, 1), torch.float32)}
    assert module_nbytes(q) == N * K // 2 + N * 4  # codes + one fp32 scale per output channel


def test_frozen_int6_storage_is_one_byte_per_weight() -> None:
    q, _, _ = _frozen("int6")
    buffers = {n: (tuple(t.shape), t.dtype) for n, t in q.named_buffers()}
    assert buffers == {"qweight": ((N, K), torch.int8), "wscales": ((N, 1), torch.float32)}
    assert module_nbytes(q) == N * K + N * 4


def test_frozen_int2_grouped_with_int8_acts() -> None:
    q, _, _ = _frozen("int2", weight_group_size=32, scale_dtype="bfloat16", act="int8", act_mode="dynamic_per_token")
    assert module_nbytes(q) == N * K // 2 + N * (K // 32) * 2


def test_odd_k_is_refused_for_packed_formats_only() -> None:
    assert "4-bit packing (int3)" in QuantSpec(weight="int3").incompatibility(95)
    assert QuantSpec(weight="int6").incompatibility(95) is None


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(weight="int2", act="int8", act_mode="dynamic_per_token"),
        QuantSpec(weight="int3", act="int8", act_mode="dynamic_per_token"),
        QuantSpec(weight="int6", act="int8", act_mode="dynamic_per_token"),
        QuantSpec(weight="int3", act="int4", act_mode="dynamic_per_group", act_group_size=64),
        QuantSpec(weight="int2", weight_group_size=64, scale_dtype="bfloat16"),
        QuantSpec(weight="int3", weight_group_size=128, scale_dtype="bfloat16"),
        QuantSpec(weight="int6", weight_group_size=64, scale_dtype="bfloat16"),
    ],
    ids=["w2a8", "w3a8", "w6a8", "w3a4", "w2a16-g64", "w3a16-g128", "w6a16-g64"],
)
def test_triton_families_decline_lowbit_formats(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from vqsuite.kernels.triton import mma8, w4a16

    k, n = 256, 64
    layer = QLinear.from_float(nn.Linear(k, n).half(), spec).freeze()
    x = torch.randn(4, k, dtype=torch.float16)
    assert isinstance(mma8.plan_for(layer, x), str) and not mma8.accepts(x, layer)
    assert not w4a16.accepts(x, layer)
    name, _ = vk.select("qlinear", "auto", layer.kernel_key, x=x, layer=layer)
    assert name == "reference"
    # the same layer with int4 in place of the low-bit format is taken by a Triton family (the check can fail)
    control = QLinear.from_float(nn.Linear(k, n).half(), spec.replace(weight="int4")).freeze()
    if spec.act is None:
        assert w4a16.accepts(x, control)
    else:
        assert mma8.accepts(x, control)


def test_cli_formats_lists_lowbit_with_storage_bits(capsys: pytest.CaptureFixture[str]) -> None:
    from vqsuite.cli.main import main

    assert main(["formats"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    for name, bits, _, _, storage in LOWBIT:
        assert rows[name][1:4] == [str(bits), "bits", f"{storage:.2f}"], rows[name]
