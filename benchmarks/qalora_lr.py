"""QALoRA learning-rate scale on the trained ``mini-sd``: held-out denoiser error before and after fine-tuning.

For each ``lr_scale`` (each layer's LoRA learning rate is ``lr_scale · mean weight scale``; the official EfficientDM
code uses 1/2500 for 16k updates) the UNet is quantized with ``--preset`` (calibrated on the ten digit prompts),
fine-tuned by :func:`vqsuite.finetune.qalora` for ``--steps`` updates on those prompts, and measured with
:func:`vqsuite.finetune.qalora_mse` on held-out trajectories (seed 777, prompts in reverse order, 3 trajectories of
20 steps, guidance 4): the mean MSE between the quantized and the FP denoiser's CFG-mixed outputs on the same
``x_t``. One JSON line per setting.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/qalora_lr.py --preset w4a4 --steps 200 \\
        --lr-scales 1/2500,1/250,1/50,1/10
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from fractions import Fraction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="w4a4")
    p.add_argument("--steps", type=int, default=200, help="QALoRA updates")
    p.add_argument("--lr-scales", default="1/2500,1/250,1/50,1/10", help="comma-separated, fractions allowed")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import vqsuite.zoo as zoo
    from vqsuite.finetune import qalora, qalora_mse
    from vqsuite.pipelines.diffusers import quantize_pipeline
    from vqsuite.zoo.mini_sd import prompt

    prompts = [prompt(k) for k in range(10)]
    held_out = dict(num_inference_steps=20, guidance_scale=4.0, batch_size=2, seed=777, trajectories=3,
                    prompts=prompts[::-1])  # fmt: skip
    for text in a.lr_scales.split(","):
        lr = float(Fraction(text))
        pipe = zoo.load("mini-sd").model
        pipe.set_progress_bar_config(disable=True)
        teacher = copy.deepcopy(pipe.unet)
        quantize_pipeline(pipe, a.preset, freeze=False, calib_prompts=prompts, guidance_scale=4.0, calib_batch_size=10)
        before = qalora_mse(pipe, teacher, **held_out)
        t0 = time.perf_counter()
        qalora(pipe, a.preset, steps=a.steps, teacher=teacher, prompts=prompts, num_inference_steps=20,
               guidance_scale=4.0, batch_size=2, progress=False, lr_scale=lr)  # fmt: skip
        wall = time.perf_counter() - t0
        after = qalora_mse(pipe, teacher, **held_out)
        row = {"preset": a.preset, "lr_scale": text, "updates": a.steps, "mse_before": round(before, 5),
               "mse_after": round(after, 5), "ratio": round(after / before, 3),
               "finetune_s": round(wall, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
