"""Bytes of one frozen quantized linear layer against its bf16 original, for each weight preset.

Run: .venv/bin/python benchmarks/memory.py [--n 4096] [--k 4096]
"""

from __future__ import annotations

import argparse

import torch

import vqsuite
from vqsuite.nn import QLinear

PRESETS = ("w8a16", "w8a8-fp8", "w4a16", "nvfp4", "mxfp4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4096, help="out_features")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    args = ap.parse_args()
    lin = torch.nn.Linear(args.k, args.n, bias=False).to(torch.bfloat16)
    base = vqsuite.module_nbytes(lin)
    print(f"bf16 nn.Linear {args.n}x{args.k}: {base / 2**20:.2f} MiB")
    print("| preset | MiB | x smaller than bf16 | bits per weight |\n|---|---|---|---|")
    for preset in PRESETS:
        q = QLinear.from_float(lin, vqsuite.get_preset(preset).default).freeze()
        nbytes = vqsuite.module_nbytes(q)
        print(f"| {preset} | {nbytes / 2**20:.2f} | {base / nbytes:.2f} | {8 * nbytes / (args.n * args.k):.3f} |")


if __name__ == "__main__":
    main()
