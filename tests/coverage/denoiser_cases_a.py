"""Small-config builders of diffusers denoiser classes A–J (see denoiser_cases.py).

Every builder seeds, builds its class from a config written here (1–2 blocks, width 32–64, a handful of tokens,
1–2 video frames) and returns ``(model.eval(), forward kwargs)``. Classes that cannot be built small or run on
CPU are in :data:`NO_CASE` with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from coverage_run import Builder, Inputs

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


def _build(cls_name: str, config: dict, inputs: dict) -> tuple[nn.Module, Inputs]:
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**config)
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
    )
    inputs = dict(
        hidden_states=_tok(B, 16, 16),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=_t(B, 0.5),
        img_ids=_ids(4, 4, axes=4),
        txt_ids=torch.zeros(S_TXT, 4),
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
        timestep=torch.full((B,), 500, dtype=torch.long),
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
        timestep=torch.full((B,), 500, dtype=torch.long),
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
        timestep=torch.full((B,), 500, dtype=torch.long),
    )


def cogvideox() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    return _build("CogVideoXTransformer3DModel", COGVIDEO_SMALL, _cogvideo_inputs())


def consisid() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    return _build("ConsisIDTransformer3DModel", COGVIDEO_SMALL, _cogvideo_inputs())


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
        timestep=torch.full((B,), 500, dtype=torch.long),
        **_size_cond(),
    )
    return _build("CogView3PlusTransformer2DModel", cfg, inputs)


def cogview4() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    cfg = dict(COGVIEW_SMALL, pos_embed_max_size=8, sample_size=8, rope_axes_dim=(8, 8))
    inputs = dict(
        hidden_states=torch.randn(B, 4, 8, 8),
        encoder_hidden_states=_tok(B, S_TXT, 32),
        timestep=torch.full((B,), 500, dtype=torch.long),
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
        timestep=torch.full((B,), 500, dtype=torch.long),
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
    "AuraFlowTransformer2DModel": auraflow,
    "BriaFiboTransformer2DModel": bria_fibo,
    "BriaTransformer2DModel": bria,
    "ChromaTransformer2DModel": chroma,
    "DiTTransformer2DModel": dit,
    "Flux2Transformer2DModel": flux2,
    "Flux3Transformer2DModel": flux3,
    "FluxTransformer2DModel": flux,
}

#: classes of this half without a case, and why
NO_CASE: dict[str, str] = {}
