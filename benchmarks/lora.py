"""A style LoRA on a quantized ``mini-sd``: does the effect survive quantization?

The LoRA (``scripts/train_mini_sd_lora.py``: thicker strokes, rank 8 on the UNet attention projections, saved with
``save_lora_weights``) is loaded with ``pipe.load_lora_weights(dir)`` onto the float pipeline and onto pipelines
quantized by :func:`vqsuite.quantize_pipeline` (calibrated on the ten digit prompts). Every configuration samples the
same 30 digits (three per digit, seeds 1000+i, 20 DDIM steps, guidance 4). Per configuration: mean ink (mean grey
level of the 28x28 digit in [0, 1]), ink area (fraction of pixels > 0.5), mnist-cnn3 accuracy on the prompted digit;
per quantized configuration: PSNR/SSIM against its float counterpart (Q vs FP, Q+LoRA vs FP+LoRA). The reference
row is real MNIST test digits, plain and dilated like the LoRA's training data. One JSON line per configuration.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_mini_sd_lora.py --steps 500 --n-train 5000 \\
        --out /tmp/mini_sd_lora
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora.py --lora /tmp/mini_sd_lora \\
        --presets svdquant-int4,w8a8
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

#: a pixel of the 28x28 grey digit counts as ink above this level
INK_LEVEL = 0.5


def ink_stats(u8: torch.Tensor) -> dict[str, float]:
    """uint8 ``[N, 1, 28, 28]`` -> mean ink and ink area."""
    g = u8.float() / 255
    return {"mean_ink": round(float(g.mean()), 4), "ink_area": round(float((g > INK_LEVEL).float().mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lora", type=Path, required=True, help="folder written by scripts/train_mini_sd_lora.py")
    p.add_argument("--presets", default="svdquant-int4,w8a8")
    p.add_argument("--per-digit", type=int, default=3)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from digits_common import rgb

    import vqsuite.zoo as zoo
    from vqsuite.evals.fidelity import paired_metrics
    from vqsuite.pipelines.diffusers import quantize_pipeline
    from vqsuite.zoo.datasets import mnist_test
    from vqsuite.zoo.mini_sd import images_to_digits, prompt

    prompts = [prompt(k) for k in range(10)]
    digits = torch.arange(10).repeat_interleave(a.per_digit)
    clf = zoo.load("mnist-cnn3")

    def load() -> Any:
        pipe = zoo.load("mini-sd").model
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(pipe: Any) -> tuple[torch.Tensor, float]:
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(digits.numel())]
        t0 = time.perf_counter()
        out = pipe([prompt(int(d)) for d in digits], num_inference_steps=20, guidance_scale=4.0, generator=gens,
                   output_type="pt")  # fmt: skip
        return images_to_digits(out.images), time.perf_counter() - t0

    def row(config: str, u8: torch.Tensor, seconds: float | None, ref: torch.Tensor | None = None) -> dict:
        with torch.no_grad():
            acc = (clf.model(clf.preprocess(u8)).argmax(-1) == digits).float().mean()
        r = {"config": config, "n": int(u8.shape[0]), **ink_stats(u8), "mnist_cnn3_acc": round(float(acc), 3)}
        if seconds is not None:
            r["sample_s"] = round(seconds, 1)
        if ref is not None:
            m = paired_metrics(rgb(ref), rgb(u8))
            r.update(psnr_vs_fp=round(m["psnr"], 2), ssim_vs_fp=round(m["ssim"], 4))
        print(json.dumps(r), flush=True)
        return r

    real = mnist_test()[0][:1000]
    dil = F.max_pool2d(real.float(), 3, stride=1, padding=1).round().to(torch.uint8)
    print(json.dumps({"config": "MNIST test (real)", "n": 1000, **ink_stats(real)}), flush=True)
    print(json.dumps({"config": "MNIST test dilated 3x3 (the LoRA's style)", "n": 1000, **ink_stats(dil)}), flush=True)

    pipe = load()
    fp, s = sample(pipe)
    row("FP", fp, s)
    pipe.load_lora_weights(str(a.lora), adapter_name="thick")
    fp_lora, s = sample(pipe)
    row("FP+LoRA", fp_lora, s)
    for preset in a.presets.split(","):
        pipe = load()
        quantize_pipeline(pipe, preset, calib_prompts=prompts, guidance_scale=4.0, calib_batch_size=10)
        q, s = sample(pipe)
        row(f"Q {preset}", q, s, fp)
        pipe.load_lora_weights(str(a.lora), adapter_name="thick")
        q_lora, s = sample(pipe)
        row(f"Q {preset}+LoRA", q_lora, s, fp_lora)
        pipe.set_adapters(["thick"], [0.5])
        row(f"Q {preset}+LoRA x0.5", sample(pipe)[0], None)


if __name__ == "__main__":
    main()
