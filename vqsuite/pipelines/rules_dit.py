"""Architecture rules for the newer diffusers DiTs (Sana, Lumina2, CogView4, AuraFlow, Chroma, QwenImage, Wan,
LTX-Video, HunyuanDiT, FLUX.2), registered by :mod:`vqsuite.pipelines.rules` on import.

Every rule follows the deepcompressor skips of METHODS.md §1.3 mapped onto the class's module names:

* 16-bit: the input/patch embedder (first layer), the timestep/guidance/text/caption embedders, the final
  norm's modulation and the output projection (last layer);
* W4A16 (the recipe's weights, 16-bit activations, no branch): the adaLN modulation linears
  (``AdaLayerNormZero.linear`` and kin, QwenImage's ``img_mod``/``txt_mod``, FLUX.2's model-level
  ``*_modulation.linear``, which are ``6·dim²`` each); the adaLN-single projection inside a timestep embedder
  (Sana, LTX-Video, Wan; Chroma's distilled approximator) stays 16-bit with its embedder, as in the PixArt rule;
* PixArt-like cross-attention (Sana, LTX-Video, Wan, HunyuanDiT) keeps the text-stream key/value projections
  16-bit (deepcompressor's ``attn_add`` skip for PixArt-Σ);
* everything else (attention q/k/v/out, joint-attention ``add_*`` projections, MLPs, single-block fused
  projections) gets the recipe; the q/k/v (and gate/up pairs of GLU MLPs) that read one tensor are declared as
  shared-input groups.

Nothing here imports diffusers: the rules only name modules.
"""

from __future__ import annotations

from vqsuite.pipelines.rules import (
    _ADD_QKV,
    _QKV,
    ArchRule,
    LayerRule,
    SharedInput,
    _keep,
    _no_lowrank,
    _w4a16,
    register_arch_rule,
)

#: class name -> rule; registered under the class name and each alias in ``_ALIASES``
DIT_RULES: dict[str, ArchRule] = {}

#: relatives whose module tree matches a rule's patterns (same diffusers block classes)
_ALIASES: dict[str, tuple[str, ...]] = {
    "WanTransformer3DModel": ("SkyReelsV2Transformer3DModel", "ChronoEditTransformer3DModel"),
}


def _rule(name: str, layers: tuple[LayerRule, ...], description: str, shared: tuple[SharedInput, ...] = ()) -> None:
    DIT_RULES[name] = ArchRule(name, layers, description, shared)


_rule(
    "SanaTransformer2DModel",
    (
        _keep("patch_embed.*", "patch embedder (first layer)"),
        _keep("time_embed.*", "timestep embedder + shared adaLN-single modulation"),
        _keep("caption_projection.*", "caption (text) embedder"),
        _keep("proj_out", "output projection (last layer)"),
        _keep("transformer_blocks.*.attn2.to_k", "cross-attention key of the text stream (attn_add)"),
        _keep("transformer_blocks.*.attn2.to_v", "cross-attention value of the text stream (attn_add)"),
        _keep("transformer_blocks.*.ff.conv_depth", "GLUMBConv depthwise 3x3 conv"),
        _no_lowrank("transformer_blocks.*.ff.conv_inverted", "GLUMBConv 1x1 conv (no low-rank branch)"),
        _no_lowrank("transformer_blocks.*.ff.conv_point", "GLUMBConv 1x1 conv (no low-rank branch)"),
    ),
    "Sana: linear self-attention, cross-attention Q/out W4A4 (+ low rank), GLUMBConv 1x1 convs W4A4 without a "
    "branch; depthwise conv, text-stream K/V and adaLN-single 16-bit",
    (SharedInput("transformer_blocks.*.attn1", _QKV),),
)

_rule(
    "Lumina2Transformer2DModel",
    (
        _keep("x_embedder", "input embedder (first layer)"),
        _keep("time_caption_embed.*", "timestep + caption embedder"),
        _keep("norm_out.linear_1", "final adaLN (output embed)"),
        _keep("norm_out.linear_2", "output projection (last layer)"),
        _w4a16("noise_refiner.*.norm1.linear"),
        _w4a16("layers.*.norm1.linear"),
    ),
    "Lumina-Image 2.0: attention (GQA) and SwiGLU linears of the refiners and main layers W4A4 (+ low rank); "
    "adaLN modulation W4A16",
    (
        SharedInput("*.attn", _QKV),
        SharedInput("*.feed_forward", ("linear_1", "linear_3")),
    ),
)

_rule(
    "CogView4Transformer2DModel",
    (
        _keep("patch_embed.*", "patch + text embedder (first layer)"),
        _keep("time_condition_embed.*", "timestep + size/crop condition embedder"),
        _keep("norm_out.*", "final adaLN (output embed)"),
        _keep("proj_out", "output projection (last layer)"),
        _w4a16("transformer_blocks.*.norm1.linear"),
    ),
    "CogView4: joint (text+image) attention and MLP linears W4A4 (+ low rank); adaLN-zero modulation W4A16",
    (SharedInput("transformer_blocks.*.attn1", _QKV),),
)

_rule(
    "AuraFlowTransformer2DModel",
    (
        _keep("pos_embed.*", "patch embedder (first layer)"),
        _keep("context_embedder", "text embedder"),
        _keep("time_step_proj.*", "timestep embedder"),
        _keep("norm_out.*", "final adaLN (output embed)"),
        _keep("proj_out", "output projection (last layer)"),
        _w4a16("joint_transformer_blocks.*.norm1.linear"),
        _w4a16("joint_transformer_blocks.*.norm1_context.linear"),
        _w4a16("single_transformer_blocks.*.norm1.linear"),
    ),
    "AuraFlow: joint and single-block attention and SwiGLU linears W4A4 (+ low rank); adaLN modulation W4A16",
    (
        SharedInput("*transformer_blocks.*.attn", _QKV),
        SharedInput("joint_transformer_blocks.*.attn", _ADD_QKV),
        SharedInput("*transformer_blocks.*.ff", ("linear_1", "linear_2")),
        SharedInput("joint_transformer_blocks.*.ff_context", ("linear_1", "linear_2")),
    ),
)

_FLUX_LIKE_SHARED = (
    SharedInput("transformer_blocks.*.attn", _QKV),
    SharedInput("transformer_blocks.*.attn", _ADD_QKV),
)

_rule(
    "ChromaTransformer2DModel",
    (
        _keep("x_embedder", "input embedder (first layer)"),
        _keep("context_embedder", "text embedder"),
        _keep("distilled_guidance_layer.*", "modulation approximator (timestep embedder, shared modulation)"),
        _keep("norm_out.*", "final norm (output embed)"),
        _keep("proj_out", "output projection (last layer)"),
    ),
    "Chroma: FLUX-style double/single-block attention, MLP and projections W4A4 (+ low rank); the modulation "
    "approximator 16-bit",
    _FLUX_LIKE_SHARED
    + (SharedInput("single_transformer_blocks.*", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),),
)

_rule(
    "QwenImageTransformer2DModel",
    (
        _keep("img_in", "image embedder (first layer)"),
        _keep("txt_in", "text embedder"),
        _keep("time_text_embed.*", "timestep embedder"),
        _keep("norm_out.*", "final adaLN (output embed)"),
        _keep("proj_out", "output projection (last layer)"),
        _w4a16("transformer_blocks.*.img_mod.*", "adaLN modulation (image stream)"),
        _w4a16("transformer_blocks.*.txt_mod.*", "adaLN modulation (text stream)"),
    ),
    "Qwen-Image: dual-stream attention and MLP linears W4A4 (+ low rank); img_mod/txt_mod modulation W4A16 "
    "(as nunchaku)",
    _FLUX_LIKE_SHARED,
)

_rule(
    "WanTransformer3DModel",
    (
        _keep("patch_embedding", "patch embedder (first layer)"),
        _keep("condition_embedder.*", "timestep/text/image embedders + shared modulation projection"),
        _keep("proj_out", "output projection (last layer)"),
        _keep("blocks.*.attn2.to_k", "cross-attention key of the text stream (attn_add)"),
        _keep("blocks.*.attn2.to_v", "cross-attention value of the text stream (attn_add)"),
        _keep("blocks.*.attn2.add_k_proj", "cross-attention key of the image stream (attn_add)"),
        _keep("blocks.*.attn2.add_v_proj", "cross-attention value of the image stream (attn_add)"),
        _keep("blocks.*.attn2.to_kv", "fused cross-attention key/value of the text stream (attn_add)"),
        _keep("blocks.*.attn2.to_added_kv", "fused cross-attention key/value of the image stream (attn_add)"),
        _keep("fps_*", "fps embedder (SkyReels-V2)"),
    ),
    "Wan 2.x: self-attention, cross-attention Q/out and MLP W4A4 (+ low rank); text/image-stream K/V and the "
    "shared modulation 16-bit",
    (SharedInput("blocks.*.attn1", _QKV),),
)

_rule(
    "LTXVideoTransformer3DModel",
    (
        _keep("proj_in", "input embedder (first layer)"),
        _keep("time_embed.*", "timestep embedder + shared adaLN-single modulation"),
        _keep("caption_projection.*", "caption (text) embedder"),
        _keep("proj_out", "output projection (last layer)"),
        _keep("transformer_blocks.*.attn2.to_k", "cross-attention key of the text stream (attn_add)"),
        _keep("transformer_blocks.*.attn2.to_v", "cross-attention value of the text stream (attn_add)"),
    ),
    "LTX-Video: self-attention, cross-attention Q/out and MLP W4A4 (+ low rank); text-stream K/V and "
    "adaLN-single 16-bit",
    (SharedInput("transformer_blocks.*.attn1", _QKV),),
)

_rule(
    "HunyuanDiT2DModel",
    (
        _keep("pos_embed.*", "patch embedder (first layer)"),
        _keep("text_embedder.*", "T5 text embedder"),
        _keep("time_extra_emb.*", "timestep + pooled-text (+ style/size) embedder"),
        _keep("norm_out.*", "final adaLN (output embed)"),
        _keep("proj_out", "output projection (last layer)"),
        _keep("blocks.*.attn2.to_k", "cross-attention key of the text stream (attn_add)"),
        _keep("blocks.*.attn2.to_v", "cross-attention value of the text stream (attn_add)"),
        _w4a16("blocks.*.norm1.linear", "adaLN shift modulation"),
    ),
    "Hunyuan-DiT: self-attention, cross-attention Q/out, MLP and long-skip linears W4A4 (+ low rank); shift "
    "modulation W4A16; text-stream K/V 16-bit",
    (SharedInput("blocks.*.attn1", _QKV),),
)

_rule(
    "Flux2Transformer2DModel",
    (
        _keep("x_embedder", "input embedder (first layer)"),
        _keep("context_embedder", "text embedder"),
        _keep("time_guidance_embed.*", "timestep/guidance embedder"),
        _keep("norm_out.*", "final adaLN (output embed)"),
        _keep("proj_out", "output projection (last layer)"),
        _w4a16("double_stream_modulation_img.linear", "shared adaLN modulation (image stream)"),
        _w4a16("double_stream_modulation_txt.linear", "shared adaLN modulation (text stream)"),
        _w4a16("single_stream_modulation.linear", "shared adaLN modulation (single blocks)"),
    ),
    "FLUX.2: double-block attention and SwiGLU linears, single-block fused qkv+MLP and output projections W4A4 "
    "(+ low rank); shared modulation W4A16",
    _FLUX_LIKE_SHARED,
)


for _name, _r in DIT_RULES.items():
    register_arch_rule(_r)
    for _alias in _ALIASES.get(_name, ()):
        register_arch_rule(ArchRule(_alias, _r.layers, f"{_r.description} ({_name} rule)", _r.shared_inputs))
