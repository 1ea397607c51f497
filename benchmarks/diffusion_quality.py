"""Quality table of the suite's trained text-to-image pipelines (``mini-sd``, ``mini-pixart``) under every preset, with
and without QALoRA fine-tuning.

For each configuration the denoiser is quantized by :func:`vqsuite.quantize_pipeline` (calibrated on the ten digit
prompts at ``--steps`` steps, guidance 4), optionally fine-tuned by :func:`vqsuite.finetune.qalora` (data-free
distillation from the FP pipeline, ``--qalora-steps`` updates on the same ten prompts), frozen, and sampled from the
same fixed seeds as the FP pipeline (image ``i`` from ``manual_seed(seed + i)``, prompt "a photo of the digit k" for
``k = i // n_per_digit``). Each row reports:

- FID vs real data: TF Inception (:mod:`vqsuite.evals.fid`), generated 28x28 centre crops (grey as RGB) against the
  first ``--fid-ref`` MNIST test digits (statistics cached in ``~/.cache/vqsuite/fid``);
- prompt alignment: the share of images the shipped ``mnist-cnn3`` reads as the prompted digit;
- CLIP score (:func:`vqsuite.evals.clip.clip_score` with the shipped ``mini-clip``, trained here on MNIST +
  Fashion-MNIST): the 28x28 crops padded back to 32x32 against their own prompts; the FP row also scores them
  against a fixed random permutation of the prompts (``clip_shuffled``: the metric's chance level);
- fidelity to FP: PSNR / SSIM against the FP images of the same seeds, and FID between the quantized and the FP set,
  beside the FP-vs-FP floor (FID between two FP sets drawn from disjoint seeds, same N);
- denoiser memory (bytes of parameters and buffers, packed storage after freeze) and CPU wall times.

Rows are appended to ``--out`` (JSON lines) as they finish; a rerun skips rows already there, so an interrupted run
resumes. The markdown table of everything in ``--out`` is printed at the end.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/diffusion_quality.py --model mini-sd \\
        --configs w8a8,w4a8,w4a4,svdquant-int4 --qalora w4a4,svdquant-int4 --qalora-steps 200 \\
        --n-per-digit 50 --out benchmarks/quality/results-mini-sd.jsonl

``--only-clip`` measures alignment and the CLIP score alone (no Inception: FID, PSNR/SSIM and the FP-vs-FP floor
are left out), and ``--subset-per-digit M`` samples only the first M images of each digit with the seeds they have
in the full run, for adding the CLIP column at a smaller N than the rest of the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("diffusion_quality")

GUIDANCE = 4.0
MIB = 2**20


def call_kwargs(pipe: Any) -> dict[str, Any]:
    """Keyword arguments a 32x32 digit pipeline needs beyond the prompt (PixArt: no resolution binning, no caption
    cleaning, which would need bs4/ftfy)."""
    import inspect

    params = set(inspect.signature(pipe.__call__).parameters)
    kw: dict[str, Any] = {}
    if "use_resolution_binning" in params:
        kw["use_resolution_binning"] = False
    if "clean_caption" in params:
        kw["clean_caption"] = False
    return kw


@torch.no_grad()
def generate(
    pipe: Any,
    prompt_of: Any,
    digits: torch.Tensor,
    seed: int,
    steps: int,
    batch: int,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 ``[N, 1, 28, 28]`` digits; image ``i`` from its own generator ``manual_seed(seed + index[i])``
    (``index``: default ``arange(N)``; a subset keeps the full run's seed of each image)."""
    from vqsuite.zoo.mini_sd import images_to_digits

    kw = call_kwargs(pipe)
    out = []
    for s in range(0, digits.numel(), batch):
        idx = range(s, min(s + batch, digits.numel()))
        gens = [torch.Generator().manual_seed(seed + (i if index is None else int(index[i]))) for i in idx]
        imgs = pipe([prompt_of(int(digits[i])) for i in idx], num_inference_steps=steps, guidance_scale=GUIDANCE,
                    generator=gens, output_type="pt", **kw).images  # fmt: skip
        out.append(images_to_digits(imgs))
    return torch.cat(out)


def done_labels(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {json.loads(line)["config"] for line in path.read_text().splitlines() if line.strip()}


def append_row(path: Path, row: dict) -> None:
    import os

    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    n = rows[0].get("n", "?") if rows else "?"
    head = (
        f"| config | QALoRA updates | FID vs MNIST (N={n}) | alignment (mnist-cnn3) | CLIP score (mini-clip) "
        "| PSNR vs FP (dB) | SSIM vs FP | FID vs FP | denoiser MiB | quantize s | fine-tune s | sample s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:

        def f(k: str, fmt: str = "{}", r: dict = r) -> str:
            v = r.get(k)
            return "-" if v is None else fmt.format(v)

        lines.append(
            f"| {r['config']} | {f('qalora_updates')} | {f('fid', '{:.1f}')} | {f('alignment', '{:.1%}')} | "
            f"{f('clip', '{:.2f}')} | {f('psnr', '{:.2f}')} | {f('ssim', '{:.4f}')} | {f('fid_vs_fp', '{:.1f}')} | "
            f"{f('denoiser_mib', '{:.2f}')} | {f('quantize_s', '{:.0f}')} | {f('finetune_s', '{:.0f}')} | "
            f"{f('generate_s', '{:.0f}')} |"
        )
    return "\n".join(lines).replace("%", " %")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mini-sd", help="zoo pipeline: mini-sd or mini-pixart")
    p.add_argument("--configs", default="w8a8,w4a8,w4a4,nvfp4,svdquant-int4,svdquant-nvfp4",
                   help="presets quantized by PTQ alone (comma-separated; empty for none)")  # fmt: skip
    p.add_argument("--qalora", default="w4a4,svdquant-int4", help="presets also fine-tuned with QALoRA")
    p.add_argument("--qalora-steps", type=int, default=200)
    p.add_argument("--qalora-rank", type=int, default=32)
    p.add_argument("--qalora-batch", type=int, default=2)
    p.add_argument("--qalora-lr-scale", default=None, help="LoRA lr scale (default: the library's; fractions ok)")
    p.add_argument("--qalora-weighting", default="eps", help="per-step loss weighting: eps, x0, min_snr")
    p.add_argument("--n-per-digit", type=int, default=50)
    p.add_argument("--steps", type=int, default=20, help="sampling steps for calibration, fine-tuning and sampling")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--fid-ref", type=int, default=500, help="MNIST test digits for the reference statistics")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended; existing rows are skipped")
    p.add_argument("--no-clip", action="store_true", help="leave out the CLIP score (mini-clip)")
    p.add_argument("--only-clip", action="store_true", help="alignment and CLIP score only (no Inception)")
    p.add_argument("--subset-per-digit", type=int, default=0,
                   help="sample only the first M images of each digit, with the full run's seeds (0: all)")  # fmt: skip
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from digits_common import mnist_reference, rgb

    import vqsuite.zoo as zoo
    from vqsuite.evals.fid import _stats, frechet_distance
    from vqsuite.evals.fidelity import paired_metrics
    from vqsuite.evals.inception import load_inception
    from vqsuite.pipelines.diffusers import find_denoiser, quantize_pipeline
    from vqsuite.pipelines.report import module_nbytes

    def load() -> tuple[Any, Any]:
        m = zoo.load(a.model)
        return m.model, m.preprocess

    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = done_labels(a.out)
    net = None if a.only_clip else load_inception()
    ref = None if a.only_clip else mnist_reference(net, a.fid_ref)
    clip = None
    if not a.no_clip:
        from vqsuite.evals.clip import load_clip

        clip = load_clip()  # the shipped mini-clip, loaded once
    cnn = zoo.load("mnist-cnn3")
    digits = torch.arange(10).repeat_interleave(a.n_per_digit)
    index = None
    if a.subset_per_digit:  # image j < M of digit k keeps the seed it has in the full run: seed + k * n_per_digit + j
        index = torch.arange(digits.numel()).reshape(10, -1)[:, : a.subset_per_digit].reshape(-1)
        digits = digits[index]
    n = int(digits.numel())
    pipe, prompt_of = load()
    calib_prompts = [prompt_of(k) for k in range(10)]

    t0 = time.perf_counter()
    fp = generate(pipe, prompt_of, digits, a.seed, a.steps, a.batch, index)
    fp_s = time.perf_counter() - t0
    fp_feats = None if a.only_clip else _stats(rgb(fp), net, batch_size=16, accelerator=None, progress=False)
    prompts = [prompt_of(int(d)) for d in digits]
    shuffled = [prompts[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()]

    def clip_of(u8: torch.Tensor, texts: list[str]) -> float:
        from vqsuite.evals.clip import clip_score

        # the crops padded back to the pipelines' 32x32 framing (black border, as mini-sd draws digits)
        return round(clip_score(torch.nn.functional.pad(u8, (2, 2, 2, 2)), texts, clip, progress=False), 2)

    def measure(label: str, u8: torch.Tensor, extra: dict) -> dict:
        t1 = time.perf_counter()
        with torch.no_grad():
            pred = cnn.model(cnn.preprocess(u8)).argmax(-1)
        row: dict[str, Any] = {"model": a.model, "config": label, "n": n}
        if index is not None:
            row["subset_of_n"] = a.n_per_digit * 10
        if not a.only_clip:
            stats = _stats(rgb(u8), net, batch_size=16, accelerator=None, progress=False)
            row["fid"] = round(frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma), 2)
        row["alignment"] = round((pred == digits).float().mean().item(), 4)
        row["per_digit"] = [round(v, 3) for v in (pred == digits).float().reshape(10, -1).mean(1).tolist()]
        if clip is not None:
            row["clip"] = clip_of(u8, prompts)
            if u8 is fp:
                row["clip_shuffled"] = clip_of(u8, shuffled)
        if u8 is not fp and not a.only_clip:
            row["fid_vs_fp"] = round(frechet_distance(stats.mu, stats.sigma, fp_feats.mu, fp_feats.sigma), 2)
            pm = paired_metrics(rgb(fp), rgb(u8))
            row.update(psnr=round(pm["psnr"], 2), ssim=round(pm["ssim"], 4))
        row.update(extra, eval_s=round(time.perf_counter() - t1, 1), date=time.strftime("%Y-%m-%d"))
        logger.info("%s", row)
        return row

    if "FP32" not in done:
        den = find_denoiser(pipe)[1]
        row = measure("FP32", fp, {"denoiser_mib": round(module_nbytes(den) / MIB, 3), "generate_s": round(fp_s, 1)})
        if not a.only_clip:  # the floor of "FID vs FP": a second FP set from disjoint seeds
            fp2 = generate(pipe, prompt_of, digits, a.seed + 100_000, a.steps, a.batch)
            s2 = _stats(rgb(fp2), net, batch_size=16, accelerator=None, progress=False)
            row["fid_vs_fp"] = round(frechet_distance(s2.mu, s2.sigma, fp_feats.mu, fp_feats.sigma), 2)
            row["note"] = "fid_vs_fp here is the FP-vs-FP floor: two FP sets from disjoint seeds"
        append_row(a.out, row)

    jobs = [(c, False) for c in a.configs.split(",") if c] + [(c, True) for c in a.qalora.split(",") if c]
    for preset, tune in jobs:
        label = f"{preset} + QALoRA" if tune else preset
        if label in done:
            logger.info("skip %s (already in %s)", label, a.out)
            continue
        pipe, _ = load()
        t0 = time.perf_counter()
        quantize_pipeline(pipe, preset, calib_prompts=calib_prompts, num_inference_steps=a.steps,
                          guidance_scale=GUIDANCE, calib_batch_size=10, freeze=not tune,
                          **call_kwargs(pipe))  # fmt: skip
        extra: dict[str, Any] = {"quantize_s": round(time.perf_counter() - t0, 1)}
        if tune:
            from vqsuite.finetune import qalora

            teacher = find_denoiser(load()[0])[1]
            t0 = time.perf_counter()
            from fractions import Fraction

            lr_kw = {} if a.qalora_lr_scale is None else {"lr_scale": float(Fraction(a.qalora_lr_scale))}
            qalora(pipe, preset, steps=a.qalora_steps, rank=a.qalora_rank, prompts=calib_prompts,
                   num_inference_steps=a.steps, guidance_scale=GUIDANCE, batch_size=a.qalora_batch, seed=0,
                   progress=False, teacher=teacher, loss_weighting=a.qalora_weighting, **lr_kw)  # fmt: skip
            rec = getattr(pipe, "vqsuite_qalora", {})
            extra.update(finetune_s=round(time.perf_counter() - t0, 1), qalora_updates=a.qalora_steps,
                         qalora_rank=a.qalora_rank, qalora_lr_scale=rec.get("lr_scale", a.qalora_lr_scale),
                         qalora_weighting=a.qalora_weighting, loss_first=rec.get("loss_first"),
                         loss_last=rec.get("loss_last"))  # fmt: skip
        den = find_denoiser(pipe)[1]
        extra["denoiser_mib"] = round(module_nbytes(den) / MIB, 3)
        t0 = time.perf_counter()
        u8 = generate(pipe, prompt_of, digits, a.seed, a.steps, a.batch, index)
        extra["generate_s"] = round(time.perf_counter() - t0, 1)
        append_row(a.out, measure(label, u8, extra))
    print(table(a.out))


if __name__ == "__main__":
    main()
