"""Latent drift of a quantized ``mini-sd`` from the FP pipeline along its own sampling trajectory, before and after
QALoRA.

Same seeds and prompts for the FP, the PTQ and the QALoRA-tuned pipeline (20 DDIM steps, guidance 4, two images per
digit); after every step the mean squared distance between each pipeline's latents and the FP latents is printed.
A per-step denoiser error that is small but coherent from step to step shows up as a distance that keeps growing;
the sampler damps incoherent (rounding-like) errors.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/qalora_drift.py --preset w4a4 --steps 200 \\
        --lr-scale 1/10
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from fractions import Fraction
from typing import Any

import torch


def latents_per_step(pipe: Any, prompts: list[str], seed: int) -> list[torch.Tensor]:
    """Latents after each sampling step: ``[num_steps]`` tensors ``[N, C, h, w]``."""
    xs: list[torch.Tensor] = []

    def keep(_pipe: Any, _i: int, _t: Any, kw: dict) -> dict:
        xs.append(kw["latents"].clone())
        return kw

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    pipe(prompts, num_inference_steps=20, guidance_scale=4.0, generator=gens, output_type="latent",
         callback_on_step_end=keep)  # fmt: skip
    return xs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="w4a4")
    p.add_argument("--steps", type=int, default=200, help="QALoRA updates")
    p.add_argument("--lr-scale", default="1/2500")
    p.add_argument("--loss-weighting", default="eps")
    p.add_argument("--seed", type=int, default=1000)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import vqsuite.zoo as zoo
    from vqsuite.finetune import qalora
    from vqsuite.pipelines.diffusers import quantize_pipeline
    from vqsuite.zoo.mini_sd import prompt

    digit_prompts = [prompt(k) for k in range(10)]
    prompts = [prompt(k) for k in range(10) for _ in range(2)]

    def load() -> Any:
        pipe = zoo.load("mini-sd").model
        pipe.set_progress_bar_config(disable=True)
        return pipe

    fp = latents_per_step(load(), prompts, a.seed)
    pipe = load()
    teacher = copy.deepcopy(pipe.unet)
    quantize_pipeline(pipe, a.preset, freeze=False, calib_prompts=digit_prompts, guidance_scale=4.0,
                      calib_batch_size=10)  # fmt: skip

    def drift(xs: list[torch.Tensor]) -> list[float]:
        return [round(float(((x - y) ** 2).mean()), 5) for x, y in zip(xs, fp, strict=True)]

    print(json.dumps({"pipeline": f"{a.preset} PTQ", "drift_per_step": drift(latents_per_step(pipe, prompts, a.seed))}))
    qalora(pipe, a.preset, steps=a.steps, teacher=teacher, prompts=digit_prompts, num_inference_steps=20,
           guidance_scale=4.0, batch_size=2, progress=False, lr_scale=float(Fraction(a.lr_scale)),
           loss_weighting=a.loss_weighting)  # fmt: skip
    label = f"{a.preset} + QALoRA ({a.steps} updates, lr_scale {a.lr_scale}, {a.loss_weighting})"
    print(json.dumps({"pipeline": label, "drift_per_step": drift(latents_per_step(pipe, prompts, a.seed))}))


if __name__ == "__main__":
    main()
