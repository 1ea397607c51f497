"""What CPU inference costs: the plain-PyTorch reference path of frozen quantized layers against bf16 ``F.linear``.

On a machine without a GPU every frozen layer runs ``vqsuite.kernels.reference``: the weight is dequantized from its
packed storage on every call and activations are fake-quantized in torch ops, so a quantized layer is slower than
the bf16 layer it replaces (it saves memory, not time). This script measures by how much, forcing the reference path
(``vqsuite.kernels.prefer("reference")``) for each preset on a few diffusion shapes (SDXL attention 640x640, SDXL MLP
1280->5120) at M = 1 (a modulation GEMV) and M = 256 tokens.

Timing: ``time.perf_counter`` around repeated calls (at least --min-seconds per sample), median of --samples.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_reference.py`` (about a minute on 2 cores).
Importable: ``run(parse_args([...])) -> list[dict]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PRESETS: tuple[str, ...] = ("w8a8", "w4a16", "w4a4", "nvfp4", "svdquant-int4")
SHAPES: tuple[tuple[int, int], ...] = ((640, 640), (1280, 5120))
M_VALUES: tuple[int, ...] = (1, 256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--m", type=int, nargs="*", default=list(M_VALUES))
    ap.add_argument("--shapes", type=str, help="K,N pairs separated by ';'")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.05, help="minimum wall time of one sample")
    ap.add_argument("--json", type=str)
    return ap.parse_args(argv)


def time_call(fn, samples: int, min_seconds: float) -> float:
    """Median seconds per call of ``fn``."""
    fn()
    reps = 1
    while True:  # enough calls per sample that the timer's resolution does not matter
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if time.perf_counter() - t0 >= min_seconds or reps >= 1 << 16:
            break
        reps *= 2
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def run(args: argparse.Namespace | None = None) -> list[dict]:
    import vqsuite
    import vqsuite.kernels as vk
    from vqsuite.nn.linear import QLinear, QLinearLowRank

    args = args or parse_args([])
    shapes = SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";"))
    torch.manual_seed(0)
    rows = []
    for k, n in shapes:
        lin = torch.nn.Linear(k, n).to(torch.bfloat16)
        layers = {}
        for preset in args.presets:
            spec = vqsuite.get_preset(preset).default
            cls = QLinearLowRank if spec.rank else QLinear
            layers[preset] = cls.from_float(lin, spec).freeze().eval()
        for m in args.m:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            with torch.no_grad():
                base = time_call(lambda x=x, lin=lin: F.linear(x, lin.weight, lin.bias), args.samples, args.min_seconds)
                xf, wf, bf = x.float(), lin.weight.float(), lin.bias.float()
                f32 = time_call(lambda xf=xf, wf=wf, bf=bf: F.linear(xf, wf, bf), args.samples, args.min_seconds)
                rows.append({"path": "bf16 F.linear", "M": m, "K": k, "N": n, "ms": base * 1e3, "x_bf16_time": 1.0})
                rows.append(
                    {"path": "fp32 F.linear", "M": m, "K": k, "N": n, "ms": f32 * 1e3, "x_bf16_time": f32 / base}
                )
                with vk.prefer("reference"):
                    for preset, layer in layers.items():
                        sec = time_call(lambda layer=layer, x=x: layer(x), args.samples, args.min_seconds)
                        rows.append(
                            {
                                "path": f"{preset} reference",
                                "M": m,
                                "K": k,
                                "N": n,
                                "ms": sec * 1e3,
                                "x_bf16_time": sec / base,
                            }
                        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print("command: " + " ".join(sys.argv))
    rows = run(args)
    print("| path | M | K×N | ms per call | time ÷ bf16 F.linear |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['M']} | {r['K']}×{r['N']} | {r['ms']:.3f} | {r['x_bf16_time']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
