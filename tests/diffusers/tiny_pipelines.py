"""Tiny diffusers pipelines built offline from configs (random weights, hand-made tokenizers).

Every builder takes ``width`` (the denoiser's hidden size / base channel count) so a test can ask for layers wide
enough for INT4 g64 groups and a meaningful compression ratio. Modules are put in eval mode (T5's default dropout
would otherwise make outputs random). Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

import torch

from vqsuite.zoo.mini_sd import bytes_to_unicode

CLIP_VOCAB_EXTRA = ["<|startoftext|>", "<|endoftext|>"]
T5_PIECES = ["<pad>", "</s>", "<unk>"] + [f"\u2581{w}" for w in "a the of in on with and photo cat dog red".split()]


@cache
def _clip_tokenizer_dir() -> str:
    """A CLIP BPE tokenizer folder: 256 byte characters, their ``</w>`` forms, two merges, the specials."""
    folder = Path(tempfile.mkdtemp(prefix="vqsuite-clip-tok-"))
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["th", "the</w>"] + CLIP_VOCAB_EXTRA
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return str(folder)


def clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(_clip_tokenizer_dir())
    tok.model_max_length = max_length
    return tok


def t5_tokenizer(max_length: int = 16):
    from transformers import T5Tokenizer

    tok = T5Tokenizer(vocab=[(p, -float(i)) for i, p in enumerate(T5_PIECES)], extra_ids=0)
    tok.model_max_length = max_length
    return tok


def clip_text(hidden: int = 32, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=512 + 2,
        eos_token_id=512 + 3,
        pad_token_id=1,
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval()


def t5_encoder(d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return T5EncoderModel(cfg).eval()


def vae(latent_channels: int = 4, seed: int = 0, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        **kw,
    ).eval()


# --------------------------------------------------------------------------- pipelines
def sd15(width: int = 64, seed: int = 0):
    """SD 1.5-style: UNet2DConditionModel with 1x1-conv transformer projections, one CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(width, width),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()
    return StableDiffusionPipeline(
        vae=vae(seed=seed),
        text_encoder=clip_text(64, seed=seed),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl(width: int = 64, seed: int = 0):
    """SDXL-style: linear transformer projections, text_time added embedding, two CLIP encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(width, width),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=16,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=vae(seed=seed),
        text_encoder=clip_text(32, seed=seed),
        text_encoder_2=clip_text(32, projection=32, seed=seed + 1),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
    )


def flux_transformer(width: int = 128, seed: int = 0, num_layers: int = 1, num_single_layers: int = 1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    heads = width // 32
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    ).eval()


def flux(width: int = 128, seed: int = 0, num_layers: int = 1, num_single_layers: int = 1):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text(32, seed=seed),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(64, seed=seed),
        tokenizer_2=t5_tokenizer(),
        transformer=flux_transformer(width, seed, num_layers, num_single_layers),
    )


def pixart_transformer(width: int = 128, seed: int = 0, num_layers: int = 2):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=32,
        num_attention_heads=width // 32,
        caption_channels=64,
        in_channels=4,
        cross_attention_dim=width,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=1,
    ).eval()


def pixart(width: int = 128, seed: int = 0, num_layers: int = 1):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(64, seed=seed),
        vae=vae(seed=seed),
        transformer=pixart_transformer(width, seed, num_layers),
        scheduler=DPMSolverMultistepScheduler(),
    )


def sd3(width: int = 128, seed: int = 0, num_layers: int = 2):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=32,
        num_attention_heads=width // 32,
        caption_projection_dim=width,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text(32, projection=32, seed=seed),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(32, projection=32, seed=seed + 1),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(64, seed=seed),
        tokenizer_3=t5_tokenizer(),
    )


def ddpm(width: int = 64, seed: int = 0):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        block_out_channels=(width, width),
        layers_per_block=1,
        sample_size=16,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    ).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def dit(width: int = 128, seed: int = 0):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=width // 32,
        attention_head_dim=32,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    return DiTPipeline(
        transformer=transformer,
        vae=vae(seed=seed),
        scheduler=DDIMScheduler(steps_offset=1),
        id2label={i: f"class{i}" for i in range(10)},
    )


#: denoiser width per pipeline in the tests: every quantized linear's K is a multiple of 64 (INT4 g64 groups)
TEST_WIDTH = {"sd15": 64, "sdxl": 64, "ddpm": 64, "flux": 128, "pixart": 128, "sd3": 128, "dit": 128}
#: extra keyword arguments of the pipeline's __call__ in the tests (calibration runs included)
CALL_KWARGS = {"pixart": {"use_resolution_binning": False}}
TEXT_PIPELINES = ("sd15", "sdxl", "flux", "pixart", "sd3")

BUILDERS = {"sd15": sd15, "sdxl": sdxl, "flux": flux, "pixart": pixart, "sd3": sd3, "ddpm": ddpm, "dit": dit}


def generate(pipe, name: str, seed: int = 0, steps: int = 2) -> torch.Tensor:
    """Run ``pipe`` for ``steps`` steps with a fixed seed; images as a float tensor (numpy output)."""
    g = torch.Generator().manual_seed(seed)
    if name == "ddpm":
        out = pipe(batch_size=1, generator=g, num_inference_steps=steps, output_type="np")
    elif name == "dit":
        out = pipe(class_labels=[1], generator=g, num_inference_steps=steps, output_type="np")
    else:
        kw = {"height": 32, "width": 32}
        if name == "pixart":
            kw.update(clean_caption=False, use_resolution_binning=False)
        if name == "sdxl":
            kw.update(original_size=(32, 32), target_size=(32, 32))
        out = pipe("a red cat on the mat", generator=g, num_inference_steps=steps, output_type="np", **kw)
    return torch.from_numpy(out.images)


# --------------------------------------------------------------------------- quantized, cached
#: SVDQuant options for pipeline tests: a 3-point smoothing grid, no low-rank refinement (seconds, not minutes)
FAST_SVDQUANT = {"num_grids": 2, "lowrank_iters": 1}


def preset_config(preset: str):
    """The preset, with the fast SVDQuant options when it is an SVDQuant one."""
    from vqsuite.config import get_preset

    cfg = get_preset(preset)
    if cfg.method == "svdquant":
        cfg = cfg.with_overrides(method_options=FAST_SVDQUANT)
    return cfg


def quantize(name: str, preset: str, pipe=None, **kw):
    """Build (unless given) and quantize pipeline ``name`` with 2 calibration samples x 2 steps."""
    from vqsuite.pipelines.diffusers import quantize_pipeline

    pipe = pipe if pipe is not None else BUILDERS[name](TEST_WIDTH[name])
    kwargs = dict(num_calib_prompts=2, num_inference_steps=2, calib_batch_size=2, **CALL_KWARGS.get(name, {}))
    if name in TEXT_PIPELINES:
        kwargs.update(height=32, width=32)
    kwargs.update(kw)
    config = kwargs.pop("config", None) or preset_config(preset)
    return quantize_pipeline(pipe, config, **kwargs)


_CACHE: dict[tuple[str, str], tuple] = {}


def quantized(name: str, preset: str):
    """``(pipe, images)``: pipeline ``name`` quantized with ``preset`` and its 2-step images, built once per
    session (read-only: tests must not change the pipeline)."""
    key = (name, preset)
    if key not in _CACHE:
        pipe = quantize(name, preset)
        _CACHE[key] = (pipe, generate(pipe, name))
    return _CACHE[key]


# --------------------------------------------------------------------------- a denoiser no rule knows
from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402


class TinyDenoiser(ModelMixin, ConfigMixin):
    """An unconditional denoiser of a class no vqsuite rule names (for the generic-rule fallback)."""

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.temb = torch.nn.Linear(width, width)
        self.mix = torch.nn.Conv2d(width, width, 1)
        self.fc1 = torch.nn.Linear(width, 2 * width)
        self.fc2 = torch.nn.Linear(2 * width, width)
        self.conv_out = torch.nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        width = self.config.width
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1)[:1]
        freqs = torch.exp(-torch.arange(width // 2, dtype=sample.dtype) / (width // 2) * 4.0)
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=-1)
        h = self.conv_in(sample) + self.temb(emb)[:, :, None, None]
        h = self.mix(torch.nn.functional.silu(h))
        x = h.permute(0, 2, 3, 1)
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        out = self.conv_out(x.permute(0, 3, 1, 2))
        return UNet2DOutput(sample=out) if return_dict else (out,)


def custom_ddpm(width: int = 64, seed: int = 0):
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    return DDPMPipeline(unet=TinyDenoiser(width=width).eval(), scheduler=DDPMScheduler(num_train_timesteps=1000))
