"""Tiny instances of the newer diffusers DiTs (one to four blocks, width 32-64), built from configs, with the
keyword arguments of one forward: ``TINY_DITS[class_name]() -> (model, inputs)``; and a tiny pipeline around each
(tiny VAE, no text encoder: the call takes prompt embeddings): ``TINY_DIT_PIPELINES[class_name]() -> (pipe,
call_kwargs)``. No download."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Builder = Callable[[], tuple[nn.Module, dict[str, Any]]]
TINY_DITS: dict[str, Builder] = {}

#: batch, latent side and text length of the forward inputs
B, SIDE, TXT = 2, 8, 6


def _register(fn: Builder) -> Builder:
    TINY_DITS[fn.__name__.removeprefix("tiny_")] = fn
    return fn


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed))


def _t() -> torch.Tensor:
    return torch.tensor([500.0, 900.0])[:B]


@_register
def tiny_SanaTransformer2DModel(width: int = 32, mlp_ratio: float = 2.0) -> tuple[nn.Module, dict[str, Any]]:
    """``width`` (a multiple of 8) and ``mlp_ratio`` let a test build one whose shapes defeat a recipe."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    m = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=width // 8,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=width // 8,
        cross_attention_head_dim=8,
        cross_attention_dim=width,
        caption_channels=width,
        mlp_ratio=mlp_ratio,
        sample_size=SIDE,
        patch_size=1,
    )
    inputs = {
        "hidden_states": _randn(B, 4, SIDE, SIDE),
        "encoder_hidden_states": _randn(B, TXT, width, seed=2),
        "timestep": _t(),
    }
    return m, inputs


@_register
def tiny_Lumina2Transformer2DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    m = Lumina2Transformer2DModel(
        sample_size=SIDE,
        patch_size=2,
        in_channels=4,
        hidden_size=64,  # k/v of the 2 kv heads are 32 wide: room for a rank-32 branch
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(32, 32, 32),
        cap_feat_dim=32,
    )
    inputs = {
        "hidden_states": _randn(B, 4, SIDE, SIDE),
        "timestep": torch.tensor([0.3, 0.7])[:B],
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "encoder_attention_mask": torch.ones(B, TXT, dtype=torch.bool),
    }
    return m, inputs


@_register
def tiny_CogView4Transformer2DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    m = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=32,
        condition_dim=8,
        pos_embed_max_size=16,
        sample_size=SIDE,
        rope_axes_dim=(8, 8),
    )
    size = torch.tensor([[64.0, 64.0]] * B)
    inputs = {
        "hidden_states": _randn(B, 4, SIDE, SIDE),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "timestep": _t(),
        "original_size": size,
        "target_size": size,
        "crop_coords": torch.zeros(B, 2),
    }
    return m, inputs


@_register
def tiny_AuraFlowTransformer2DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    m = AuraFlowTransformer2DModel(
        sample_size=SIDE,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    inputs = {
        "hidden_states": _randn(B, 4, SIDE, SIDE),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "timestep": _t(),
    }
    return m, inputs


def _flux_ids(n_axes: int) -> tuple[torch.Tensor, torch.Tensor]:
    side = SIDE // 2
    img = torch.zeros(side, side, n_axes)
    img[..., 1] = torch.arange(side)[:, None]
    img[..., 2] = torch.arange(side)[None, :]
    return img.reshape(side * side, n_axes), torch.zeros(TXT, n_axes)


@_register
def tiny_ChromaTransformer2DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    m = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    img_ids, txt_ids = _flux_ids(3)
    inputs = {
        "hidden_states": _randn(B, (SIDE // 2) ** 2, 16),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "timestep": torch.tensor([0.3, 0.7])[:B],
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }
    return m, inputs


@_register
def tiny_QwenImageTransformer2DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    side = SIDE // 2
    inputs = {
        "hidden_states": _randn(B, side * side, 16),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "encoder_hidden_states_mask": torch.ones(B, TXT, dtype=torch.long),
        "timestep": torch.tensor([0.3, 0.7])[:B],
        "img_shapes": [[(1, side, side)]] * B,
    }
    return m, inputs


@_register
def tiny_WanTransformer3DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    )
    inputs = {
        "hidden_states": _randn(B, 4, 2, SIDE, SIDE),
        "timestep": _t(),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
    }
    return m, inputs


@_register
def tiny_LTXVideoTransformer3DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    frames = 2
    inputs = {
        "hidden_states": _randn(B, frames * SIDE * SIDE, 8),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "timestep": _t(),
        "encoder_attention_mask": torch.ones(B, TXT, dtype=torch.long),
        "num_frames": frames,
        "height": SIDE,
        "width": SIDE,
    }
    return m, inputs


@_register
def tiny_HunyuanDiT2DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    m = HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        patch_size=2,
        sample_size=SIDE,
        hidden_size=32,
        num_layers=4,  # the fourth block has the long-skip linear
        mlp_ratio=2.0,
        cross_attention_dim=32,
        cross_attention_dim_t5=32,
        pooled_projection_dim=32,
        text_len=TXT,
        text_len_t5=TXT,
        use_style_cond_and_image_meta_size=False,
    )
    inputs = {
        "hidden_states": _randn(B, 4, SIDE, SIDE),
        "timestep": _t(),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "text_embedding_mask": torch.ones(B, TXT, dtype=torch.long),
        "encoder_hidden_states_t5": _randn(B, TXT, 32, seed=3),
        "text_embedding_mask_t5": torch.ones(B, TXT, dtype=torch.long),
    }
    return m, inputs


@_register
def tiny_Flux2Transformer2DModel() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    m = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )
    img_ids, txt_ids = _flux_ids(4)
    inputs = {
        "hidden_states": _randn(B, (SIDE // 2) ** 2, 16),
        "encoder_hidden_states": _randn(B, TXT, 32, seed=2),
        "timestep": torch.tensor([0.3, 0.7])[:B],
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": torch.tensor([3.5] * B),
    }
    return m, inputs


# ------------------------------------------------------------------------------ pipelines
# Text encoders of these pipelines (Gemma2, GLM, UMT5, Qwen2.5-VL) are left out: the pipelines take
# ``prompt_embeds`` (and masks) instead, which ``pipeline_call_kwargs`` returns. ``w4a4`` needs no calibration run.

#: pixel side of the generated image and the text length of the prompt embeddings
PIPE_SIDE, PIPE_TXT = 32, 6


def _kl_vae(latent_channels: int, block_out_channels: tuple[int, ...] = (8, 16)):
    """A tiny AutoencoderKL downsampling ``2 ** (len(block_out_channels) - 1)`` times."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=PIPE_SIDE,
        shift_factor=0.0,  # Lumina2 and CogView4 add it when decoding
    )


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def _embeds(dim: int = 32, seed: int = 7) -> torch.Tensor:
    return _randn(1, PIPE_TXT, dim, seed=seed)


def pipe_SanaTransformer2DModel(width: int = 32, mlp_ratio: float = 2.0) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline

    transformer, _ = tiny_SanaTransformer2DModel(width, mlp_ratio)
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    pipe = SanaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DPMSolverMultistepScheduler()
    )
    call = {
        "prompt_embeds": _embeds(width),
        "prompt_attention_mask": torch.ones(1, PIPE_TXT, dtype=torch.long),
        "guidance_scale": 1.0,
        "use_resolution_binning": False,
    }
    return pipe, call


def pipe_Lumina2Transformer2DModel() -> tuple[Any, dict[str, Any]]:
    from diffusers import Lumina2Pipeline

    transformer, _ = tiny_Lumina2Transformer2DModel()
    vae = _kl_vae(4, (8, 8, 8, 8))  # the pipeline assumes an 8x VAE
    pipe = Lumina2Pipeline(
        transformer=transformer, scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None
    )
    call = {
        "prompt_embeds": _embeds(),
        "prompt_attention_mask": torch.ones(1, PIPE_TXT, dtype=torch.long),
        "guidance_scale": 1.0,
    }
    return pipe, call


def pipe_CogView4Transformer2DModel() -> tuple[Any, dict[str, Any]]:
    from diffusers import CogView4Pipeline

    transformer, _ = tiny_CogView4Transformer2DModel()
    pipe = CogView4Pipeline(
        tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=transformer, scheduler=_flow_scheduler()
    )
    return pipe, {"prompt_embeds": _embeds(), "guidance_scale": 1.0}


def pipe_AuraFlowTransformer2DModel() -> tuple[Any, dict[str, Any]]:
    from diffusers import AuraFlowPipeline

    transformer, _ = tiny_AuraFlowTransformer2DModel()
    pipe = AuraFlowPipeline(
        tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=transformer, scheduler=_flow_scheduler()
    )
    call = {
        "prompt_embeds": _embeds(),
        "prompt_attention_mask": torch.ones(1, PIPE_TXT, dtype=torch.long),
        "guidance_scale": 1.0,
    }
    return pipe, call


def pipe_QwenImageTransformer2DModel() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    transformer, _ = tiny_QwenImageTransformer2DModel()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = QwenImagePipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    call = {"prompt_embeds": _embeds(), "prompt_embeds_mask": torch.ones(1, PIPE_TXT, dtype=torch.long)}
    return pipe, call


def pipe_ChromaTransformer2DModel() -> tuple[Any, dict[str, Any]]:
    from diffusers import ChromaPipeline

    transformer, _ = tiny_ChromaTransformer2DModel()
    pipe = ChromaPipeline(
        scheduler=_flow_scheduler(), vae=_kl_vae(4), text_encoder=None, tokenizer=None, transformer=transformer
    )
    call = {
        "prompt_embeds": _embeds(),
        "prompt_attention_mask": torch.ones(1, PIPE_TXT, dtype=torch.bool),  # SDPA takes a bool or float mask
        "guidance_scale": 1.0,
    }
    return pipe, call


def pipe_HunyuanDiT2DModel() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDPMScheduler, HunyuanDiTPipeline

    transformer, _ = tiny_HunyuanDiT2DModel()
    pipe = HunyuanDiTPipeline(
        vae=_kl_vae(4, (8, 8, 8, 8)),  # the pipeline's rotary grid assumes an 8x VAE
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    ones = torch.ones(1, PIPE_TXT, dtype=torch.long)
    call = {
        "prompt_embeds": _embeds(),
        "prompt_attention_mask": ones,
        "prompt_embeds_2": _embeds(seed=8),
        "prompt_attention_mask_2": ones,
        "guidance_scale": 1.0,
        "use_resolution_binning": False,
    }
    return pipe, call


def pipe_WanTransformer3DModel() -> tuple[Any, dict[str, Any]]:
    """Text-to-video: three frames of 32x32 (the call returns ``.frames`` ``[1, F, 3, H, W]``)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    transformer, _ = tiny_WanTransformer3DModel()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
        scale_factor_temporal=1,
        scale_factor_spatial=2,
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_flow_scheduler(), transformer=transformer)
    return pipe, {"prompt_embeds": _embeds(), "guidance_scale": 1.0, "num_frames": 3}


def pipe_LTXVideoTransformer3DModel() -> tuple[Any, dict[str, Any]]:
    """Text-to-video: two frames of 32x32 through a one-block LTX VAE (4x spatial patching, no temporal scaling)."""
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline

    transformer, _ = tiny_LTXVideoTransformer3DModel()
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8,),
        down_block_types=("LTXVideoDownBlock3D",),
        decoder_block_out_channels=(8,),
        layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(False,),
        decoder_spatio_temporal_scaling=(False,),
        decoder_inject_noise=(False, False),
        downsample_type=("conv",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        patch_size=4,
        patch_size_t=1,
    )
    pipe = LTXPipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    call = {
        "prompt_embeds": _embeds(),
        "prompt_attention_mask": torch.ones(1, PIPE_TXT, dtype=torch.long),
        "guidance_scale": 1.0,
        "num_frames": 2,
    }
    return pipe, call


def pipe_Flux2Transformer2DModel() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline

    transformer, _ = tiny_Flux2Transformer2DModel()
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,  # patchified 2x2 into the transformer's 16 input channels
        norm_num_groups=8,
        sample_size=PIPE_SIDE,
    )
    pipe = Flux2Pipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    return pipe, {"prompt_embeds": _embeds(), "guidance_scale": 1.0}


TINY_DIT_PIPELINES: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    n.removeprefix("pipe_"): f for n, f in globals().items() if n.startswith("pipe_") and callable(f)
}
