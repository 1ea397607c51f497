"""QALoRA learning-rate scale and loss weighting on ``mini-sd``, judged by the images: PSNR vs FP of the same seeds.

FP images first (30: three per digit, seeds 1000+i, 20 DDIM steps, guidance 4). Then, for each ``lr_scale``
(``0`` = the PTQ pipeline, no fine-tuning), the UNet is quantized with ``--preset`` (calibrated on the ten digit
prompts), fine-tuned with :func:`vqsuite.finetune.qalora` for ``--steps`` updates, frozen, and sampled from the same
seeds; one JSON line per setting with the PSNR of its digits against the FP digits. (The denoiser-error view of the
same sweep is ``qalora_lr.py``; the full table with FID and alignment is ``diffusion_quality.py``.)

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/qalora_psnr.py --preset w4a4 --steps 200 \\
        --lr-scales 0,1/2500,1/250,1/50,1/10 [--loss-weighting x0]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from fractions import Fraction
from typing import Any

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="w4a4")
    p.add_argument("--steps", type=int, default=200, help="QALoRA updates")
    p.add_argument("--lr-scales", default="0,1/2500,1/50,1/10", help="comma-separated; 0 = PTQ only")
    p.add_argument("--loss-weighting", default="eps")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from digits_common import rgb

    import vqsuite.zoo as zoo
    from vqsuite.evals.fidelity import paired_metrics
    from vqsuite.finetune import qalora
    from vqsuite.pipelines.diffusers import quantize_pipeline
    from vqsuite.zoo.mini_sd import images_to_digits, prompt

    prompts = [prompt(k) for k in range(10)]
    digits = torch.arange(10).repeat_interleave(3)

    def load() -> Any:
        pipe = zoo.load("mini-sd").model
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(pipe: Any) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(digits.numel())]
        out = pipe([prompt(int(d)) for d in digits], num_inference_steps=20, guidance_scale=4.0, generator=gens,
                   output_type="pt")  # fmt: skip
        return images_to_digits(out.images)

    fp = sample(load())
    for text in a.lr_scales.split(","):
        lr = float(Fraction(text))
        pipe = load()
        teacher = copy.deepcopy(pipe.unet)
        quantize_pipeline(pipe, a.preset, freeze=lr == 0, calib_prompts=prompts, guidance_scale=4.0,
                          calib_batch_size=10)  # fmt: skip
        if lr > 0:
            qalora(pipe, a.preset, steps=a.steps, teacher=teacher, prompts=prompts, num_inference_steps=20,
                   guidance_scale=4.0, batch_size=2, progress=False, lr_scale=lr,
                   loss_weighting=a.loss_weighting)  # fmt: skip
        psnr = paired_metrics(rgb(fp), rgb(sample(pipe)))["psnr"]
        row = {"preset": a.preset, "lr_scale": text, "updates": a.steps if lr > 0 else 0,
               "loss_weighting": a.loss_weighting if lr > 0 else None, "n": int(digits.numel()),
               "psnr_vs_fp": round(psnr, 2)}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
