"""Small-config builders of diffusers denoiser classes A–J (see denoiser_cases.py).

Every builder seeds, builds its class from a config written here (1–2 blocks, width 32–64, a handful of tokens,
1–2 video frames) and returns ``(model.eval(), forward kwargs)``. Classes that cannot be built small or run on
CPU are in :data:`NO_CASE` with the reason.
"""

from __future__ import annotations

import torch
from coverage_run import Builder, Inputs
from torch import nn

B = 1  # batch of every case
S_TXT = 6  # text tokens of every case


def _tok(b: int, n: int, d: int) -> torch.Tensor:
    """Token tensor ``[b, n, d]`` float32."""
    return torch.randn(b, n, d)


def _t(b: int = B, value: float = 500.0) -> torch.Tensor:
    """Timestep ``[b]`` float32."""
    return torch.full((b,), value)


def _ids(rows: int, cols: int, axes: int = 3, first: int = 0) -> torch.Tensor:
    """Flux-style position ids ``[rows * cols, axes]``: axis 0 = ``first``, then (row, col) (further axes 0)."""
    ids = torch.zeros(rows, cols, axes)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, axes)


#: std of the random values given to zero-initialised weight matrices
ZERO_INIT_STD = 0.02


def _build(cls_name: str, config: dict, inputs: dict) -> tuple[nn.Module, Inputs]:
    """``diffusers.<cls_name>(**config)`` in eval mode, with its zero-initialised weight matrices made random.

    Zero-initialised output projections and adaLN-zero modulations (ErnieImage's final linear, JoyImage's
    modulation tables) would make the output 0 or the blocks identities, and hide any quantization error.
    """
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, ZERO_INIT_STD)
    return model.eval(), inputs


# --------------------------------------------------------------------------------------------------------------
# Flux family: packed latent tokens [B, H*W, C], text tokens, (row, col) position ids


def flux() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    inputs = dict(
        hidden_states=_tok(B, 16, 16),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        pooled_projections=torch.randn(B, 32),
        timestep=_t(B, 0.5),
        img_ids=_ids(4, 4),
        txt_ids=torch.zeros(S_TXT, 3),
    )
    return _build("FluxTransformer2DModel", cfg, inputs)


def bria() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 6, 6],
    )
    inputs = dict(
        hidden_states=_tok(B, 16, 16),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 500.0),
        img_ids=_ids(4, 4),
        txt_ids=torch.zeros(S_TXT, 3),
    )
    return _build("BriaTransformer2DModel", cfg, inputs)


def bria_fibo() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 6, 6],
        text_encoder_dim=16,
    )
    inputs = dict(
        hidden_states=_tok(B, 16, 16),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        text_encoder_layers=[_tok(B, S_TXT, 16) for _ in range(2)],
        timestep=_t(B, 500.0),
        img_ids=_ids(4, 4),
        txt_ids=torch.zeros(S_TXT, 3),
    )
    return _build("BriaFiboTransformer2DModel", cfg, inputs)


def chroma() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    inputs = dict(
        hidden_states=_tok(B, 16, 16),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 0.5),
        img_ids=_ids(4, 4),
        txt_ids=torch.zeros(S_TXT, 3),
    )
    return _build("ChromaTransformer2DModel", cfg, inputs)


def flux2() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )
    inputs = dict(
        hidden_states=_tok(B, 16, 16),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 0.5),
        img_ids=_ids(4, 4, axes=4).unsqueeze(0),
        txt_ids=torch.zeros(B, S_TXT, 4),
        guidance=torch.full((B,), 3.5),
    )
    return _build("Flux2Transformer2DModel", cfg, inputs)


def flux3() -> tuple[nn.Module, Inputs]:
    """With an image condition (2x2 tokens on position plane 1) and the flow-map target timestep, so that every
    branch (image-cond mode blocks, target timestep embedder) runs."""
    torch.manual_seed(0)
    cfg = dict(
        in_channels=16,
        cond_in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        flow_map=True,
    )
    inputs = dict(
        hidden_states=_tok(B, 16, 16),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 0.5),
        img_ids=_ids(4, 4, axes=4),
        txt_ids=torch.zeros(S_TXT, 4),
        image_cond_hidden_states=_tok(B, 4, 16),
        image_cond_ids=_ids(2, 2, axes=4, first=1),
        target_timestep=_t(B, 0.25),
    )
    return _build("Flux3Transformer2DModel", cfg, inputs)


# --------------------------------------------------------------------------------------------------------------
# image DiTs on a latent grid [B, C, H, W]


def dit() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        norm_num_groups=4,
        num_embeds_ada_norm=10,
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        timestep=_t(B, 500.0),
        class_labels=torch.zeros(B, dtype=torch.long),
    )
    return _build("DiTTransformer2DModel", cfg, inputs)


def auraflow() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 500.0),
    )
    return _build("AuraFlowTransformer2DModel", cfg, inputs)


# --------------------------------------------------------------------------------------------------------------
# video DiTs on a latent clip [B, C, F, H, W] (Wan-style rope: head_dim 16 splits t/h/w = 8/4/4)

WAN_SMALL = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=1,
    rope_max_seq_len=32,
)


def anyflow() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(B, 2, 4, 8, 8),  # [B, F, C, H, W]
        timestep=torch.full((B, 2), 500.0),
        r_timestep=torch.full((B, 2), 400.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
    )
    return _build("AnyFlowTransformer3DModel", WAN_SMALL, inputs)


def anyflow_far() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(WAN_SMALL, compressed_patch_size=(1, 4, 4), full_chunk_limit=1, chunk_partition=(1, 1))
    inputs = dict(
        hidden_states=torch.randn(B, 2, 4, 8, 8),  # [B, F, C, H, W]
        timestep=torch.full((B, 2), 500.0),
        r_timestep=torch.full((B, 2), 400.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        chunk_partition=[1, 1],
    )
    return _build("AnyFlowFARTransformer3DModel", cfg, inputs)


def chronoedit() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(B, 4, 2, 8, 8),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
    )
    return _build("ChronoEditTransformer3DModel", dict(WAN_SMALL, rope_temporal_skip_len=1), inputs)


def helios() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = {k: v for k, v in WAN_SMALL.items() if k != "rope_max_seq_len"}
    cfg.update(rope_dim=(8, 4, 4))
    inputs = dict(
        hidden_states=torch.randn(B, 4, 2, 8, 8),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
    )
    return _build("HeliosTransformer3DModel", cfg, inputs)


def allegro() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        cross_attention_dim=32,
        sample_height=8,
        sample_width=8,
        sample_frames=2,
        caption_channels=32,
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 2, 8, 8),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 500.0),
    )
    return _build("AllegroTransformer3DModel", cfg, inputs)


COGVIDEO_SMALL = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=32,
    text_embed_dim=32,
    num_layers=1,
    sample_width=8,
    sample_height=8,
    sample_frames=5,  # latent frames = (5 - 1) // 4 + 1 = 2
    patch_size=2,
    max_text_seq_length=S_TXT,
)


def _cogvideo_inputs() -> dict:
    return dict(
        hidden_states=torch.randn(B, 2, 4, 8, 8),  # [B, F, C, H, W]
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 500.0),
    )


def cogvideox() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    return _build("CogVideoXTransformer3DModel", COGVIDEO_SMALL, _cogvideo_inputs())


def consisid() -> tuple[nn.Module, Inputs]:
    """With the face branch (local facial extractor + perceiver cross-attention): 3 heads so that its key/value
    width ``int(inner_dim * 2 / 3)`` is 32, the extractor's output width."""
    torch.manual_seed(0)
    cfg = dict(
        COGVIDEO_SMALL,
        num_attention_heads=3,
        is_train_face=True,
        cross_attn_interval=1,
        cross_attn_dim_head=16,
        cross_attn_num_heads=2,
        LFE_id_dim=16,
        LFE_vit_dim=16,
        LFE_depth=2,  # a multiple of LFE_num_scale
        LFE_dim_head=8,
        LFE_num_heads=2,
        LFE_num_id_token=2,
        LFE_num_querie=4,
        LFE_output_dim=32,
        LFE_ff_mult=2,
        LFE_num_scale=2,
    )
    inputs = dict(_cogvideo_inputs(), id_cond=torch.randn(B, 16), id_vit_hidden=[_tok(B, 5, 16) for _ in range(2)])
    return _build("ConsisIDTransformer3DModel", cfg, inputs)


def cosmos() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=32,
        adaln_lora_dim=8,
        max_size=(4, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 1.0, 1.0),
        encoder_hidden_states_channels=32,
        crossattn_proj_in_channels=32,
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 2, 8, 8),
        timestep=_t(B, 0.5),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        fps=24,
        padding_mask=torch.zeros(B, 1, 8, 8),
    )
    return _build("CosmosTransformer3DModel", cfg, inputs)


def easyanimate() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=8,
        sample_height=8,
        num_layers=1,
        mmdit_layers=1,
        time_embed_dim=32,
        text_embed_dim=32,
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 2, 8, 8),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
    )
    return _build("EasyAnimateTransformer3DModel", cfg, inputs)


def _size_cond(b: int = B) -> dict:
    """CogView-style size conditioning: ``original_size``, ``target_size``, ``crop_coords`` ``[b, 2]``."""
    return dict(
        original_size=torch.tensor([[64.0, 64.0]] * b),
        target_size=torch.tensor([[64.0, 64.0]] * b),
        crop_coords=torch.zeros(b, 2),
    )


COGVIEW_SMALL = dict(
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    text_embed_dim=32,
    time_embed_dim=32,
    condition_dim=8,
)


def cogview3plus() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(COGVIEW_SMALL, pos_embed_max_size=8, sample_size=8)
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 500.0),
        **_size_cond(),
    )
    return _build("CogView3PlusTransformer2DModel", cfg, inputs)


def cogview4() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(COGVIEW_SMALL, pos_embed_max_size=8, sample_size=8, rope_axes_dim=(8, 8))
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 500.0),
        **_size_cond(),
    )
    return _build("CogView4Transformer2DModel", cfg, inputs)


def glm_image() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(COGVIEW_SMALL, prior_vq_quantizer_codebook_size=16)
    size = _size_cond()
    del size["original_size"]
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        prior_token_id=torch.randint(0, 16, (B, 16)),
        prior_token_drop=torch.zeros(B, 16, dtype=torch.bool),
        timestep=_t(B, 500.0),
        **size,
    )
    return _build("GlmImageTransformer2DModel", cfg, inputs)


def ernie_image() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        hidden_size=32,
        num_attention_heads=2,
        num_layers=1,
        ffn_hidden_size=64,
        in_channels=4,
        out_channels=4,
        patch_size=1,
        text_in_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 4, 4),
        timestep=_t(B, 500.0),
        text_bth=_tok(B, S_TXT, 32),
        text_lens=torch.full((B,), S_TXT, dtype=torch.long),
    )
    return _build("ErnieImageTransformer2DModel", cfg, inputs)


def ideogram4() -> tuple[nn.Module, Inputs]:
    """One packed sequence: ``S_TXT`` LLM tokens (indicator 3) then a 4x4 grid of image tokens (indicator 2)."""
    torch.manual_seed(0)
    cfg = dict(
        in_channels=8,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        intermediate_size=64,
        adaln_dim=16,
        llm_features_dim=32,
        mrope_section=(4, 2, 2),
    )
    n_img = 16
    seq = S_TXT + n_img
    pos = torch.zeros(B, seq, 3, dtype=torch.long)
    pos[:, :S_TXT, 0] = torch.arange(S_TXT)
    pos[:, S_TXT:] = _ids(4, 4).long() + torch.tensor([S_TXT, 0, 0])
    indicator = torch.full((B, seq), 2, dtype=torch.long)
    indicator[:, :S_TXT] = 3
    inputs = dict(
        hidden_states=_tok(B, seq, 8),
        timestep=torch.full((B,), 0.5),
        encoder_hidden_states=_tok(B, seq, 32),
        position_ids=pos,
        segment_ids=torch.zeros(B, seq, dtype=torch.long),
        indicator=indicator,
    )
    return _build("Ideogram4Transformer2DModel", cfg, inputs)


def bria_fibo2() -> tuple[nn.Module, Inputs]:
    """Text features come as bundles ``[B, 1 + len(injection_layer_ids), S, cap_feat_dim]`` (perceiver + injections)."""
    torch.manual_seed(0)
    cfg = dict(
        in_channels=4,
        patch_size=2,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        cap_feat_dim=32,
        injection_layer_ids=(1,),
        perceiver_num_layers=1,
        min_num_gist_tokens=4,
        max_num_gist_tokens=8,
        gist_step=4,
        gist_min_text_len=4,
        gist_max_text_len=16,
        axes_dims=(4, 6, 6),
        axes_lens=(64, 16, 16),
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        timestep=torch.full((B,), 0.5),
        encoder_hidden_states=torch.randn(B, 2, S_TXT, 32),
    )
    return _build("BriaFibo2Transformer2DModel", cfg, inputs)


def ace_step() -> tuple[nn.Module, Inputs]:
    """Audio latents ``[B, T, 8]`` concatenated with context latents ``[B, T, 8]`` before the patchify conv."""
    torch.manual_seed(0)
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        in_channels=16,
        audio_acoustic_hidden_dim=8,
        patch_size=2,
        sliding_window=4,
    )
    inputs = dict(
        hidden_states=_tok(B, 12, 8),
        timestep=torch.full((B,), 0.7),
        timestep_r=torch.full((B,), 0.7),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        context_latents=_tok(B, 12, 8),
    )
    return _build("AceStepTransformer1DModel", cfg, inputs)


# --------------------------------------------------------------------------------------------------------------
# Hunyuan family (dual-stream blocks, token refiner on the text, masks over text tokens)


def _mask(b: int, n: int, valid: int | None = None) -> torch.Tensor:
    """Attention mask ``[b, n]`` int64: the first ``valid`` tokens (default all) are 1, the rest 0."""
    m = torch.zeros(b, n, dtype=torch.long)
    m[:, : n if valid is None else valid] = 1
    return m


HUNYUAN_VIDEO_SMALL = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    text_embed_dim=32,
    pooled_projection_dim=16,
    rope_axes_dim=(4, 6, 6),
)


def _hunyuan_video_inputs() -> dict:
    return dict(
        hidden_states=torch.randn(B, 4, 2, 8, 8),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        encoder_attention_mask=_mask(B, S_TXT, S_TXT - 2),
        pooled_projections=torch.randn(B, 16),
        guidance=torch.full((B,), 6000.0),
    )


def hunyuan_video() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    return _build("HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO_SMALL, _hunyuan_video_inputs())


def hunyuan_video_framepack() -> tuple[nn.Module, Inputs]:
    """The clean/2x/4x history latents go together (the forward reads all three ropes once any is given)."""
    torch.manual_seed(0)
    cfg = dict(HUNYUAN_VIDEO_SMALL, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)
    inputs = dict(
        _hunyuan_video_inputs(),
        image_embeds=_tok(B, 4, 16),
        indices_latents=torch.arange(1, 3),  # 1-D: the rope meshgrids it
        latents_clean=torch.randn(B, 4, 1, 8, 8),
        indices_latents_clean=torch.zeros(1, dtype=torch.long),
        latents_history_2x=torch.randn(B, 4, 2, 8, 8),
        indices_latents_history_2x=torch.arange(3, 5),
        latents_history_4x=torch.randn(B, 4, 4, 8, 8),
        indices_latents_history_4x=torch.arange(5, 9),
    )
    return _build("HunyuanVideoFramepackTransformer3DModel", cfg, inputs)


def hunyuan_video15() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=32,
        text_embed_2_dim=16,
        image_embed_dim=16,
        rope_axes_dim=(4, 6, 6),
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 2, 4, 4),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        encoder_attention_mask=_mask(B, S_TXT, S_TXT - 2),
        encoder_hidden_states_2=_tok(B, 4, 16),
        encoder_attention_mask_2=_mask(B, 4, 3),
        image_embeds=_tok(B, 4, 16),
    )
    return _build("HunyuanVideo15Transformer3DModel", cfg, inputs)


def hunyuan_image() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=32,
        rope_axes_dim=(8, 8),
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 4, 4),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        encoder_attention_mask=_mask(B, S_TXT, S_TXT - 2),
    )
    return _build("HunyuanImageTransformer2DModel", cfg, inputs)


def hunyuan_dit() -> tuple[nn.Module, Inputs]:
    """The pipeline computes the 2D rope of the 4x4 patch grid; done the same way here."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=32,
        num_layers=2,  # the skip connections pair block i with block num_layers - 1 - i
        mlp_ratio=2.0,
        cross_attention_dim=32,
        cross_attention_dim_t5=16,
        pooled_projection_dim=16,
        text_len=S_TXT,
        text_len_t5=4,
    )
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        text_embedding_mask=_mask(B, S_TXT),
        encoder_hidden_states_t5=_tok(B, 4, 16),
        text_embedding_mask_t5=_mask(B, 4),
        image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * B),
        style=torch.zeros(B, dtype=torch.long),
        image_rotary_emb=rope,
    )
    return _build("HunyuanDiT2DModel", cfg, inputs)


def hidream_image() -> tuple[nn.Module, Inputs]:
    """Llama features come stacked per layer ``[n_llama_layers, B, S, C]``, one per double + single block."""
    torch.manual_seed(0)
    cfg = dict(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[16, 32],
        text_emb_dim=16,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(4, 6, 6),
        max_resolution=(8, 8),
        llama_layers=[0, 1],
    )
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        timesteps=torch.full((B,), 500, dtype=torch.long),
        encoder_hidden_states_t5=_tok(B, S_TXT, 16),
        encoder_hidden_states_llama3=torch.randn(2, B, S_TXT, 32),
        pooled_embeds=torch.randn(B, 16),
    )
    return _build("HiDreamImageTransformer2DModel", cfg, inputs)


def dreamlite() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=32,
        num_layers=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        use_linear_projection=True,
    )
    inputs = dict(hidden_states=torch.randn(B, 32, 4, 4), encoder_hidden_states=_tok(B, S_TXT, 32))
    return _build("DreamLiteTransformer2DModel", cfg, inputs)


# --------------------------------------------------------------------------------------------------------------
# JoyImage: Wan-like video blocks; the edit-plus variant takes pre-patchified items with a per-item shape list

JOY_SMALL = dict(
    patch_size=[1, 2, 2],
    in_channels=4,
    hidden_size=32,
    num_attention_heads=2,
    text_dim=32,
    mlp_width_ratio=2.0,
    num_layers=1,
    rope_dim_list=[4, 6, 6],
)


def joyimage_edit() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(B, 4, 1, 8, 8),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
    )
    return _build("JoyImageEditTransformer3DModel", JOY_SMALL, inputs)


def joyimage_edit_plus() -> tuple[nn.Module, Inputs]:
    """Two items (target + reference), each 1x2x2 patches of [C=4, 1, 2, 2]; the second sample's last patch is pad."""
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(B, 8, 4, 1, 2, 2),
        timestep=_t(B, 500.0),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        encoder_hidden_states_mask=_mask(B, S_TXT, S_TXT - 1),
        shape_list=[[(1, 2, 2), (1, 2, 2)]] * B,
    )
    return _build("JoyImageEditPlusTransformer3DModel", JOY_SMALL, inputs)


CASES: dict[str, Builder] = {
    "AceStepTransformer1DModel": ace_step,
    "BriaFibo2Transformer2DModel": bria_fibo2,
    "CogView3PlusTransformer2DModel": cogview3plus,
    "CogView4Transformer2DModel": cogview4,
    "ErnieImageTransformer2DModel": ernie_image,
    "GlmImageTransformer2DModel": glm_image,
    "Ideogram4Transformer2DModel": ideogram4,
    "AllegroTransformer3DModel": allegro,
    "AnyFlowFARTransformer3DModel": anyflow_far,
    "AnyFlowTransformer3DModel": anyflow,
    "ChronoEditTransformer3DModel": chronoedit,
    "CogVideoXTransformer3DModel": cogvideox,
    "ConsisIDTransformer3DModel": consisid,
    "CosmosTransformer3DModel": cosmos,
    "EasyAnimateTransformer3DModel": easyanimate,
    "HeliosTransformer3DModel": helios,
    "HiDreamImageTransformer2DModel": hidream_image,
    "HunyuanDiT2DModel": hunyuan_dit,
    "HunyuanImageTransformer2DModel": hunyuan_image,
    "HunyuanVideo15Transformer3DModel": hunyuan_video15,
    "HunyuanVideoFramepackTransformer3DModel": hunyuan_video_framepack,
    "HunyuanVideoTransformer3DModel": hunyuan_video,
    "JoyImageEditPlusTransformer3DModel": joyimage_edit_plus,
    "JoyImageEditTransformer3DModel": joyimage_edit,
    "AuraFlowTransformer2DModel": auraflow,
    "BriaFiboTransformer2DModel": bria_fibo,
    "BriaTransformer2DModel": bria,
    "ChromaTransformer2DModel": chroma,
    "DiTTransformer2DModel": dit,
    "DreamLiteTransformer2DModel": dreamlite,
    "Flux2Transformer2DModel": flux2,
    "Flux3Transformer2DModel": flux3,
    "FluxTransformer2DModel": flux,
}

#: classes of this half without a case, and why
NO_CASE: dict[str, str] = {}
