"""LoRA adapters on quantized pipelines (:mod:`vqsuite.pipelines.lora`): the concatenated SVDQuant branch against
a separate float LoRA forward, the CPU kernel family against the reference on the longer branch, side branches on
QLinear and QConv2d, diffusers' PEFT and kohya formats through ``pipe.load_lora_weights``, strengths, disable,
unload, two adapters, the pipeline folder round trip and a LoRA for another architecture."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vqsuite.kernels as vk
from vqsuite.config import get_preset
from vqsuite.errors import UserError
from vqsuite.kernels.cpu import qlinear as cpu
from vqsuite.nn import QConv2d, QLinear, QLinearLowRank

peft = pytest.importorskip("peft")

from tiny_pipelines import generate, quantize, sd15  # noqa: E402

from vqsuite.pipelines.diffusers_io import (  # noqa: E402
    LORA_DIR,
    LORA_META_NAME,
    LORA_WEIGHTS_NAME,
    load_quantized_pipeline,
    save_quantized_pipeline,
)
from vqsuite.pipelines.lora import (  # noqa: E402
    LoraQConv,
    LoraQLinear,
    LoraQLinearLowRank,
    inject_lora,
    quantized_lora_dispatch,
)

#: a float32 LoRA forward, concatenated into the branch or run beside the layer, agrees to float32 rounding
#: (measured 130 dB on the svdquant layer, 2026-12-03); leaving out diag(λ) measured 7.6 dB, the scaling 5.3 dB
MIN_LORA_SQNR_DB = 60.0
#: Triton (interpreted) vs reference path on a frozen fp16 layer (the bar of tests/kernels/test_triton_mma8.py;
#: measured 68.7 dB with two adapters concatenated, 2026-12-03)
MIN_TRITON_VS_REF_SQNR_DB = 40.0
#: CPU kernel family vs reference on an svdquant-int4 layer with two adapters concatenated (the act-quant bar of
#: tests/kernels/test_cpu_qlinear.py: an activation near a rounding boundary may take the neighbouring code;
#: measured 70.7 dB, 2026-12-03)
MIN_CPU_VS_REF_SQNR_DB = 38.0

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    err = (y.double() - ref).pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(ref.pow(2).sum() / err))


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _with_lora(layer: nn.Module, adapters: dict[str, tuple[int, float]], seed: int = 0) -> _Holder:
    """``layer`` in a holder with peft adapters ``name -> (rank, alpha)`` of random A, B (peft's own injection)."""
    model = _Holder(layer)
    g = torch.Generator().manual_seed(seed)
    with quantized_lora_dispatch():
        for name, (r, alpha) in adapters.items():
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"])
            peft.inject_adapter_in_model(cfg, model, adapter_name=name)
    with torch.no_grad():
        for name in adapters:
            for ab in (model.proj.lora_A[name], model.proj.lora_B[name]):
                ab.weight.copy_(torch.randn(ab.weight.shape, generator=g) * 0.2)
    model.proj.set_adapter(list(adapters))
    return model


def _side(layer: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Separate float LoRA forward: ``Q(x) + Σ s_i · B_i(A_i(x))``."""
    y = layer.get_base_layer()(x)
    for n in names:
        y = y + layer.lora_B[n](layer.lora_A[n](x)) * layer.scaling[n]
    return y


def _svdquant_layer(frozen: bool) -> QLinearLowRank:
    torch.manual_seed(0)
    spec = get_preset("svdquant-int4").default.replace(rank=8)
    q = QLinearLowRank.from_float(nn.Linear(256, 96), spec, smooth=torch.rand(256) + 0.5)
    return q.freeze() if frozen else q


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "fake-quant"])
def test_concatenated_branch_equals_separate_lora(frozen: bool) -> None:
    q = _svdquant_layer(frozen)
    model = _with_lora(q, {"a": (4, 8), "b": (6, 3)})
    layer = model.proj
    assert isinstance(layer, LoraQLinearLowRank)
    x = torch.randn(7, 256)
    with torch.no_grad():
        for names in (["a"], ["a", "b"]):
            layer.set_adapter(names)
            down, up = layer.concatenated_branch(names)
            assert down.shape == (256, 8 + sum(layer.r[n] for n in names)) and up.shape == (96, down.shape[1])
            assert sqnr_db(model(x), _side(layer, x, names)) >= MIN_LORA_SQNR_DB
        assert q.lowrank_branch()[0] is q.proj_down  # the override lives only inside the forward


def test_frozen_concatenated_branch_same_kernel_cpu_matches_reference() -> None:
    q = _svdquant_layer(True)
    x = torch.randn(64, 256)
    with torch.no_grad():
        plain_impl, _ = vk.select("qlinear", "auto", q.kernel_key, x=x, ops=q.qlinear_operands())
        model = _with_lora(q, {"a": (4, 8), "b": (8, 16)})
        q.set_branch_override(model.proj.concatenated_branch(["a", "b"]))
        try:
            ops = q.qlinear_operands()
            assert ops.rank == 8 + 4 + 8
            lora_impl, _ = vk.select("qlinear", "auto", q.kernel_key, x=x, ops=ops)
        finally:
            q.set_branch_override(None)
        assert lora_impl == plain_impl  # the longer branch runs in the same kernel
        saved = dict(cpu.MAX_M)
        cpu.MAX_M.clear()  # no M gate: hold the CPU family to the reference at this M
        try:
            y = model(x)
            assert q.__dict__["_kernel_call"][1].name == plain_impl
            with vk.prefer("reference"):
                y_ref = model(x)
        finally:
            cpu.MAX_M.update(saved)
        assert sqnr_db(y, y_ref) >= MIN_CPU_VS_REF_SQNR_DB
        assert sqnr_db(y_ref, _side(model.proj, x, ["a", "b"])) >= MIN_LORA_SQNR_DB


def test_triton_runs_the_concatenated_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the dispatcher offers Triton for CPU tensors only then
    torch.manual_seed(0)
    spec = get_preset("svdquant-int4").default
    q = QLinearLowRank.from_float(nn.Linear(128, 48).half(), spec, smooth=(torch.rand(128) + 0.5).half()).freeze()
    model = _with_lora(q, {"a": (4, 8), "b": (8, 16)})
    x = torch.randn(21, 128).half()
    with torch.no_grad():
        with vk.prefer("triton"):
            y = model(x)
            assert q.__dict__["_kernel_call"][1].name == "triton.mma8"
        with vk.prefer("reference"):
            y_ref = model(x)
    assert sqnr_db(y, y_ref) >= MIN_TRITON_VS_REF_SQNR_DB


def test_side_branches_on_qlinear_and_qconv() -> None:
    torch.manual_seed(1)
    ql = QLinear.from_float(nn.Linear(128, 64), get_preset("w8a8").default).freeze()
    lin = _with_lora(ql, {"a": (4, 8)})
    assert isinstance(lin.proj, LoraQLinear) and not isinstance(lin.proj, LoraQLinearLowRank)
    x = torch.randn(5, 128)
    qc = QConv2d.from_float(nn.Conv2d(64, 32, 3, padding=1), get_preset("w8a8").default).freeze()
    conv = _with_lora(qc, {"c": (4, 2)})
    assert isinstance(conv.proj, LoraQConv)
    xc = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert sqnr_db(lin(x), _side(lin.proj, x, ["a"])) >= MIN_LORA_SQNR_DB
        a, b = conv.proj.lora_A["c"].weight, conv.proj.lora_B["c"].weight  # [r, C, 3, 3], [C_out, r, 1, 1]
        want = qc(xc) + F.conv2d(F.conv2d(xc, a, padding=1), b) * (2 / 4)
        assert sqnr_db(conv(xc), want) >= MIN_LORA_SQNR_DB
    with pytest.raises(UserError, match="fuse a LoRA"):
        conv.proj.merge()


# --------------------------------------------------------------------------- a quantized SD pipeline
@pytest.fixture(scope="module")
def qpipe():
    pipe = quantize("sd15", "svdquant-int4", num_calib_prompts=1, num_inference_steps=1, calib_batch_size=1)
    return pipe, generate(pipe, "sd15")


def _peft_lora(unet: nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers PEFT-format LoRA (``unet.{module}.lora_A.weight``) on every quantized attention projection."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in unet.named_modules():
        n = n.removesuffix(".base_layer")  # a layer that already carries an adapter
        if isinstance(m, QLinearLowRank) and ".attn" in n:
            sd[f"unet.{n}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            sd[f"unet.{n}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return sd


def _kohya_lora(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (``lora_unet_*.lora_down/lora_up/alpha``) on a resnet conv and an attention projection."""
    g = torch.Generator().manual_seed(7)
    c, q = unet.get_submodule(CONV), unet.get_submodule(ATTN)
    sd = {}
    for name, down, up in (
        (CONV, (4, c.in_channels, 3, 3), (c.out_channels, 4, 1, 1)),
        (ATTN, (4, q.in_features), (q.out_features, 4)),
    ):
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    return sd


def _scalings(unet: nn.Module) -> dict[str, dict[str, float]]:
    return {n: dict(m.scaling) for n, m in unet.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_pipeline_lora_strength_disable_unload_two_adapters_save_load(qpipe, tmp_path) -> None:
    pipe, base = qpipe
    try:
        pipe.load_lora_weights(_peft_lora(pipe.unet, 4, seed=1), adapter_name="a")
        assert isinstance(pipe.unet.get_submodule(ATTN), LoraQLinearLowRank)
        img_a = generate(pipe, "sd15")
        assert (img_a - base).abs().max() > 1e-3  # the adapter changes the images
        pipe.set_adapters(["a"], [0.0])
        assert torch.equal(generate(pipe, "sd15"), base)  # strength 0: exactly the quantized pipeline
        pipe.set_adapters(["a"], [1.0])
        assert torch.equal(generate(pipe, "sd15"), img_a)
        pipe.disable_lora()
        assert torch.equal(generate(pipe, "sd15"), base)
        pipe.enable_lora()

        pipe.load_lora_weights(_peft_lora(pipe.unet, 8, seed=2), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.5, 1.0])
        layer = pipe.unet.get_submodule(ATTN)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            assert layer.concatenated_branch(["a", "b"])[0].shape[1] == layer.get_base_layer().rank + 4 + 8
            assert sqnr_db(layer(x), _side(layer, x, ["a", "b"])) >= MIN_LORA_SQNR_DB
        img_ab = generate(pipe, "sd15")
        assert (img_ab - img_a).abs().max() > 1e-3

        save_quantized_pipeline(pipe, tmp_path / "p")
        from safetensors import safe_open

        with safe_open(str(tmp_path / "p" / "unet" / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "lora" in k]  # the quantized weights are written without adapters
        with safe_open(str(tmp_path / "p" / LORA_DIR / LORA_WEIGHTS_NAME), "pt") as f:
            keys = set(f.keys())
        assert f"a/unet.{ATTN}.lora_A.weight" in keys and f"b/unet.{ATTN}.lora_B.weight" in keys
        meta = json.loads((tmp_path / "p" / LORA_DIR / LORA_META_NAME).read_text())
        assert meta["components"]["unet"]["scaling"][ATTN] == {"a": 0.5, "b": 1.0}
        assert isinstance(pipe.unet.get_submodule(ATTN), LoraQLinearLowRank)  # saving put the adapters back

        loaded = load_quantized_pipeline(tmp_path / "p")
        assert sorted(loaded.get_active_adapters()) == ["a", "b"]
        assert torch.equal(generate(loaded, "sd15"), img_ab)
        assert torch.equal(generate(pipe, "sd15"), img_ab)

        pipe.delete_adapters(["b"])
        pipe.set_adapters(["a"], [1.0])  # "a" kept its strength 0.5 until now
        assert torch.equal(generate(pipe, "sd15"), img_a)
    finally:
        pipe.unload_lora_weights()
    assert isinstance(pipe.unet.get_submodule(ATTN), QLinearLowRank)
    assert torch.equal(generate(pipe, "sd15"), base)  # unloaded: bit-exactly the quantized pipeline


def test_pipeline_kohya_conv_lora_reads_like_float(qpipe) -> None:
    pipe, base = qpipe
    float_pipe = sd15(64)
    sd = _kohya_lora(pipe.unet)
    try:
        pipe.load_lora_weights(dict(sd), adapter_name="k")
        float_pipe.load_lora_weights(dict(sd), adapter_name="k")
        conv = pipe.unet.get_submodule(CONV)
        assert isinstance(conv, LoraQConv) and isinstance(pipe.unet.get_submodule(ATTN), LoraQLinearLowRank)
        assert _scalings(pipe.unet) == _scalings(float_pipe.unet)  # diffusers' conversion, alphas included
        down = sd[f"lora_unet_{CONV.replace('.', '_')}.lora_down.weight"]
        up = sd[f"lora_unet_{CONV.replace('.', '_')}.lora_up.weight"]
        x = torch.randn(1, conv.in_features, 8, 8)
        with torch.no_grad():
            want = conv.get_base_layer()(x) + F.conv2d(F.conv2d(x, down, padding=1), up) * conv.scaling["k"]
            assert sqnr_db(conv(x), want) >= MIN_LORA_SQNR_DB
        assert (generate(pipe, "sd15") - base).abs().max() > 1e-4
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, "sd15"), base)


def test_lora_for_a_missing_layer_is_refused_by_name(qpipe) -> None:
    pipe, base = qpipe
    sd = _peft_lora(pipe.unet, 4, seed=3)
    sd["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 64)
    sd["unet.down_blocks.7.attentions.0.proj_in.lora_B.weight"] = torch.zeros(64, 4)
    with pytest.raises(UserError, match=r"down_blocks\.7\.attentions\.0\.proj_in"):
        pipe.load_lora_weights(sd, adapter_name="bad")
    assert not getattr(pipe.unet, "peft_config", {})
    assert torch.equal(generate(pipe, "sd15"), base)


def test_flux_lora_on_quantized_linears() -> None:
    """FLUX's loader (which widens Control LoRAs from the base weights) on a w8a8 transformer: side branches."""
    pipe = quantize("flux", "w8a8", num_calib_prompts=1, num_inference_steps=1, calib_batch_size=1)
    base = generate(pipe, "flux")
    g = torch.Generator().manual_seed(4)
    sd = {}
    for n, m in pipe.transformer.named_modules():
        if isinstance(m, QLinear) and ".attn." in n:
            sd[f"transformer.{n}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.1
            sd[f"transformer.{n}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.1
    pipe.load_lora_weights(sd, adapter_name="f")
    wrapped = [m for m in pipe.transformer.modules() if isinstance(m, LoraQLinear)]
    assert len(wrapped) == len(sd) // 2
    assert (generate(pipe, "flux") - base).abs().max() > 1e-4
    name = next(k for k in sd if k.endswith("lora_A.weight"))
    sd[name] = torch.zeros(4, sd[name].shape[1] + 8)  # a Control-LoRA widening of a quantized layer's input
    with pytest.raises(UserError, match="widening"):
        pipe.load_lora_weights(sd, adapter_name="wide")
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, "flux"), base)


def test_pixart_lora_without_a_diffusers_loader_round_trips(tmp_path) -> None:
    """PixArt has no LoRA loader in diffusers: :func:`inject_lora` (diffusers' config inference, peft's injection)
    on the quantized transformer; strength through diffusers' own helper; the pipeline folder keeps it."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    pipe = quantize("pixart", "svdquant-int4", num_calib_prompts=1, num_inference_steps=1, calib_batch_size=1)
    base = generate(pipe, "pixart")
    g = torch.Generator().manual_seed(5)
    sd = {}
    for n, m in pipe.transformer.named_modules():
        if isinstance(m, QLinearLowRank) and ".attn" in n:
            sd[f"{n}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.2
            sd[f"{n}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.2
    inject_lora(pipe.transformer, sd, "p")
    wrapped = [m for m in pipe.transformer.modules() if isinstance(m, LoraQLinearLowRank)]
    assert len(wrapped) == len(sd) // 2 and all(m.scaling["p"] == 1.0 for m in wrapped)  # lora_alpha = r
    set_weights_and_activate_adapters(pipe.transformer, ["p"], [0.5])
    img = generate(pipe, "pixart")
    assert (img - base).abs().max() > 1e-4
    save_quantized_pipeline(pipe, tmp_path / "p")
    loaded = load_quantized_pipeline(tmp_path / "p")
    assert torch.equal(generate(loaded, "pixart"), img)
    with pytest.raises(UserError, match="not a module"):
        inject_lora(
            pipe.transformer,
            {"nowhere.lora_A.weight": torch.zeros(4, 8), "nowhere.lora_B.weight": torch.zeros(8, 4)},
            "x",
        )
