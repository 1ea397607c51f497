"""Weight memory of a FLUX.1-sized transformer, bf16 against vqsuite's quantized storage, with no weights at all.

The float model is built from the real FLUX.1 config on the meta device; the quantized structure comes from
``vqsuite.pipelines.rules.quantized_structure`` (the same architecture rule as ``quantize_pipeline``: embedders,
final norm/projection 16-bit, adaLN modulation W4A16), whose layers are frozen with empty meta storage, so
``vqsuite.module_nbytes`` counts exactly the bytes a real frozen checkpoint holds (numel * element_size). No SVD,
no quantization, no data; runs in seconds on a CPU.

Run: .venv/bin/python benchmarks/flux_memory.py [--presets svdquant-int4 nvfp4 ...] [--others]
``--others`` adds SD1.5, SDXL, PixArt-Sigma and SD3-medium denoisers (configs written out below).
Target (SVDQuant paper / nunchaku README): FLUX.1 model 3.6x smaller than BF16 at W4A4 + rank 32.
"""

from __future__ import annotations

import argparse
import time

import torch

import vqsuite
from vqsuite.pipelines.rules import quantized_structure

DEFAULT_PRESETS = ("svdquant-int4", "svdquant-nvfp4", "w4a4", "nvfp4", "w4a16")

#: FLUX.1-dev / schnell transformer (black-forest-labs/FLUX.1-dev transformer/config.json)
FLUX1 = dict(
    patch_size=1,
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
#: SD 1.5 UNet (the UNet2DConditionModel defaults with 768-wide text)
SD15 = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
#: SDXL base UNet
SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
#: PixArt-Sigma XL 1024
PIXART_SIGMA = dict(
    sample_size=128,
    num_layers=28,
    attention_head_dim=72,
    num_attention_heads=16,
    caption_channels=4096,
    cross_attention_dim=1152,
    in_channels=4,
    out_channels=8,
    patch_size=2,
    norm_type="ada_norm_single",
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    attention_bias=True,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=2,
    use_additional_conditions=False,
)
#: SD3-medium MMDiT
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)


def build(cls_name: str, config: dict) -> torch.nn.Module:
    """A bf16 denoiser on the meta device (parameters and buffers), from a config dict."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**config)
    return model.to(torch.bfloat16)


def measure(cls_name: str, config: dict, presets: tuple[str, ...]) -> list[tuple[str, int, int, float]]:
    rows = []
    for preset in presets:
        model = build(cls_name, config)
        before = vqsuite.module_nbytes(model)
        t0 = time.perf_counter()
        swapped = quantized_structure(model, preset)
        after = vqsuite.module_nbytes(model)
        rows.append((preset, before, after, time.perf_counter() - t0, len(swapped)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    ap.add_argument("--others", action="store_true", help="also SD1.5, SDXL, PixArt-Sigma, SD3-medium")
    args = ap.parse_args()
    models = [("FLUX.1 transformer", "FluxTransformer2DModel", FLUX1)]
    if args.others:
        models += [
            ("SD1.5 UNet", "UNet2DConditionModel", SD15),
            ("SDXL UNet", "UNet2DConditionModel", SDXL),
            ("PixArt-Sigma transformer", "PixArtTransformer2DModel", PIXART_SIGMA),
            ("SD3-medium transformer", "SD3Transformer2DModel", SD3_MEDIUM),
        ]
    print("| model | params | preset | bf16 GiB | quantized GiB | x smaller | layers swapped |")
    print("|---|---|---|---|---|---|---|")
    for label, cls_name, config in models:
        n_params = sum(p.numel() for p in build(cls_name, config).parameters())
        for preset, before, after, _secs, n in measure(cls_name, config, tuple(args.presets)):
            print(
                f"| {label} | {n_params / 1e9:.2f}B | {preset} | {before / 2**30:.2f} | {after / 2**30:.2f} "
                f"| {before / after:.2f} | {n} |"
            )


if __name__ == "__main__":
    main()
