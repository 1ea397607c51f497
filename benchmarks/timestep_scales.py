"""Pooled vs per-step vs bucketed static activation scales on the suite's trained ``mini-sd`` (MNIST, 32x32).

For W8A8 and W4A8 (the presets, with ``act_mode="static"`` and ``act_granularity`` pooled / per_step /
bucketed), the UNet is quantized by :func:`vqsuite.quantize_pipeline`, calibrated on the ten digit prompts
(``prompt(k)``, k = 0..9) at ``--steps`` DDIM steps, guidance 4. Every config (and the FP pipeline) then draws
``--n-per-digit`` images per digit from the same fixed seeds (image ``i`` from ``manual_seed(seed + i)``), and the
script reports:

- FID (TF Inception, :mod:`vqsuite.evals.fid`) of the generated digits (28x28 centre crop, grey as RGB) against the
  first ``--fid-ref`` MNIST test digits (statistics cached in ``~/.cache/vqsuite/fid``);
- prompt alignment: the share of images the shipped ``mnist-cnn3`` reads as the prompted digit;
- PSNR / SSIM against the FP images of the same seeds (:func:`vqsuite.evals.fidelity.paired_metrics`).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/timestep_scales.py --n-per-digit 20 \\
        --out /tmp/timestep_scales.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

logger = logging.getLogger("timestep_scales")

GUIDANCE = 4.0
#: (row label, preset, act_granularity, n_buckets)
GRANULARITIES = (("pooled", "pooled", None), ("per-step", "per_step", None), ("4 buckets", "bucketed", 4))


def static_config(preset: str, granularity: str, n_buckets: int | None):  # noqa: ANN201
    """The preset with its default spec's activations made static at ``granularity``."""
    from vqsuite.config import get_preset

    cfg = get_preset(preset)
    spec = cfg.default.replace(act_mode="static", act_granularity=granularity, n_buckets=n_buckets)
    return replace(cfg, default=spec, name=f"{preset}-static-{granularity}")


@torch.no_grad()
def generate(pipe, digits: torch.Tensor, seed: int, steps: int, batch: int) -> torch.Tensor:  # noqa: ANN001
    """uint8 ``[N, 1, 28, 28]`` digits; image ``i`` from its own generator ``manual_seed(seed + i)``."""
    from vqsuite.zoo.mini_sd import images_to_digits, prompt

    out = []
    for s in range(0, digits.numel(), batch):
        idx = range(s, min(s + batch, digits.numel()))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        imgs = pipe([prompt(int(digits[i])) for i in idx], num_inference_steps=steps, guidance_scale=GUIDANCE,
                    generator=gens, output_type="pt").images  # fmt: skip
        out.append(images_to_digits(imgs))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-per-digit", type=int, default=20)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps for calibration and sampling")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--fid-ref", type=int, default=500, help="MNIST test digits for the reference statistics")
    p.add_argument("--presets", default="w8a8,w4a8")
    p.add_argument("--no-fp-fid", action="store_true", help="skip the FP row's FID/alignment (FP images still drawn)")
    p.add_argument("--out", type=Path, default=Path("timestep_scales.json"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from digits_common import mnist_reference, rgb

    import vqsuite.zoo as zoo
    from vqsuite.evals.fid import compute_fid
    from vqsuite.evals.fidelity import paired_metrics
    from vqsuite.evals.inception import load_inception
    from vqsuite.pipelines.diffusers import quantize_pipeline
    from vqsuite.zoo.mini_sd import load_mini_sd, prompt

    net = load_inception()
    ref = mnist_reference(net, a.fid_ref)
    cnn = zoo.load("mnist-cnn3")
    digits = torch.arange(10).repeat_interleave(a.n_per_digit)

    def measure(label: str, u8: torch.Tensor, fp: torch.Tensor | None, extra: dict) -> dict:
        t0 = time.perf_counter()
        fid = compute_fid(rgb(u8), ref, net, progress=False).fid
        with torch.no_grad():
            pred = cnn.model(cnn.preprocess(u8)).argmax(-1)
        row = {"config": label, "fid": round(fid, 2), "alignment": round((pred == digits).float().mean().item(), 4)}
        if fp is not None:
            pm = paired_metrics(rgb(fp), rgb(u8))
            row.update(psnr=round(pm["psnr"], 2), ssim=round(pm["ssim"], 4))
        row.update(extra, eval_s=round(time.perf_counter() - t0, 1))
        logger.info("%s", row)
        return row

    rows = []
    t0 = time.perf_counter()
    fp = generate(load_mini_sd(), digits, a.seed, a.steps, a.batch)
    if not a.no_fp_fid:
        rows.append(measure("FP32", fp, None, {"generate_s": round(time.perf_counter() - t0, 1)}))
    calib_prompts = [prompt(k) for k in range(10)]
    for preset in a.presets.split(","):
        for label, gran, nb in GRANULARITIES:
            pipe = load_mini_sd()
            t0 = time.perf_counter()
            quantize_pipeline(pipe, static_config(preset, gran, nb), calib_prompts=calib_prompts,
                              num_inference_steps=a.steps, guidance_scale=GUIDANCE, calib_batch_size=10)  # fmt: skip
            q_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            u8 = generate(pipe, digits, a.seed, a.steps, a.batch)
            extra = {"quantize_s": round(q_s, 1), "generate_s": round(time.perf_counter() - t0, 1)}
            rows.append(measure(f"{preset} static {label}", u8, fp, extra))
            a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    print(f"| config | FID (N={digits.numel()}) | mnist-cnn3 alignment | PSNR vs FP (dB) | SSIM vs FP |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['fid']:.1f} | {100 * r['alignment']:.1f} % | {r.get('psnr', '-')} | "
              f"{r.get('ssim', '-')} |")  # fmt: skip


if __name__ == "__main__":
    main()
