"""End to end: the shipped mini-sd pipeline quantized (``w4a16``, ``w8a8``) draws the same images under the default
dispatch (the CPU family, ``vqsuite.kernels.cpu``, where it is chosen) as under ``prefer("reference")``.

The CPU family rounds activations to bf16 at the kernel boundary (the reference stays fp32), so the images differ
by a small, bounded amount; the bound is a PSNR between the two image sets.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import vqsuite
import vqsuite.kernels as vk
from vqsuite import zoo

#: lowest PSNR (dB, images in [0, 1]) of default-dispatch images against the reference's; measured 2026-12-03 on
#: an AVX2 EPYC (2 prompts, 4 steps, 32x32): w4a16 51.6 dB, w8a8 38.2 dB (per-token INT8 codes flip at bf16-rounded
#: inputs); 30 dB leaves 8 dB of margin below the lower one
MIN_PSNR_DB = 30.0
PROMPT_DIGITS = (3, 7)
STEPS = 4


@functools.cache
def _pipe():  # noqa: ANN202
    return zoo.load("mini-sd")


def _images(pipe, model) -> torch.Tensor:  # noqa: ANN001
    prompts = [model.preprocess(d) for d in PROMPT_DIGITS]
    out = pipe(prompts, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@pytest.mark.parametrize("preset", ["w4a16", "w8a8"])
def test_mini_sd_default_dispatch_matches_reference(preset: str) -> None:
    m = _pipe()
    pipe = copy.deepcopy(m.model)
    vqsuite.quantize_pipeline(pipe, preset, num_calib_prompts=2, num_inference_steps=2)
    from vqsuite.kernels.cpu import CPU_QLINEAR

    layers = [mod for mod in pipe.unet.modules() if hasattr(mod, "qlinear_operands") and mod.frozen]
    assert layers
    x_probe = torch.randn(1, layers[0].gemm_shape[1])
    chosen = vk.select_impl("qlinear", "auto", layers[0].kernel_key, x=x_probe, ops=layers[0].qlinear_operands())
    assert chosen is CPU_QLINEAR, "the CPU family should run this preset at M=1 by default"
    with torch.no_grad():
        fast = _images(pipe, m)
        with vk.prefer("reference"):
            ref = _images(pipe, m)
    psnr = _psnr(fast, ref)
    assert psnr >= MIN_PSNR_DB, f"{preset}: default dispatch vs reference PSNR {psnr:.1f} dB < {MIN_PSNR_DB}"
    print(f"{preset}: PSNR {psnr:.1f} dB")
