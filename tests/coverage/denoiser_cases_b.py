"""Small-config builders of diffusers denoiser classes K–Z (see denoiser_cases.py).

Each builder seeds itself, builds the class from a config written here (1–2 blocks, width 32–64, a few tokens,
1–2 video frames; nothing downloaded) and returns ``(model.eval(), inputs)``, ``inputs`` being the keyword
arguments of one forward. A class that cannot be built small or run on CPU is in :data:`NO_CASE` with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
from coverage_run import Builder
from torch import nn

#: text tokens of every case's prompt
TXT = 8


def _tok(b: int, n: int, d: int) -> torch.Tensor:
    """Random tokens ``[b, n, d]`` float32."""
    return torch.randn(b, n, d)


def _t(v: float = 500.0, b: int = 1) -> torch.Tensor:
    """A timestep ``[b]`` float32."""
    return torch.full((b,), v)


def _ids(frames: int, h: int, w: int) -> torch.Tensor:
    """Flux-style image position ids ``[frames*h*w, 3]``: (frame, row, column) of each token."""
    f, y, x = torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([f, y, x], dim=-1).reshape(-1, 3).float()


def _diffusers() -> Any:
    import diffusers

    return diffusers


#: std of the values given to zero-initialised linear layers
ZERO_INIT_STD = 0.02


def _built(model: nn.Module, inputs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``(model.eval(), inputs)`` after giving small random weights to the linear layers a fresh model zero-initialises
    (adaLN modulations, output heads, gates): a trained checkpoint has none, and with them the blocks behind a zero
    gate would contribute nothing, so their quantization could not change the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.numel() and not module.weight.any():
                module.weight.normal_(std=ZERO_INIT_STD)
                if module.bias is not None and not module.bias.any():
                    module.bias.normal_(std=ZERO_INIT_STD)
    return model.eval(), inputs


# --- UNets ---------------------------------------------------------------------------------------------------


def unet_1d() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().UNet1DModel(
        sample_size=16,
        in_channels=14,
        out_channels=14,
        extra_in_channels=8,
        time_embedding_dim=8,
        block_out_channels=(32, 32, 64),
        time_embedding_type="fourier",
        mid_block_type="UNetMidBlock1D",
        down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
    )
    return _built(m, {"sample": torch.randn(1, 14, 32), "timestep": _t(10.0)})


def unet_2d() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
    )
    return _built(m, {"sample": torch.randn(1, 3, 16, 16), "timestep": _t(10.0)})


def unet_2d_condition() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    inputs = {"sample": torch.randn(1, 4, 16, 16), "timestep": _t(10.0), "encoder_hidden_states": _tok(1, TXT, 32)}
    return _built(m, inputs)


def unet_3d_condition() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().UNet3DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    inputs = {"sample": torch.randn(1, 4, 2, 16, 16), "timestep": _t(10.0), "encoder_hidden_states": _tok(1, TXT, 32)}
    return _built(m, inputs)


def unet_motion() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().UNetMotionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=32,
        num_attention_heads=4,
        motion_num_attention_heads=4,
    )
    # the prompt comes once per frame: [batch * frames, tokens, dim]
    inputs = {"sample": torch.randn(1, 4, 2, 16, 16), "timestep": _t(10.0), "encoder_hidden_states": _tok(2, TXT, 32)}
    return _built(m, inputs)


def unet_spatio_temporal() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().UNetSpatioTemporalConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=3 * 32,
        num_frames=2,
    )
    inputs = {
        "sample": torch.randn(1, 2, 4, 16, 16),
        "timestep": _t(10.0),
        "encoder_hidden_states": _tok(1, 1, 32),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]),
    }
    return _built(m, inputs)


def unet_controlnet_xs() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().UNetControlNetXSModel(
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=32,
        num_attention_heads=2,
        upcast_attention=False,
        ctrl_block_out_channels=(8, 16),
        ctrl_num_attention_heads=2,
        ctrl_max_norm_num_groups=4,
        ctrl_conditioning_embedding_out_channels=(8, 8),
    )
    inputs = {
        "sample": torch.randn(1, 4, 16, 16),
        "timestep": _t(10.0),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "controlnet_cond": torch.randn(1, 3, 32, 32),
    }
    return _built(m, inputs)


# --- classic 2D/3D transformers ------------------------------------------------------------------------------


def transformer_2d() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().Transformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=32, cross_attention_dim=32
    )
    return _built(m, {"hidden_states": torch.randn(1, 32, 4, 4), "encoder_hidden_states": _tok(1, TXT, 32)})


def transformer_temporal() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().TransformerTemporalModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=32
    )
    return _built(m, {"hidden_states": torch.randn(2, 32, 4, 4), "num_frames": 2})


def pixart() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=32,
        out_channels=8,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return _built(m, inputs)


def latte() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().LatteTransformer3DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=32,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=2,
    )
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8), "encoder_hidden_states": _tok(1, TXT, 32), "timestep": _t()}
    return _built(m, inputs)


def sd3() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "pooled_projections": torch.randn(1, 64),
        "timestep": _t(),
    }
    return _built(m, inputs)


# --- Sana family ---------------------------------------------------------------------------------------------


def sana() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=4,
        cross_attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
        patch_size=1,
    )
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": _tok(1, TXT, 32), "timestep": _t()}
    return _built(m, inputs)


def sana_video() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
        patch_size=(1, 2, 2),
        rope_max_seq_len=32,
    )
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8), "encoder_hidden_states": _tok(1, TXT, 32), "timestep": _t()}
    return _built(m, inputs)


# --- Lumina --------------------------------------------------------------------------------------------------


def lumina2() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(32, 32, 32),
        cap_feat_dim=32,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "timestep": _t(0.5),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "encoder_attention_mask": torch.ones(1, TXT, dtype=torch.bool),
    }
    return _built(m, inputs)


def lumina_next() -> tuple[nn.Module, dict]:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    torch.manual_seed(0)
    m = _diffusers().LuminaNextDiT2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        cross_attention_dim=32,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "timestep": _t(0.5),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "encoder_mask": torch.ones(1, TXT),
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(16, 16, 16),
        "cross_attention_kwargs": {},
    }
    return _built(m, inputs)


# --- video DiTs ----------------------------------------------------------------------------------------------


def _wan_kwargs() -> dict[str, Any]:
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 32,
        "freq_dim": 32,
        "ffn_dim": 64,
        "num_layers": 2,
        "rope_max_seq_len": 32,
    }


def _wan_inputs() -> dict[str, Any]:
    return {"hidden_states": torch.randn(1, 4, 2, 8, 8), "timestep": _t(), "encoder_hidden_states": _tok(1, TXT, 32)}


def wan() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    return _built(_diffusers().WanTransformer3DModel(**_wan_kwargs()), _wan_inputs())


def wan_vace() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().WanVACETransformer3DModel(**_wan_kwargs(), vace_layers=[0], vace_in_channels=8)
    inputs = {**_wan_inputs(), "control_hidden_states": torch.randn(1, 8, 2, 8, 8)}
    return _built(m, inputs)


def skyreels_v2() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    return _built(_diffusers().SkyReelsV2Transformer3DModel(**_wan_kwargs()), _wan_inputs())


def ltx_video() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    inputs = {
        "hidden_states": torch.randn(1, 2 * 4 * 4, 4),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(),
        "encoder_attention_mask": torch.ones(1, TXT),
        "num_frames": 2,
        "height": 4,
        "width": 4,
    }
    return _built(m, inputs)


def mochi() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=32,
        in_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        max_sequence_length=TXT,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(),
        "encoder_attention_mask": torch.ones(1, TXT),
    }
    return _built(m, inputs)


# --- MMDiT / Flux-like image models --------------------------------------------------------------------------


def qwen_image() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    inputs = {
        "hidden_states": _tok(1, 16, 16),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "encoder_hidden_states_mask": torch.ones(1, TXT),
        "timestep": _t(0.5),
        "img_shapes": [(1, 4, 4)],
    }
    return _built(m, inputs)


def longcat_image() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    )
    inputs = {
        "hidden_states": _tok(1, 16, 16),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(0.5),
        "img_ids": _ids(1, 4, 4),
        "txt_ids": torch.zeros(TXT, 3),
    }
    return _built(m, inputs)


def ovis_image() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    inputs = {
        "hidden_states": _tok(1, 16, 16),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(0.5),
        "img_ids": _ids(1, 4, 4),
        "txt_ids": torch.zeros(TXT, 3),
    }
    return _built(m, inputs)


def prx() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().PRXTransformer2DModel(
        in_channels=4,
        patch_size=2,
        context_in_dim=32,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=2,
        depth=2,
        axes_dim=[8, 8],
    )
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8), "timestep": _t(0.5), "encoder_hidden_states": _tok(1, TXT, 32)}
    return _built(m, inputs)


def z_image() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[64, 64, 64],
    )
    inputs = {"x": [torch.randn(4, 1, 8, 8)], "t": _t(0.5), "cap_feats": [torch.randn(TXT, 32)]}
    return _built(m, inputs)


# --- audio ---------------------------------------------------------------------------------------------------


def stable_audio() -> tuple[nn.Module, dict]:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    torch.manual_seed(0)
    m = _diffusers().StableAudioDiTModel(
        sample_size=8,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=4,
        cross_attention_dim=32,
        time_proj_dim=32,
        global_states_input_dim=32,
        cross_attention_input_dim=32,
    )
    length = 8
    rotary = get_1d_rotary_pos_embed(16 // 2, length + 1, use_real=True, repeat_interleave_real=False)
    inputs = {
        "hidden_states": torch.randn(1, 4, length),
        "timestep": _t(),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "global_hidden_states": _tok(1, 1, 32),
        "rotary_embedding": rotary,
    }
    return _built(m, inputs)


# --- Kandinsky 5/6 (channels-last video latents [B, T, H, W, C]) ----------------------------------------------


def kandinsky5() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        in_text_dim=32,
        in_text_dim2=32,
        time_dim=32,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=32,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    inputs = {
        "hidden_states": torch.randn(1, 2, 8, 8, 4),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(),
        "pooled_projections": torch.randn(1, 32),
        "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(TXT),
    }
    return _built(m, inputs)


def kandinsky6() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().Kandinsky6Transformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=32,
        in_text_dim2=32,
        time_dim=32,
        patch_size=(1, 2, 2),
        model_dim=32,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=1,
        axes_dims=(4, 6, 6),
        visual_cond=False,
        in_audio_dim=4,
        out_audio_dim=4,
    )
    inputs = {
        "hidden_states": torch.randn(1, 2, 8, 8, 4),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "pooled_projections": torch.randn(1, 32),
        "timestep": _t(),
        "audio_hidden_states": _tok(1, 6, 4),
    }
    return _built(m, inputs)


def kandinsky6_sr() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    # input channels: noisy latent (4) + anchor latent (4) + anchor mask (1); NABLA needs an 8x8 token grid
    m = _diffusers().Kandinsky6SRTransformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        time_dim=32,
        patch_size=(1, 1, 1),
        model_dim=32,
        ff_dim=64,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    return _built(m, {"hidden_states": torch.randn(1, 1, 8, 8, 9), "timestep": _t()})


def krea2() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().Krea2Transformer2DModel(
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        timestep_embed_dim=32,
        text_hidden_dim=32,
        num_text_layers=2,
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=64,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6),
    )
    # text rows of the rotary coordinates are zero, image rows hold (frame, row, column)
    position_ids = torch.cat([torch.zeros(TXT, 3), _ids(1, 4, 4)]).long()
    inputs = {
        "hidden_states": _tok(1, 16, 16),
        "encoder_hidden_states": torch.randn(1, TXT, 2, 32),
        "timestep": _t(0.5),
        "position_ids": position_ids,
    }
    return _built(m, inputs)


def minimax_music3() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().MiniMaxMusic3Transformer1DModel(
        in_channels=4,
        condition_dim=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        ff_inner_dim=64,
        rotary_dim=8,
        fourier_embedding_dim=16,
    )
    inputs = {"hidden_states": torch.randn(1, 4, 16), "timestep": _t(0.5), "encoder_hidden_states": _tok(1, 16, 8)}
    return _built(m, inputs)


def stable_audio3() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().StableAudio3DiTModel(
        io_channels=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        cond_token_dim=32,
        global_cond_dim=32,
        local_add_cond_dim=8,
        timestep_features_dim=16,
        ff_mult=2.0,
        num_memory_tokens=2,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 16),
        "timestep": _t(0.5),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "global_hidden_states": torch.randn(1, 32),
    }
    return _built(m, inputs)


def minimax_h3() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    # head_dim 16 rotates 2 * 3 * rope_freq_dim = 12 of its channels
    m = _diffusers().MiniMaxH3Transformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        ffn_dim=64,
        in_channels=4,
        audio_in_channels=4,
        patch_size=(1, 2, 2),
        text_dim=32,
        freq_dim=32,
        time_embed_hidden_dim=32,
        time_embed_dim=16,
        rope_freq_dim=2,
    )
    # one packed sequence: text rows, then video rows (1 frame of 2x4 patches), then audio rows
    n_txt, n_vid, n_aud = 4, 8, 4
    seq = n_txt + n_vid + n_aud
    tags = torch.tensor([1] * n_txt + [0] * n_vid + [2] * n_aud)
    position_ids = torch.zeros(seq, 3, dtype=torch.long)
    position_ids[:n_txt, 0] = torch.arange(n_txt)
    position_ids[n_txt : n_txt + n_vid] = _ids(1, 2, 4).long()
    position_ids[n_txt + n_vid :, 0] = torch.arange(n_aud)
    inputs = {
        "hidden_states": _tok(1, n_vid, 4 * 2 * 2),
        "audio_hidden_states": _tok(1, n_aud, 4),
        "encoder_hidden_states": _tok(1, n_txt, 32),
        "timestep": torch.tensor([0.5]),
        "timestep_indices": torch.zeros(seq, dtype=torch.long),
        "token_tags": tags,
        "position_ids": position_ids,
        "video_indices": torch.arange(n_txt, n_txt + n_vid),
        "audio_indices": torch.arange(n_txt + n_vid, seq),
        "text_indices": torch.arange(n_txt),
    }
    return _built(m, inputs)


def omnigen() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    head_dim = 16
    factors = [1.0] * (head_dim // 2)
    m = _diffusers().OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        num_layers=2,
        vocab_size=64,
        pad_token_id=0,
        max_position_embeddings=64,
        original_max_position_embeddings=32,
        rope_scaling={"short_factor": factors, "long_factor": factors},
        pos_embed_max_size=16,
        time_step_dim=32,
    )
    # no multimodal prompt: the sequence is the time token and the 4x4 latent patches
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "timestep": _t(0.5),
        "input_ids": None,
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": None,
        "position_ids": torch.arange(1 + 16)[None],
    }
    return _built(m, inputs)


def motif_video() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().MotifVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        text_embed_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8), "timestep": _t(), "encoder_hidden_states": _tok(1, TXT, 32)}
    return _built(m, inputs)


def nucleus_moe_image() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    # block 0 dense, block 1 a 4-expert MoE
    m = _diffusers().NucleusMoEImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        mlp_ratio=6.0,  # the dense block's FFN width rounds down to a multiple of 128: 32 * 6 * 2/3 = 128
        dense_moe_strategy="leave_first_block_dense",
        num_experts=4,
        moe_intermediate_dim=32,
        capacity_factors=2.0,  # each expert takes ceil(2 * tokens / 4) tokens; more than all tokens fails topk
    )
    # the packed expert weights are torch.empty (a checkpoint fills them): give them values
    for name, p in m.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
            nn.init.normal_(p, std=p.shape[1] ** -0.5)
    inputs = {
        "hidden_states": _tok(1, 16, 16),
        "img_shapes": [(1, 4, 4)],
        "encoder_hidden_states": _tok(1, TXT, 32),
        "encoder_hidden_states_mask": torch.ones(1, TXT, dtype=torch.bool),
        "timestep": _t(0.5),
    }
    return _built(m, inputs)


def qwen_image21() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=32,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )
    # no condition image: the joint sequence is the prompt then the target's 4 slots (each a 2x2 group of the 4x4
    # latent tokens); the output is the whole joint sequence [1, TXT + 16, 16]
    img_mask = torch.tensor([[False] * TXT + [True] * 4])
    inputs = {
        "hidden_states": _tok(1, 16, 16),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(0.5),
        "img_shapes": [[(1, 4, 4)]],
        "img_mask": img_mask,
    }
    return _built(m, inputs)


def _ltx2_kwargs() -> dict[str, Any]:
    return {
        "in_channels": 4,
        "out_channels": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "cross_attention_dim": 32,
        "audio_in_channels": 4,
        "audio_out_channels": 4,
        "audio_num_attention_heads": 2,
        "audio_attention_head_dim": 16,
        "audio_cross_attention_dim": 32,
        "num_layers": 2,
        "caption_channels": 32,
    }


def ltx2_video() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().LTX2VideoTransformer3DModel(**_ltx2_kwargs())
    inputs = {
        "hidden_states": _tok(1, 2 * 4 * 4, 4),
        "audio_hidden_states": _tok(1, 4, 4),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "audio_encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": _t(),
        "num_frames": 2,
        "height": 4,
        "width": 4,
        "audio_num_frames": 4,
    }
    return _built(m, inputs)


def sana_wm_ltx2_refiner() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    m = _diffusers().SanaWMLTX2RefinerTransformer3DModel(**_ltx2_kwargs())
    n = 2 * 4 * 4
    rotary = m.build_rotary_emb_for_absolute_positions(1, [0, 1], 4, 4, torch.device("cpu"), 24.0)
    inputs = {
        "hidden_states": _tok(1, n, 4),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "timestep": torch.full((1, n), 500.0),
        "video_rotary_emb": rotary,
    }
    return _built(m, inputs)


def sana_wm() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    # block 0 runs the GDN linear recurrence, block 1 (softmax_every_n=2) softmax attention
    m = _diffusers().SanaWMTransformer3DModel(
        in_channels=4,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        softmax_every_n=2,
        linear_head_dim=16,
        chunk_plucker_channels=8,
        chunk_plucker_post_attn_blocks=2,
        image_size=8,
        caption_channels=32,
        mlp_ratio=2.0,
        mixed_precision="fp32",
    )
    frames = 2
    inputs = {
        "hidden_states": torch.randn(1, 4, frames, 4, 4),
        "timestep": torch.full((1, 1, frames), 500.0),
        "encoder_hidden_states": _tok(1, TXT, 32)[:, None],
        "encoder_attention_mask": torch.ones(1, TXT),
    }
    return _built(m, inputs)


def wan_animate() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    # the motion encoder maps 8x8 face crops through one residual block to a 4x4 map, then a 4x4 conv to a vector
    m = _diffusers().WanAnimateTransformer3DModel(
        **{**_wan_kwargs(), "in_channels": 2 * 4 + 4},
        latent_channels=4,
        image_dim=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16},
        motion_encoder_size=8,
        motion_style_dim=32,
        motion_dim=8,
        motion_encoder_dim=32,
        face_encoder_hidden_dim=32,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
        motion_encoder_batch_size=4,
    )
    # latent frames: the reference frame + 1 video frame; the pose and the 4 face frames cover the video frame
    inputs = {
        "hidden_states": torch.randn(1, 2 * 4 + 4, 2, 8, 8),
        "timestep": _t(),
        "encoder_hidden_states": _tok(1, TXT, 32),
        "encoder_hidden_states_image": _tok(1, 4, 32),
        "pose_hidden_states": torch.randn(1, 4, 1, 8, 8),
        "face_pixel_values": torch.randn(1, 3, 4, 8, 8),
    }
    return _built(m, inputs)


def wan_animate2() -> tuple[nn.Module, dict]:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    torch.manual_seed(0)
    m = (
        _diffusers()
        .WanAnimate2Transformer3DModel(
            patch_size=(1, 2, 2),
            text_len=TXT,
            in_dim=4 + 4,
            dim=32,
            ffn_dim=64,
            freq_dim=32,
            text_dim=32,
            out_dim=4,
            num_heads=2,
            num_layers=2,
            use_img_emb=False,
        )
        .eval()
    )
    # the denoising step ("cached") attends to the reference tokens' K/V, which a reference pass ("extract") stores
    # first: run it once here in float; the case's forward is the denoising step. Latents are [C, F, H, W] per sample;
    # the 64x64-pixel, 4-frame video is 2 latent frames of 4x4 patches.
    cache = WanAnimate2KVCache(2)
    ref_grid = torch.tensor([[1, 4, 4]])
    prompt = [torch.randn(TXT, 32)]
    with torch.no_grad():
        m(
            hidden_states=[torch.randn(4, 1, 8, 8)],
            timestep=_t(),
            encoder_hidden_states=prompt,
            condition_latents=[torch.randn(4, 1, 8, 8)],
            kv_cache=cache,
            kv_cache_mode="extract",
            seq_len=16,
            offset_grid_sizes=ref_grid,
        )
    inputs = {
        "hidden_states": [torch.randn(4, 2, 8, 8)],
        "timestep": _t(),
        "encoder_hidden_states": prompt,
        "condition_latents": [torch.randn(4, 2, 8, 8)],
        "kv_cache": cache,
        "kv_cache_mode": "cached",
        "seq_len": 32,
        "reference_grid_sizes": ref_grid,
        "origin_len": 4,
        "origin_area": [64, 64],
    }
    return _built(m, inputs)


CASES: dict[str, Builder] = {
    "WanAnimate2Transformer3DModel": wan_animate2,
    "WanAnimateTransformer3DModel": wan_animate,
    "SanaWMTransformer3DModel": sana_wm,
    "LTX2VideoTransformer3DModel": ltx2_video,
    "SanaWMLTX2RefinerTransformer3DModel": sana_wm_ltx2_refiner,
    "MotifVideoTransformer3DModel": motif_video,
    "NucleusMoEImageTransformer2DModel": nucleus_moe_image,
    "QwenImage21Transformer2DModel": qwen_image21,
    "MiniMaxH3Transformer3DModel": minimax_h3,
    "OmniGenTransformer2DModel": omnigen,
    "Krea2Transformer2DModel": krea2,
    "MiniMaxMusic3Transformer1DModel": minimax_music3,
    "StableAudio3DiTModel": stable_audio3,
    "Kandinsky5Transformer3DModel": kandinsky5,
    "Kandinsky6SRTransformer3DModel": kandinsky6_sr,
    "Kandinsky6Transformer3DModel": kandinsky6,
    "LTXVideoTransformer3DModel": ltx_video,
    "LatteTransformer3DModel": latte,
    "LongCatImageTransformer2DModel": longcat_image,
    "Lumina2Transformer2DModel": lumina2,
    "LuminaNextDiT2DModel": lumina_next,
    "MochiTransformer3DModel": mochi,
    "OvisImageTransformer2DModel": ovis_image,
    "PRXTransformer2DModel": prx,
    "PixArtTransformer2DModel": pixart,
    "QwenImageTransformer2DModel": qwen_image,
    "SD3Transformer2DModel": sd3,
    "SanaTransformer2DModel": sana,
    "SanaVideoTransformer3DModel": sana_video,
    "SkyReelsV2Transformer3DModel": skyreels_v2,
    "StableAudioDiTModel": stable_audio,
    "Transformer2DModel": transformer_2d,
    "TransformerTemporalModel": transformer_temporal,
    "UNet1DModel": unet_1d,
    "UNet2DConditionModel": unet_2d_condition,
    "UNet2DModel": unet_2d,
    "UNet3DConditionModel": unet_3d_condition,
    "UNetControlNetXSModel": unet_controlnet_xs,
    "UNetMotionModel": unet_motion,
    "UNetSpatioTemporalConditionModel": unet_spatio_temporal,
    "WanTransformer3DModel": wan,
    "WanVACETransformer3DModel": wan_vace,
    "ZImageTransformer2DModel": z_image,
}

#: classes without a case, and why (none: every K–Z class of diffusers 0.42.1 builds small and runs on CPU)
NO_CASE: dict[str, str] = {}
