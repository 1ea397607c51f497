"""``vqsuite demo`` (mini-sd, svdquant-int4) with layers the SD UNet rule keeps 16-bit quantized instead: how the
rule's choice of conv_in/conv_out and the up/down-samplers was measured (see BENCHMARKS "Main job").

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_lowrank_demo_variant.py --out DIR \\
        --quantize "conv_in,conv_out,*.downsamplers.*,*.upsamplers.*"
"""

from __future__ import annotations

import argparse
import dataclasses

from vqsuite.cli.demo_sd import run_sd_demo
from vqsuite.pipelines import rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="demo output folder")
    ap.add_argument("--quantize", required=True, help="comma-separated rule patterns to stop keeping 16-bit")
    args = ap.parse_args()
    drop = set(args.quantize.split(","))
    rule = rules.ARCH_RULES["UNet2DConditionModel"]
    unknown = drop - {lr.pattern for lr in rule.layers}
    if unknown:
        raise SystemExit(f"not patterns of the UNet rule: {sorted(unknown)}")
    layers = tuple(lr for lr in rule.layers if lr.pattern not in drop)
    rules.register_arch_rule(dataclasses.replace(rule, layers=layers), overwrite=True)
    run_sd_demo(args.out)


if __name__ == "__main__":
    main()
