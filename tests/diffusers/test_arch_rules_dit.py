"""Architecture rules of the newer diffusers DiTs (vqsuite/pipelines/rules_dit.py) on tiny instances of each class:
the class gets its own rule (not the generic fallback), the layers the rule keeps stay float, the modulation
linears are weight-only, the attention/MLP linears are quantized with the recipe, and the quantized denoiser
still computes (finite at W4A4, close to float at W8A8)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from tiny_dits import PIPE_SIDE, TINY_DIT_PIPELINES, TINY_DITS, pipe_SanaTransformer2DModel
from torch import nn

import vqsuite
from vqsuite.config import resolve_config
from vqsuite.nn import QLinear, QLinearLowRank
from vqsuite.pipelines.rules import denoiser_config, layer_role, rule_for
from vqsuite.pipelines.rules_dit import DIT_RULES

#: share of the matrix weights the rule must leave quantized on the tiny models (their embedders are relatively
#: large; measured 2026-12-03 at w4a4: 0.50 Sana, 0.53 HunyuanDiT, 0.56 Wan/LTX, 0.85-0.91 the others)
MIN_QUANTIZED_FRACTION = 0.40
#: denoiser output SQNR at W8A8 against float (measured 2026-12-03: 37.4 dB HunyuanDiT, 45-73 dB the others)
MIN_W8A8_SQNR_DB = 30.0
#: SVDQuant calibration trimmed for speed (a 3-point smoothing grid, one low-rank pass): the rule is under test here,
#: not the search
FAST_SVDQUANT = (("num_grids", 2), ("lowrank_iters", 1))


@dataclass(frozen=True)
class Expect:
    """Layers (full names in the tiny model) the rule must keep float, make weight-only, and quantize."""

    keep: tuple[str, ...]
    weight_only: tuple[str, ...]
    quantized: tuple[str, ...]


EXPECT: dict[str, Expect] = {
    "SanaTransformer2DModel": Expect(
        keep=("patch_embed.proj", "time_embed.linear", "caption_projection.linear_1", "proj_out")
        + ("transformer_blocks.0.attn2.to_k", "transformer_blocks.1.ff.conv_depth"),
        weight_only=(),
        quantized=("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_q")
        + ("transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.ff.conv_inverted"),
    ),
    "Lumina2Transformer2DModel": Expect(
        keep=("x_embedder", "time_caption_embed.caption_embedder.1", "norm_out.linear_1", "norm_out.linear_2"),
        weight_only=("noise_refiner.0.norm1.linear", "layers.1.norm1.linear"),
        quantized=("layers.0.attn.to_k", "context_refiner.0.attn.to_q", "layers.1.feed_forward.linear_3"),
    ),
    "CogView4Transformer2DModel": Expect(
        keep=("patch_embed.proj", "patch_embed.text_proj", "time_condition_embed.condition_embedder.linear_1")
        + ("norm_out.linear", "proj_out"),
        weight_only=("transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear"),
        quantized=("transformer_blocks.0.attn1.to_v", "transformer_blocks.1.ff.net.0.proj"),
    ),
    "AuraFlowTransformer2DModel": Expect(
        keep=("pos_embed.proj", "context_embedder", "time_step_proj.linear_1", "norm_out.linear", "proj_out"),
        weight_only=("joint_transformer_blocks.0.norm1.linear", "joint_transformer_blocks.0.norm1_context.linear")
        + ("single_transformer_blocks.0.norm1.linear",),
        quantized=("joint_transformer_blocks.0.attn.add_q_proj", "joint_transformer_blocks.0.ff_context.linear_2")
        + ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.ff.out_projection"),
    ),
    "ChromaTransformer2DModel": Expect(
        keep=("x_embedder", "context_embedder", "distilled_guidance_layer.in_proj", "proj_out"),
        weight_only=(),
        quantized=("transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.net.2")
        + ("single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"),
    ),
    "QwenImageTransformer2DModel": Expect(
        keep=("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out"),
        weight_only=("transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1"),
        quantized=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out")
        + ("transformer_blocks.1.img_mlp.net.0.proj", "transformer_blocks.1.txt_mlp.net.2"),
    ),
    "WanTransformer3DModel": Expect(
        keep=("patch_embedding", "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1")
        + ("proj_out", "blocks.0.attn2.to_k", "blocks.1.attn2.to_v"),
        weight_only=(),
        quantized=("blocks.0.attn1.to_q", "blocks.0.attn2.to_q", "blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2"),
    ),
    "LTXVideoTransformer3DModel": Expect(
        keep=("proj_in", "time_embed.linear", "caption_projection.linear_2", "proj_out")
        + ("transformer_blocks.0.attn2.to_k", "transformer_blocks.1.attn2.to_v"),
        weight_only=(),
        quantized=("transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn2.to_out.0")
        + ("transformer_blocks.1.ff.net.0.proj",),
    ),
    "HunyuanDiT2DModel": Expect(
        keep=("pos_embed.proj", "text_embedder.linear_1", "time_extra_emb.pooler.q_proj", "norm_out.linear")
        + ("proj_out", "blocks.0.attn2.to_k"),
        weight_only=("blocks.0.norm1.linear", "blocks.3.norm1.linear"),
        quantized=("blocks.0.attn1.to_q", "blocks.1.attn2.to_q", "blocks.2.ff.net.2", "blocks.3.skip_linear"),
    ),
    "Flux2Transformer2DModel": Expect(
        keep=("x_embedder", "context_embedder", "time_guidance_embed.guidance_embedder.linear_1")
        + ("norm_out.linear", "proj_out"),
        weight_only=("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear")
        + ("single_stream_modulation.linear",),
        quantized=("transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.ff.linear_in")
        + ("single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"),
    ),
}

PRESETS = ("w4a4", "svdquant-int4")


def _config(model: nn.Module, preset: str) -> vqsuite.QuantConfig:
    cfg = resolve_config(preset)
    if cfg.method == "svdquant":
        cfg = replace(cfg, method_options=FAST_SVDQUANT)
    return denoiser_config(model, cfg)


def _forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _quantize(name: str, preset: str) -> tuple[nn.Module, dict, torch.Tensor]:
    model, inputs = TINY_DITS[name]()
    model.eval()
    ref = _forward(model, inputs)
    vqsuite.quantize_model(model, _config(model, preset), calib_data=lambda m: _forward(m, inputs))
    return model, inputs, ref


def test_every_dit_rule_has_a_tiny_model_pipeline_and_expectations() -> None:
    assert set(EXPECT) == set(TINY_DITS) == set(DIT_RULES) == set(TINY_DIT_PIPELINES)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_dit_rule_keeps_modulates_and_quantizes(name: str, preset: str) -> None:
    model, inputs, ref = _quantize(name, preset)
    rule, generic = rule_for(model)
    assert not generic and rule.name == name and rule.description
    exp = EXPECT[name]
    for layer in exp.keep:
        m = model.get_submodule(layer)
        assert not isinstance(m, (QLinear, QLinearLowRank)), f"{name}.{layer} should stay float, is {type(m)}"
        assert type(m).__module__.startswith("torch.nn"), f"{name}.{layer}: {type(m)}"
    for layer in exp.weight_only:
        m = model.get_submodule(layer)
        assert type(m) is QLinear, f"{name}.{layer} should be weight-only QLinear, is {type(m).__name__}"
        assert m.spec.weight is not None and m.spec.act is None and m.spec.rank == 0, f"{layer}: {m.spec.short()}"
    recipe = resolve_config(preset).default
    for layer in exp.quantized:
        m = model.get_submodule(layer)
        assert hasattr(m, "spec"), f"{name}.{layer} should be quantized, is {type(m).__name__}"
        assert m.spec.weight == recipe.weight and m.spec.act == recipe.act, f"{layer}: {m.spec.short()}"
        if recipe.rank and isinstance(m, QLinearLowRank):
            assert m.rank > 0
    fraction = model.vqsuite_report.quantized_fraction
    assert fraction > MIN_QUANTIZED_FRACTION, f"{name}: {fraction:.2f} of the matrix weights quantized"
    out = _forward(model, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_dit_rule_w8a8_output_close_to_float(name: str) -> None:
    model, inputs, ref = _quantize(name, "w8a8")
    out = _forward(model, inputs)
    sqnr = (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()
    assert sqnr > MIN_W8A8_SQNR_DB, f"{name}: W8A8 output SQNR {sqnr:.1f} dB"


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_dit_rule_shared_inputs_name_existing_layers(name: str) -> None:
    model, _ = TINY_DITS[name]()
    rule, _ = rule_for(model)
    groups = rule.shared_input_groups(model)
    assert groups, f"{name}: no shared-input group matched"
    for group in groups:
        assert all(isinstance(model.get_submodule(n), nn.Linear) for n in group)


def _generate(pipe, call: dict) -> torch.Tensor:
    """One image ``[1, 3, H, W]`` (the first frame of a video pipeline's ``[1, F, 3, H, W]``)."""
    kw = dict(call, num_inference_steps=2, height=PIPE_SIDE, width=PIPE_SIDE, output_type="pt")
    out = pipe(**kw, generator=torch.Generator().manual_seed(0))
    if hasattr(out, "frames"):
        return out.frames[:, 0]
    return out.images


@pytest.mark.parametrize("name", sorted(TINY_DIT_PIPELINES))
def test_dit_pipeline_quantizes_with_its_rule_and_generates(name: str) -> None:
    pipe, call = TINY_DIT_PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    ref = _generate(pipe, call)
    vqsuite.quantize_pipeline(pipe, "w4a4")
    comp = pipe.vqsuite_report.components["transformer"]
    assert comp.class_name == name and comp.rule == name, (comp.class_name, comp.rule)
    rule, _ = rule_for(pipe.transformer)
    rules = rule.layer_rules(pipe.transformer)
    exp = EXPECT[name]
    rows = {r.name: r for r in comp.rows}
    for layer in exp.keep:
        r = rows[layer]
        assert r.status == "kept" and r.reason == f"16-bit: {layer_role(rules, layer).role}", r
    for layer in exp.weight_only:
        r = rows[layer]
        assert r.status == "quantized" and r.format == "W4A16" and r.reason.startswith(layer_role(rules, layer).role), r
    for layer in exp.quantized:
        r, lr = rows[layer], layer_role(rules, layer)
        role = "recipe" if lr is None else lr.role  # a no_lowrank conv reports its role
        assert r.status == "quantized" and r.format == "W4A4" and r.reason.startswith(role), r
    img = _generate(pipe, call)
    assert img.shape == ref.shape == (1, 3, PIPE_SIDE, PIPE_SIDE) and torch.isfinite(img).all()
    assert not torch.equal(img, ref), "the quantized pipeline produced the float image: nothing was swapped in"


def test_dit_pipeline_that_quantizes_nothing_names_the_shape_limit() -> None:
    # width 24 with mlp_ratio 1: every linear and 1x1 conv reads 24 features, which NVFP4's fixed block of 16 does
    # not divide (integer recipes fall back to per-channel groups there; a block format cannot); the warning must put
    # that first, before the rule's own 16-bit layers
    pipe, _ = pipe_SanaTransformer2DModel(width=24, mlp_ratio=1.0)
    with pytest.warns(UserWarning, match=r"quantize_pipeline quantized NOTHING in SanaPipeline\.transformer") as rec:
        vqsuite.quantize_pipeline(pipe, "nvfp4")
    msgs = [str(w.message) for w in rec if "quantized NOTHING" in str(w.message)]
    msg = next(m for m in msgs if m.startswith("quantize_pipeline"))
    assert "SanaTransformer2DModel, rule SanaTransformer2DModel" in msg and "(generic fallback)" not in msg
    assert msg.split("reasons: ", 1)[1].startswith("weight_group_size=16 must divide in_features=24"), msg
    model_msg = next(m for m in msgs if m.startswith("quantize_model"))
    assert model_msg.split("Reasons: ", 1)[1].startswith("weight_group_size=16 must divide in_features=24"), model_msg
    assert not pipe.vqsuite_report.components["transformer"].module_report.quantized
