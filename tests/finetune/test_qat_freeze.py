"""``freeze_qat``: OFQ/LSQ QAT models become frozen QLinear/QConv2d layers holding the learned grid exactly.

Formats (bit-exact): the mid-rise formats on every code, StatsQ and LSQ weights through them; LSQ's no-grad forward
equals its training forward's value. End to end on tiny timm ViTs (and a Swin block): frozen == QAT eval bit for bit
on the reference kernels, within a named SQNR on ``auto``; save/load round-trips bit-identically; bytes drop.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import vqsuite
import vqsuite.kernels
from vqsuite.config import QuantConfig, QuantSpec
from vqsuite.errors import ConfigError, UserError
from vqsuite.finetune import freeze_qat, ofq, prepare_qat, statsq_quantize
from vqsuite.finetune.freeze import (
    ActQuantConv2d,
    ActQuantLinear,
    FrozenQATAttention,
    FrozenQATWindowAttention,
    LSQActQuant,
    weight_qtensor,
)
from vqsuite.finetune.lsq import LSQActQuantizer, grad_scale, lsq_quantize
from vqsuite.finetune.ofq import LSQWeight, QATAttention, QATLinear, StatsQ
from vqsuite.formats import dequantize, get_format, pack_4bit, quantize, unpack_4bit
from vqsuite.formats.midrise import MIDRISE_BITS, midrise_format_name
from vqsuite.nn import QConv2d, QLinear
from vqsuite.pipelines.io import CheckpointError

timm = pytest.importorskip("timm")

#: frozen under the default dispatch (CPU int4pack/int8pack kernels round their input to bf16, and a rounded input
#: can flip a later 4-bit activation code) vs QAT eval logits; measured 24 dB (LSQ) and 53 dB (OFQ) on AVX2
AUTO_MIN_SQNR_DB = 15.0
#: share of inputs whose top-1 class agrees between QAT eval and the auto-kernel frozen model
AUTO_MIN_TOP1_AGREEMENT = 0.9
#: FP32 bytes / frozen bytes of the tiny 4-bit ViT (weights 4-bit packed, edges 8-bit, act steps and norms float)
MIN_BYTES_RATIO_W4 = 4.0


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=2, num_classes=10)  # fmt: skip


def _sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    err = (ref - x).double().pow(2).sum()
    return math.inf if err == 0 else 10 * math.log10(float(ref.double().pow(2).sum() / err))


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("bits", MIDRISE_BITS, ids=lambda b: f"int{b}_midrise")
def test_midrise_every_code_round_trips_and_packs(bits: int) -> None:
    fmt = get_format(midrise_format_name(bits))
    assert (fmt.qmin, fmt.qmax, fmt.offset, fmt.kind) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 0.5, "int")
    assert fmt.storage_bits == (4 if bits <= 4 else 8)
    codes = torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.int8).repeat(2, 1)  # both extremes in every row
    step = torch.tensor([[0.25], [3.0]])
    x = (codes.float() + 0.5) * step
    qt = quantize(x, fmt.name)
    assert torch.equal(qt.codes, codes) and torch.equal(qt.scales, step)  # per channel: [N, 1]
    assert torch.equal(dequantize(qt), x)
    if fmt.storage_bits == 4:
        assert torch.equal(unpack_4bit(pack_4bit(codes), signed=True), codes)


def test_midrise_rtn_error_is_at_most_half_a_step_and_zero_groups_stay_zero() -> None:
    x = torch.randn(8, 64)
    x[3] = 0
    qt = quantize(x, "int3_midrise", group_size=16)
    err = (dequantize(qt) - x).abs().reshape(8, 4, 16)
    assert bool((err <= qt.scales.unsqueeze(-1) / 2 * (1 + 1e-6)).all())
    assert torch.equal(dequantize(qt)[3], torch.zeros(64))


def test_midrise_is_a_weight_format_the_int_kernels_decline() -> None:
    from vqsuite.kernels.cpu.qlinear import plan_for

    with pytest.raises(ConfigError, match="mid-rise"):
        QuantSpec(weight="int8", act="int4_midrise", act_mode="static")
    layer = QLinear.from_float(nn.Linear(64, 32), QuantSpec(weight="int4_midrise")).freeze()
    assert isinstance(plan_for(layer.qlinear_operands()), str)
    assert layer.qweight.dtype == torch.uint8 and tuple(layer.qweight.shape) == (32, 32)  # two codes per byte


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 8))
def test_statsq_weights_map_onto_midrise_bit_exactly(bits: int) -> None:
    w = torch.randn(48, 40) * 0.02
    w[0, :3] = torch.tensor([1.0, -1.0, 0.0])  # clamped outliers
    qt = weight_qtensor(w, StatsQ(bits, tuple(w.shape)), "w")
    assert qt.fmt == midrise_format_name(bits)
    with torch.no_grad():
        assert torch.equal(dequantize(qt), statsq_quantize(w, bits))


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 7, 8))
def test_lsq_weights_map_onto_int_formats_with_their_lowest_code(bits: int) -> None:
    w = torch.randn(16, 32)
    q = LSQWeight(bits, tuple(w.shape))
    q.init_from(w)
    w[1, 0] = -(2 ** (bits - 1)) * q.step[1] * 1.5  # clamps to LSQ's lowest level -2^(b-1)
    qt = weight_qtensor(w, q, "w")
    fmt = get_format(qt.fmt)
    assert fmt.qmin <= -(2 ** (bits - 1)) and fmt.qmax >= 2 ** (bits - 1) - 1 and not fmt.offset
    assert int(qt.codes[1, 0]) == -(2 ** (bits - 1))
    with torch.no_grad():
        assert torch.equal(dequantize(qt), q(w))
    layer = QLinear(32, 16, False, QuantSpec(weight=qt.fmt)).freeze(qt)  # stored and read back exactly
    assert torch.equal(layer.stored_qtensor().codes, qt.codes)


def test_lsq_forward_value_is_the_same_with_and_without_gradients() -> None:
    step = torch.rand(24) + 0.1
    assert torch.equal(grad_scale(step, 0.37), step)
    x = torch.randn(5, 7, 24) * 3
    plain = lsq_quantize(x, step, -8, 7, 0.01)
    graded = lsq_quantize(x.requires_grad_(), step.requires_grad_(), -8, 7, 0.01)
    assert torch.equal(plain, graded.detach())
    graded.sum().backward()
    assert step.grad is not None and x.grad is not None


# ------------------------------------------------------------------------------------------------ end to end
def _trained(method: str, bits: int = 4, qkr: bool | None = None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _vit()
    float_model = copy.deepcopy(model)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    ofq(model, bits, (x, y), steps=2, batch_size=8, method=method, qkr=qkr, log_every=0)
    return model, float_model


@pytest.mark.parametrize(
    ("method", "qkr"), [("ofq", True), ("lsq", False), ("lsq", True)], ids=["ofq", "lsq", "lsq-qkr"]
)
def test_frozen_vit_equals_qat_eval_and_round_trips(method: str, qkr: bool, tmp_path) -> None:  # noqa: ANN001
    qat, float_model = _trained(method, qkr=qkr)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = qat(x)
    frozen = freeze_qat(copy.deepcopy(qat), kernel="reference")
    auto = vqsuite.freeze(copy.deepcopy(qat))  # the library's freeze takes a QAT model too (kernel "auto")
    assert not any(isinstance(m, (QATLinear, QATAttention, LSQActQuantizer, StatsQ)) for m in frozen.modules())
    attn = frozen.blocks[0].attn
    assert isinstance(attn, FrozenQATAttention) and attn.qkr == qkr
    assert isinstance(frozen.blocks[0].mlp.fc1, ActQuantLinear) and isinstance(frozen.head.linear, QLinear)
    assert isinstance(frozen.patch_embed.proj, ActQuantConv2d) and isinstance(frozen.patch_embed.proj.conv, QConv2d)
    assert frozen.blocks[0].mlp.fc2.act_quant.qn == 0  # fc2's input quantizer stays unsigned
    body = frozen.blocks[1].mlp.fc1.linear.spec.weight
    assert body == ("int4_midrise" if method == "ofq" else "int4")
    assert frozen.head.linear.spec.weight == "int8" and frozen.patch_embed.proj.conv.spec.weight == "int8"
    with torch.no_grad():
        out = frozen(x)
        with vqsuite.kernels.prefer("auto"):  # the tests' reference pin (conftest) lifted: the default dispatch
            out_auto = auto(x)
    assert torch.equal(out, ref)
    assert _sqnr_db(ref, out_auto) >= AUTO_MIN_SQNR_DB
    assert float((ref.argmax(-1) == out_auto.argmax(-1)).float().mean()) >= AUTO_MIN_TOP1_AGREEMENT
    fp_bytes = vqsuite.module_nbytes(float_model)
    assert fp_bytes / vqsuite.module_nbytes(frozen) >= MIN_BYTES_RATIO_W4
    assert frozen.vqsuite_config.method == "qat"
    # a normal checkpoint folder; the float architecture gets the frozen structure back on load
    path = vqsuite.save_quantized(frozen, tmp_path / "q")
    loaded = vqsuite.load_quantized(path, model=copy.deepcopy(float_model).eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert loaded.state_dict().keys() == frozen.state_dict().keys()
    for k, v in frozen.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_into_a_model_that_does_not_fit_changes_nothing(tmp_path) -> None:  # noqa: ANN001
    qat, _ = _trained("ofq", bits=2)
    path = vqsuite.save_quantized(freeze_qat(qat), tmp_path / "q")
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                              depth=1, num_heads=2, num_classes=10)  # fmt: skip
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not exist"):
        vqsuite.load_quantized(path, model=other)
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_swin_window_attention_freezes_exactly() -> None:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                              window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2), num_classes=5)  # fmt: skip
    prepare_qat(model, 3, "ofq").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # LSQ steps initialise on the first batch
        ref = model(x)
        frozen = freeze_qat(model, kernel="reference")
        out = frozen(x)
    assert any(isinstance(m, FrozenQATWindowAttention) for m in frozen.modules())
    assert torch.equal(out, ref)


def test_lsq_act_quant_matches_the_qat_quantizer() -> None:
    q = LSQActQuantizer(4, 12, signed=False)
    x = torch.randn(3, 5, 12)
    q(x)
    with torch.no_grad():
        q.bias_pre.normal_()
        q.bias_post.normal_()
        assert torch.equal(LSQActQuant.from_qat(q)(x), q(x))
    assert LSQActQuant.from_qat(q).describe() == [4, False, 12, True]


def test_refusals() -> None:
    with pytest.raises(UserError, match="QAT model"):
        freeze_qat(_vit())
    with pytest.raises(ConfigError, match="qat"):
        vqsuite.quantize_model(_vit(), QuantConfig(method="qat"))
    model = prepare_qat(_vit(), 4, "lsq")  # never run: its LSQ steps are not learned
    with pytest.raises(UserError, match="never"):
        freeze_qat(model)


def test_an_old_ofq_output_folder_still_loads_and_freezes(tmp_path) -> None:  # noqa: ANN001
    """Folders of earlier ``vqsuite finetune --method ofq`` (QAT state dict + qat_config.json) keep loading."""
    import json

    from safetensors.torch import save_file

    from vqsuite.cli import finetune as ft_cli

    torch.manual_seed(0)
    qat = prepare_qat(timm.create_model("test_vit", pretrained=False), 4, "ofq").eval()
    x = torch.randn(2, 3, *qat.patch_embed.img_size)
    with torch.no_grad():
        ref = qat(x)  # initialises the LSQ steps
    state = {k: v.contiguous() for k, v in qat.state_dict().items() if ".tracker." not in k}
    save_file(state, str(tmp_path / ft_cli.QAT_WEIGHTS))
    cfg = {"format": ft_cli.QAT_FORMAT, "version": ft_cli.QAT_FORMAT_VERSION, "bits": 4, "method": "ofq", "qkr": True,
           "source": {"library": "timm", "name": "test_vit"}}  # fmt: skip
    (tmp_path / ft_cli.QAT_CONFIG).write_text(json.dumps(cfg))
    loaded = ft_cli.load_finetuned(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
        assert torch.equal(freeze_qat(loaded, kernel="reference")(x), ref)
