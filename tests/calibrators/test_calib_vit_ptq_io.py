"""Save/load of ViT PTQ models (``method="vit-ptq"``): the shipped ``fmnist-vit`` quantized with the PTQ presets
(twin-uniform / log√2 softmax quantizers, twin-uniform GELU, RepQ LayerNorm folding) round-trips through
``save_quantized`` / ``load_quantized`` with bit-identical logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

from vqsuite import load_quantized, quantize_model, save_quantized  # noqa: E402
from vqsuite.calibrators.vit_ptq import (  # noqa: E402
    ActQuantizer,
    LogSqrt2Quantizer,
    PTQAttention,
    QuantAfter,
    TwinUniformGeluQuantizer,
    TwinUniformSoftmaxQuantizer,
    restore_vit_ptq,
)
from vqsuite.pipelines.io import CheckpointError  # noqa: E402

ZOO_SOURCE = {"library": "vqsuite.zoo", "name": "fmnist-vit"}
N_CALIB, N_EVAL = 16, 32


def _fp():
    from vqsuite import zoo

    return zoo.load("fmnist-vit").model.eval()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    from vqsuite.zoo.datasets import fashion_mnist
    from vqsuite.zoo.vit import vit_preprocess

    x, _ = fashion_mnist("test")
    return vit_preprocess(x[:N_CALIB]), vit_preprocess(x[N_CALIB : N_CALIB + N_EVAL])


def _quantized(preset: str, calib: torch.Tensor, freeze: bool = True):
    return quantize_model(_fp(), preset, calib_data=[calib], freeze=freeze)


def _quantizer_state(model) -> dict[str, tuple]:
    return {
        name: (type(q).__name__, q.bits, q.mode, {k: v.clone() for k, v in q.state_dict().items()})
        for name, q in model.named_modules()
        if isinstance(q, ActQuantizer)
    }


def _assert_same_quantizers(a, b) -> None:
    sa, sb = _quantizer_state(a), _quantizer_state(b)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        ta, tb = sa[name], sb[name]
        assert ta[:3] == tb[:3], name
        assert ta[3].keys() == tb[3].keys() and all(torch.equal(ta[3][k], tb[3][k]) for k in ta[3]), name


@pytest.mark.parametrize(
    "preset, freeze",
    [
        ("vit-w4a4-ptq", True),  # RepQ LN folding + log√2 softmax + twin-uniform GELU
        ("vit-w4a4-ptq4vit", True),  # twin-uniform softmax and GELU, no folding
        ("vit-w4a4-minmax", True),
        ("vit-w3a3-repq", True),
        ("vit-w6a6-ptq", False),  # fake-quant layers (as the benchmark evaluates them)
    ],
    ids=["w4a4-ptq", "w4a4-ptq4vit", "w4a4-minmax", "w3a3-repq", "w6a6-ptq-fakequant"],
)
def test_round_trip_logits_bit_identical(preset: str, freeze: bool, data, tmp_path: Path) -> None:
    calib, x = data
    model = _quantized(preset, calib, freeze)
    with torch.no_grad():
        ref = model(x)
    save_quantized(model, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", model=_fp())
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, ref), f"max |diff| {float((got - ref).abs().max()):.3g}"
    _assert_same_quantizers(model, loaded)
    assert loaded.vqsuite_config == model.vqsuite_config
    # the loaded model still differs from the float one (the quantizers really run)
    with torch.no_grad():
        assert not torch.equal(got, _fp()(x))


def test_quantizer_kinds_survive(data, tmp_path: Path) -> None:
    calib, _ = data
    model = _quantized("vit-w4a4-ptq", calib)
    save_quantized(model, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", model=_fp())
    blk = loaded.blocks[0]
    assert isinstance(blk.attn, PTQAttention) and isinstance(blk.attn.softmax_quant, LogSqrt2Quantizer)
    assert isinstance(blk.norm1, QuantAfter) and isinstance(blk.mlp.act.quant, TwinUniformGeluQuantizer)
    assert blk.attn.softmax_quant.mode == "quant" and blk.attn.softmax_quant.bits == 4
    model2 = _quantized("vit-w4a4-ptq4vit", calib)
    save_quantized(model2, tmp_path / "ck2")
    assert isinstance(load_quantized(tmp_path / "ck2", model=_fp()).blocks[0].attn.softmax_quant,
                      TwinUniformSoftmaxQuantizer)  # fmt: skip


def test_load_without_a_model_from_the_recorded_zoo_source(data, tmp_path: Path) -> None:
    calib, x = data
    model = _quantized("vit-w4a4-ptq", calib)
    with torch.no_grad():
        ref = model(x)
    save_quantized(model, tmp_path / "ck", model_source=ZOO_SOURCE)
    loaded = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_quantizer_mode_is_saved(data, tmp_path: Path) -> None:
    """A quantizer switched off (an ablation) stays off after loading: the mode is module state, not assumed."""
    calib, x = data
    model = _quantized("vit-w4a4-ptq", calib)
    model.blocks[2].attn.softmax_quant.mode = "off"
    with torch.no_grad():
        ref = model(x)
    save_quantized(model, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", model=_fp())
    assert loaded.blocks[2].attn.softmax_quant.mode == "off" and loaded.blocks[1].attn.softmax_quant.mode == "quant"
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_failed_load_leaves_the_float_model_unchanged(data, tmp_path: Path) -> None:
    from vqsuite.zoo.vit import build_fmnist_vit

    calib, _ = data
    save_quantized(_quantized("vit-w4a4-ptq", calib), tmp_path / "ck")
    other = build_fmnist_vit(embed_dim=48, depth=6, num_heads=3).eval()  # same blocks, other widths
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape"):
        load_quantized(tmp_path / "ck", model=other)
    assert not any(isinstance(m, (ActQuantizer, PTQAttention, QuantAfter)) for m in other.modules())
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_restore_refuses_a_model_without_vit_blocks() -> None:
    with pytest.raises(ValueError, match="no timm ViT block"):
        restore_vit_ptq(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"act_bits": 4})


def test_restore_is_a_no_op_on_an_already_wrapped_model(data) -> None:
    calib, _ = data
    model = _quantized("vit-w4a4-ptq", calib)
    modules = list(model.modules())
    undo = restore_vit_ptq(model, dict(model.vqsuite_config.options))
    assert list(model.modules()) == modules, "an already wrapped block was wrapped again"
    undo()
    assert list(model.modules()) == modules
