"""``vqsuite demo`` main job: the suite's own trained text-to-image pipeline (``mini-sd``) at 4 bits.

Steps: load ``mini-sd`` (a real ``StableDiffusionPipeline`` trained here on MNIST digits, shipped in the package);
generate one image per digit prompt ("a photo of the digit seven") in full precision; quantize the UNet with
``svdquant-int4`` (calibrated on the same prompt language); generate again with the same seeds; write the two
rows side by side as one grid and print the UNet's memory before/after, the paired fidelity (PSNR/SSIM against
the FP images) and the prompt alignment of both, judged by an independent shipped MNIST classifier
(``mnist-cnn3``: the honest offline stand-in for a CLIP score).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEMO_SD_PRESET = "svdquant-int4"
#: denoising steps of the demo's sampling and calibration runs
DEMO_SD_STEPS = 20


def mini_sd_available() -> bool:
    """Whether the trained ``mini-sd`` pipeline ships in this install."""
    from vqsuite import zoo

    return "mini-sd" in zoo.list()


def _alignment(images: torch.Tensor, digits: list[int], judge: Any) -> float:
    """Fraction of ``images`` (uint8 ``[N, 3, 32, 32]``) the MNIST judge labels as the prompted digit."""
    from vqsuite.zoo.mini_sd import images_to_digits

    with torch.no_grad():
        logits = judge.model(judge.preprocess(images_to_digits(images.float() / 255)))
    return float((logits.argmax(-1) == torch.tensor(digits)).float().mean())


def run_sd_demo(
    out: str | Path,
    preset: str = DEMO_SD_PRESET,
    steps: int = DEMO_SD_STEPS,
    seed: int = 0,
    per_digit: int = 1,
    pipe: Any = None,
    shown_as: str | Path | None = None,
) -> dict[str, Any]:
    """Run the main job; writes ``grid.png`` (row 1 FP, row 2 quantized), ``fp/``, ``quantized/`` and
    ``demo.json`` under ``out`` and returns the numbers (also printed).

    ``out`` is written atomically (:func:`vqsuite.fileio.atomic_folder`): an earlier demo output there is replaced
    only when it holds nothing but the files the demo wrote; anything else is refused before any work.
    ``shown_as``: the path printed for ``out`` (when ``out`` is a temporary folder that is renamed later)."""
    import vqsuite
    from vqsuite import zoo
    from vqsuite.evals.fidelity import paired_metrics, sample_pipeline
    from vqsuite.evals.images import image_grid, save_images
    from vqsuite.fileio import OutputInUseError, atomic_folder, replace_problem
    from vqsuite.pipelines.report import module_nbytes
    from vqsuite.zoo.mini_sd import prompt

    out = Path(out)
    shown = Path(shown_as) if shown_as is not None else out
    problem = replace_problem(out, "demo")
    if problem is not None:  # before minutes of sampling and calibration
        raise OutputInUseError(f"{out} {problem}; refusing to replace it")
    t0 = time.perf_counter()
    pipe = pipe if pipe is not None else zoo.load("mini-sd").model
    judge = zoo.load("mnist-cnn3")
    digits = [k for k in range(10) for _ in range(per_digit)]
    prompts = [prompt(k) for k in digits]
    seeds = [seed + i for i in range(len(prompts))]
    print(f"vqsuite {vqsuite.__version__} demo: mini-sd (StableDiffusionPipeline trained here on MNIST) -> {preset}")

    fp = sample_pipeline(pipe, seeds, prompts, num_inference_steps=steps)
    fp_bytes = module_nbytes(pipe.unet)
    t_cal = time.perf_counter()
    vqsuite.quantize_pipeline(pipe, preset, calib_prompts=[prompt(k) for k in range(10)], num_inference_steps=steps)
    calib_s = time.perf_counter() - t_cal
    q_bytes = module_nbytes(pipe.unet)
    q = sample_pipeline(pipe, seeds, prompts, num_inference_steps=steps)

    fid = paired_metrics(fp, q)
    result = {
        "pipeline": "mini-sd",
        "preset": preset,
        "steps": steps,
        "n_images": len(prompts),
        "seeds": seeds,
        "unet_bytes_fp": fp_bytes,
        "unet_bytes_quantized": q_bytes,
        "unet_compression": fp_bytes / max(q_bytes, 1),
        "psnr_db_vs_fp": fid["psnr"],
        "ssim_vs_fp": fid["ssim"],
        "alignment_fp": _alignment(fp, digits, judge),
        "alignment_quantized": _alignment(q, digits, judge),
        "calibration_s": round(calib_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "judge": "mnist-cnn3 (shipped MNIST CNN, 99.06% on MNIST test)",
    }
    from PIL import Image

    grid = image_grid([fp, q])
    with atomic_folder(out, kind="demo") as tmp:
        save_images(fp, tmp / "fp")
        save_images(q, tmp / "quantized")
        Image.fromarray(grid.permute(1, 2, 0).numpy()).resize((grid.shape[2] * 3, grid.shape[1] * 3), 0).save(
            tmp / "grid.png"
        )
        (tmp / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"UNet memory: {fp_bytes / 2**20:.2f} MiB -> {q_bytes / 2**20:.2f} MiB ({result['unet_compression']:.2f}x)")
    print(f"fidelity to FP (same seeds, n={len(prompts)}): PSNR {fid['psnr']:.2f} dB, SSIM {fid['ssim']:.3f}")
    print(
        f"prompt alignment judged by mnist-cnn3 (n={len(prompts)}): FP {result['alignment_fp']:.0%}, "
        f"{preset} {result['alignment_quantized']:.0%}"
    )
    print(f"grid (row 1 FP, row 2 {preset}, digits 0-9): {shown / 'grid.png'}  [{result['total_s']} s]")
    return result
