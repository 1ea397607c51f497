"""SVDQuant on convolutions, on a timm ResNet-18 (``pretrained=False``: random init, no download): output SQNR vs
float of ``svdquant-int4`` with the conv low-rank branches (every groups=1 conv: smoothing + branch at the useful
rank of its GEMM view) and without them (every conv forced to rank 0: plain W4A4 RTN convs, the behaviour before
``vqsuite.nn.conv_lowrank``), plus the size after.

Inputs are N(0, 1) images (a random-init network has no data distribution of its own); calibration and held-out
sets are disjoint draws. Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_lowrank_resnet.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
import warnings

import torch

import vqsuite
from vqsuite.calibrators.svdquant import sqnr_db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="input resolution")
    ap.add_argument("--calib", type=int, default=16, help="calibration images")
    ap.add_argument("--test", type=int, default=16, help="held-out images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model("resnet18", pretrained=False).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = [torch.randn(args.calib, 3, args.size, args.size, generator=gen)]
    x = torch.randn(args.test, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        ref = model(x)
    base = vqsuite.get_preset("svdquant-int4").with_overrides(method_options={"fast": True})
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    no_branch = dataclasses.replace(
        base, overrides=tuple((n, base.default.replace(rank=0)) for n in convs), name="svdquant-int4 (convs rank 0)"
    )
    print(f"| config | output SQNR vs float | MiB FP -> quantized | quantize s |  (resnet18, {args.size}px)")
    for label, cfg in (("without the conv branch", no_branch), ("with conv low-rank branches", base)):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = vqsuite.quantize_model(copy.deepcopy(model), cfg, calib_data=calib)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            db = sqnr_db(ref, q(x))
        rep = q.vqsuite_report
        print(
            f"| {label} | {db:.2f} dB | {rep.bytes_before / 2**20:.2f} -> {rep.bytes_after / 2**20:.2f} | {secs:.0f} |"
        )


if __name__ == "__main__":
    main()
