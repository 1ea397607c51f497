"""quantize_pipeline on tiny SD1.5, SDXL, FLUX, PixArt, SD3, DDPM and DiT pipelines: generation still works,
the architecture rules put the right layers in 16 bit / W4A16, memory drops, calibration really runs the pipeline,
unknown denoisers fall back to the generic rule, text encoders are quantized only when asked."""

from __future__ import annotations

import json
import logging
import time

import pytest
import tiny_pipelines as tp
import torch

import vqsuite
from vqsuite.config import QuantConfig, get_preset
from vqsuite.nn import QLinear, QLinearLowRank, QuantLayer
from vqsuite.pipelines.diffusers import default_calib_prompts, quantize_pipeline
from vqsuite.pipelines.rules import ARCH_RULES, denoiser_config, quantized_structure, rule_for

ARCHS = ["sd15", "sdxl", "flux", "pixart", "sd3", "ddpm", "dit"]
#: denoiser weight memory must drop at least this much (bf16 -> 4-bit) on the DiT-family size configs
MIN_RATIO_4BIT = 3.0
#: ... and on the real FLUX.1 config with SVDQuant's rank-32 branch (measured 3.58x; the paper reports 3.6x)
MIN_RATIO_FLUX1_SVDQUANT = 3.5
#: wall time for quantizing a tiny pipeline with the full SVDQuant preset, calibration included
MAX_CALIBRATION_SECONDS = 60.0

#: (pipeline, module name, role the report must show) for the adaLN modulation linears kept W4A16
ADALN = {
    "flux": ["transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear"],
    "sd3": ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear"],
    "dit": ["transformer_blocks.0.norm1.linear"],
}
#: layers each rule keeps 16-bit (embedders, first/last layers, ...)
KEPT = {
    "flux": ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1", "proj_out"],
    "sd3": ["pos_embed.proj", "context_embedder", "time_text_embed.text_embedder.linear_1", "proj_out"],
    "pixart": [
        "pos_embed.proj",
        "adaln_single.linear",
        "caption_projection.linear_1",
        "proj_out",
        "transformer_blocks.0.attn2.to_k",
        "transformer_blocks.0.attn2.to_v",
    ],
    "dit": ["pos_embed.proj", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "proj_out_2"],
    "sd15": ["conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.attentions.0.proj_in"],
    "sdxl": ["conv_in", "conv_out", "add_embedding.linear_1", "up_blocks.0.attentions.0.proj_out"],
    "ddpm": ["conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.downsamplers.0.conv"],
}


def _denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


@pytest.mark.parametrize("preset", ["svdquant-int4", "nvfp4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_then_generate(arch: str, preset: str) -> None:
    pipe, images = tp.quantized(arch, preset)
    assert torch.isfinite(images).all(), f"{arch}/{preset}: non-finite pixels"
    assert images.shape[0] == 1 and images.shape[-1] == 3
    den = _denoiser(pipe)
    layers = [m for m in den.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.frozen for m in layers)
    rep = pipe.vqsuite_report
    assert set(rep.components) == {"transformer" if hasattr(pipe, "transformer") else "unet"}
    comp = next(iter(rep.components.values()))
    assert comp.bytes_after < comp.bytes_before
    if preset.startswith("svdquant"):
        assert any(isinstance(m, QLinearLowRank) and m.rank == 32 for m in layers), "no rank-32 branch"
        assert comp.calibration["ran"] and comp.calibration["samples"] == 2 and comp.calibration["steps"] == 2
    else:
        assert not comp.calibration["ran"], "an RTN preset needs no calibration run"


@pytest.mark.parametrize("arch", ARCHS)
def test_report_rule_roles(arch: str) -> None:
    pipe, _ = tp.quantized(arch, "svdquant-int4")
    rep = pipe.vqsuite_report
    for name in KEPT[arch]:
        row = rep.row(name)
        assert row.status == "kept" and row.reason.startswith("16-bit:"), f"{arch}: {name}: {row}"
    for name in ADALN.get(arch, []):
        row = rep.row(name)
        assert (row.status, row.format, row.weight, row.act, row.rank) == (
            "quantized",
            "W4A16",
            "int4/g64",
            "16-bit",
            0,
        )
        assert "adaLN" in row.reason
    # the bulk of the work is W4A4 with the low-rank branch
    w4a4 = [r for r in rep.rows if r.format == "W4A4" and r.act == "int4/g64" and r.rank == 32]
    assert len(w4a4) >= 4, f"{arch}: only {len(w4a4)} W4A4 r32 layers"
    if arch in ("sd15", "sdxl", "ddpm"):  # ResBlock convs: W4A4 with a conv low-rank branch (conv_lowrank)
        conv = rep.row("down_blocks.1.resnets.0.conv1")
        assert (conv.status, conv.act) == ("quantized", "int4/g64") and conv.rank > 0, conv
        assert f"conv low-rank rank {conv.rank}" in conv.reason, conv
    text = str(rep)
    assert "bits/w" in text and "MiB" in text and KEPT[arch][0] in text
    json.dumps(rep.to_dict())


def test_pixart_text_stream_projections_stay_16bit() -> None:
    pipe, _ = tp.quantized("pixart", "nvfp4")
    attn2 = pipe.transformer.transformer_blocks[0].attn2
    assert type(attn2.to_k) is torch.nn.Linear and type(attn2.to_v) is torch.nn.Linear
    assert isinstance(attn2.to_q, QuantLayer) and isinstance(attn2.to_out[0], QuantLayer)


def test_nvfp4_adaln_is_weight_only() -> None:
    pipe, _ = tp.quantized("flux", "nvfp4")
    row = pipe.vqsuite_report.row("transformer_blocks.0.norm1.linear")
    assert (row.weight, row.act, row.rank) == ("nvfp4/g16", "16-bit", 0), row
    q = pipe.transformer.transformer_blocks[0].norm1.linear
    assert type(q) is QLinear and q.spec.act is None


def test_every_rule_is_registered() -> None:
    for name in [
        "UNet2DConditionModel",
        "UNet2DModel",
        "FluxTransformer2DModel",
        "PixArtTransformer2DModel",
        "SD3Transformer2DModel",
        "DiTTransformer2DModel",
    ]:
        assert name in ARCH_RULES


@pytest.mark.parametrize("preset", ["w4a4", "nvfp4"])
@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_denoiser_weights_shrink_3x(arch: str, preset: str) -> None:
    """bf16 denoisers with 256-wide layers (K = N >= 256: the scales and 16-bit layers are a small share)."""
    model = (
        tp.flux_transformer(256, num_layers=2, num_single_layers=2)
        if arch == "flux"
        else tp.sd3(256, num_layers=4).transformer
    )
    model = model.to(torch.bfloat16)
    before = vqsuite.module_nbytes(model)
    vqsuite.quantize_model(model, denoiser_config(model, preset))
    after = vqsuite.module_nbytes(model)
    assert before / after >= MIN_RATIO_4BIT, f"{arch}/{preset}: {before} -> {after} bytes = {before / after:.2f}x"


@pytest.mark.parametrize("preset,minimum", [("svdquant-int4", MIN_RATIO_FLUX1_SVDQUANT), ("nvfp4", 3.4)])
def test_flux1_sized_structure_ratio(preset: str, minimum: float) -> None:
    """The real FLUX.1 config (11.9B parameters) on the meta device: bf16 bytes vs the frozen quantized layout."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    model = model.to(torch.bfloat16)
    before = vqsuite.module_nbytes(model)
    swapped = quantized_structure(model, preset)
    after = vqsuite.module_nbytes(model)
    assert len(swapped) == 19 * 14 + 38 * 6, len(swapped)
    assert before / after >= minimum, f"FLUX.1 {preset}: {before / 2**30:.2f} -> {after / 2**30:.2f} GiB"
    # q/k/v share one proj_down, as after calibration
    attn = model.transformer_blocks[0].attn
    if preset.startswith("svdquant"):
        assert attn.to_q.proj_down is attn.to_k.proj_down is attn.to_v.proj_down


def test_unknown_denoiser_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    pipe = tp.custom_ddpm()
    with caplog.at_level(logging.WARNING, logger="vqsuite.pipelines.diffusers"):
        quantize_pipeline(pipe, "w4a4")
    assert any("generic rule" in r.getMessage() and "TinyDenoiser" in r.getMessage() for r in caplog.records)
    rep = pipe.vqsuite_report
    assert rep.components["unet"].rule == "generic (fallback)"
    assert rep.row("conv_in").status == "kept" and rep.row("conv_out").status == "kept"
    assert rep.row("mix").status == "quantized" and rep.row("mix").rank == 0  # 1x1 conv
    assert rep.row("fc1").status == "quantized" and rep.row("fc2").status == "quantized"
    images = tp.generate(pipe, "ddpm")
    assert torch.isfinite(images).all()
    assert rule_for(pipe.unet)[1] is True


def test_text_encoder_weight_only_when_asked() -> None:
    pipe = tp.quantize("flux", "w4a4", components=["text_encoder_2"])
    rep = pipe.vqsuite_report
    assert set(rep.components) == {"transformer", "text_encoder_2"}
    t5 = [r for r in rep.rows if r.component == "text_encoder_2" and r.status == "quantized"]
    assert t5 and all(
        r.act == "16-bit" and r.weight in ("int4/g64", "int4/g32", "int4/g16") and r.rank == 0 for r in t5
    )
    fallback = [r for r in t5 if r.weight != "int4/g64"]  # tiny widths: layers whose K 64 does not divide
    assert all("group fallback" in r.reason for r in fallback), fallback
    assert not any(isinstance(m, QuantLayer) for m in pipe.text_encoder.modules())  # not asked: left alone
    assert torch.isfinite(tp.generate(pipe, "flux")).all()


def test_component_dict_config() -> None:
    pipe = tp.quantize("flux", "nvfp4", components={"text_encoder_2": "w8a16"})
    rows = [r for r in pipe.vqsuite_report.rows if r.component == "text_encoder_2" and r.status == "quantized"]
    assert rows and all(r.weight == "int8/ch" and r.act == "16-bit" for r in rows)
    with pytest.raises(ValueError, match="not a module"):
        tp.quantize("flux", "nvfp4", components=["tokenizer"])


def test_user_override_beats_rule() -> None:
    base = get_preset("w4a4")
    cfg = QuantConfig(default=base.default, overrides=(("transformer_blocks.*.attn.to_q", None),), name="mine")
    pipe = tp.quantize("flux", "w4a4", config=cfg)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_k, QuantLayer)
    assert pipe.transformer.vqsuite_config.name == "mine"


@pytest.mark.parametrize("arch", ["ddpm", "dit"])
def test_calibration_without_prompts(arch: str) -> None:
    """Unconditional and class-conditional pipelines calibrate on samples / class labels."""
    pipe, _ = tp.quantized(arch, "svdquant-int4")
    calib = next(iter(pipe.vqsuite_report.components.values())).calibration
    assert calib["ran"] and calib["kind"] == ("samples" if arch == "ddpm" else "class labels")


def test_calibration_runs_the_pipeline_over_prompts() -> None:
    pipe = tp.flux()
    calls = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    quantize_pipeline(
        pipe,
        tp.preset_config("svdquant-int4"),
        calib_prompts=["a cat", "a dog", "a red bird"],
        num_inference_steps=2,
        calib_batch_size=2,
        height=32,
        width=32,
    )
    # 2 pipeline calls (batches of 2 and 1 prompts) x 2 steps; FLUX runs no CFG batch
    assert calls == [2, 2, 1, 1], calls


def test_calibration_time_full_preset() -> None:
    """The full svdquant-int4 preset (39-point smoothing grid, up to 100 low-rank iterations) on a tiny pipeline."""
    pipe = tp.pixart(128, num_layers=1)
    t0 = time.perf_counter()
    tp.quantize("pixart", "svdquant-int4", pipe=pipe, config=get_preset("svdquant-int4"))
    seconds = time.perf_counter() - t0
    assert seconds < MAX_CALIBRATION_SECONDS, f"calibration took {seconds:.1f}s"
    assert torch.isfinite(tp.generate(pipe, "pixart")).all()


def test_default_prompts() -> None:
    prompts = default_calib_prompts()
    assert len(prompts) >= 32 and len(set(prompts)) == len(prompts)
    assert all(p and not p.startswith("#") for p in prompts)
