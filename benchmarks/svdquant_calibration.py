"""SVDQuant calibration cost and quality on FLUX-sized linear layers (random weights and activations with outliers).

Layers (FLUX.1 hidden 3072): the q/k/v projections as one shared-input group (3 x 3072x3072), the MLP
up-projection 3072->12288 and down-projection 12288->3072. Weights are N(0, 1/K) with a few input columns x8;
activations are N(0, 1) with a few channels x30 (the down-projection's input is a GELU output with outliers).
For every layer, format and mode (``exhaustive`` / ``fast`` search, deepcompressor's 19-point ``grid10``, with and
without GPTQ) it prints the calibration seconds (median of ``--repeats`` runs, the modes interleaved, and the ratio
to the first mode's median) and the held-out output SQNR of SVDQuant next to RTN W4A4 (``w4a4`` / ``nvfp4``).
The objectives run on a ``--tokens`` reservoir of the ``--calib-tokens`` calibration rows; GPTQ's Hessian uses all
of them (``X^T X`` is captured when a GPTQ mode is asked for). Seconds include everything ``svdquant_group`` does.

On CPU, glibc hands every large temporary back to the OS and page-faults it in again; for FLUX sizes
``MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000`` in the environment halves the time.

    .venv/bin/python benchmarks/svdquant_calibration.py                      # FLUX sizes (CPU: tens of minutes)
    .venv/bin/python benchmarks/svdquant_calibration.py --hidden 1024          # a few minutes on 2 cores
    .venv/bin/python benchmarks/svdquant_calibration.py --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.calibrators.capture import InputStats
from vqsuite.calibrators.svdquant import SVDQuantOptions, sqnr_db, svdquant_group
from vqsuite.config import get_preset
from vqsuite.nn import QLinear

PRESETS = {"int4": ("svdquant-int4", "w4a4"), "nvfp4": ("svdquant-nvfp4", "nvfp4")}
#: "exhaustive": deepcompressor's search (39 candidates on all rows, cold SVDs, refinement to the first increase);
#: "fast": the default coarse-to-fine search (SVDQuantOptions(search="fast")); "grid10": deepcompressor's fast.yaml
#: 19-point grid searched exhaustively
MODES = {
    "exhaustive": dict(search="exhaustive", gptq=False),
    "fast": dict(search="fast", gptq=False),
    "grid10": dict(search="exhaustive", fast=True, gptq=False),
    "exhaustive+gptq": dict(search="exhaustive", gptq=True),
    "fast+gptq": dict(search="fast", gptq=True),
}
WEIGHT_OUTLIER_SCALE = 8.0
ACT_OUTLIER_SCALE = 30.0


def _layers(hidden: int, mlp_ratio: int, n_outliers: int, seed: int, device: str) -> dict[str, list[nn.Linear]]:
    gen = torch.Generator().manual_seed(seed)

    def linear(k: int, n: int) -> nn.Linear:
        lin = nn.Linear(k, n, device="meta")
        w = torch.randn(n, k, generator=gen) * k**-0.5
        w[:, torch.randperm(k, generator=gen)[:n_outliers]] *= WEIGHT_OUTLIER_SCALE
        lin.weight = nn.Parameter(w.to(device))
        lin.bias = nn.Parameter((torch.randn(n, generator=gen) * 0.02).to(device))
        return lin

    inner = hidden * mlp_ratio
    return {
        "qkv": [linear(hidden, hidden) for _ in range(3)],
        "mlp.up": [linear(hidden, inner)],
        "mlp.down": [linear(inner, hidden)],
    }


def _inputs(k: int, tokens: int, n_outliers: int, seed: int, gelu: bool, mix_rank: int) -> torch.Tensor:
    """``[tokens, k]`` activations: correlated channels (``g + h @ B``, ``B [mix_rank, k]`` a fixed random mixing,
    so half of every channel's variance lies in a rank-``mix_rank`` subspace, as real activations are anisotropic),
    then ``n_outliers`` channels x30; GELU'd for a down-projection.
    The mixing and the outlier channels depend only on ``k`` (calibration and held-out rows share them)."""
    fixed = torch.Generator().manual_seed(1000 + k)
    mix = torch.randn(mix_rank, k, generator=fixed) / mix_rank**0.5 if mix_rank else None
    channels = torch.randperm(k, generator=fixed)[:n_outliers]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen)
    if mix is not None:
        x += torch.randn(tokens, mix_rank, generator=gen) @ mix
    x[:, channels] *= ACT_OUTLIER_SCALE
    return F.gelu(x, approximate="tanh") if gelu else x


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def run(args: argparse.Namespace, device: str) -> None:
    layers = _layers(args.hidden, args.mlp_ratio, args.outliers, args.seed, device)
    print(
        f"\n== device {device} ({torch.get_num_threads()} CPU threads), hidden {args.hidden}, objective rows "
        f"{args.tokens} of {args.calib_tokens} calibration rows, {args.test_tokens} held-out rows"
    )
    print(
        f"{'layer':<10} {'shape':<22} {'fmt':<6} {'mode':<15} {'seconds':>8} {'ratio':>7} {'SVDQ dB':>8} {'RTN dB':>7} "
        f"{'alpha,beta':>11} iters"
    )
    for lname, group in layers.items():
        if lname not in args.layers:
            continue
        k = group[0].in_features
        gelu = lname == "mlp.down"
        x_cal = _inputs(k, args.calib_tokens, args.outliers, args.seed + 1, gelu, args.mix_rank).to(device)
        x_test = _inputs(k, args.test_tokens, args.outliers, args.seed + 2, gelu, args.mix_rank).to(device)
        needs_gram = any(MODES[m]["gptq"] for m in args.modes)
        stats = InputStats(k, reservoir=args.tokens, track_gram=needs_gram)
        stats.update(x_cal)
        del x_cal
        refs = [lin(x_test) for lin in group]
        shape = "3x" if len(group) > 1 else ""
        shape += f"{group[0].out_features}x{k}"
        for fmt in args.formats:
            svdq_name, rtn_name = PRESETS[fmt]
            rtn_spec = get_preset(rtn_name).default
            rtn_y = [QLinear.from_float(lin, rtn_spec)(x_test) for lin in group]
            s_rtn = sqnr_db(torch.cat(refs, -1), torch.cat(rtn_y, -1))
            secs: dict[str, list[float]] = {m: [] for m in args.modes}
            result: dict[str, tuple[float, str, int]] = {}
            for _ in range(args.repeats):  # interleaved: a load change on the shared machine hits every mode
                for mode in args.modes:
                    opts = SVDQuantOptions(svd=args.svd, lowrank_iters=args.lowrank_iters, device=device, **MODES[mode])
                    _sync(device)
                    t0 = time.perf_counter()
                    qs = svdquant_group(group, stats, get_preset(svdq_name).default, opts)
                    _sync(device)
                    secs[mode].append(time.perf_counter() - t0)
                    s_svdq = sqnr_db(torch.cat(refs, -1), torch.cat([q(x_test) for q in qs], -1))
                    info = qs[0].svdquant_info
                    result[mode] = (s_svdq, f"{info['alpha']:.2f},{info['beta']:.2f}", len(info["lowrank_errors"]))
                    del qs
            base = statistics.median(secs[args.modes[0]])
            for mode in args.modes:
                dt = statistics.median(secs[mode])
                s_svdq, ab, iters = result[mode]
                print(
                    f"{lname:<10} {shape:<22} {fmt:<6} {mode:<15} {dt:8.1f} {base / dt:6.1f}x {s_svdq:8.2f} "
                    f"{s_rtn:7.2f} {ab:>11} {iters}",
                    flush=True,
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=3072, help="model width (FLUX.1: 3072)")
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="calibration rows the objectives run on (reservoir)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration rows seen (GPTQ's Hessian uses all)")
    p.add_argument("--test-tokens", type=int, default=1024, help="held-out rows for the SQNR")
    p.add_argument("--outliers", type=int, default=8, help="outlier channels in weights and in activations")
    p.add_argument("--mix-rank", type=int, default=64, help="rank of the activation channel correlation (0: iid)")
    p.add_argument("--formats", nargs="+", default=["int4", "nvfp4"], choices=list(PRESETS))
    p.add_argument("--modes", nargs="+", default=["exhaustive", "fast"], choices=list(MODES))
    p.add_argument("--repeats", type=int, default=1, help="runs per mode (interleaved); seconds are medians")
    p.add_argument("--layers", nargs="+", default=["qkv", "mlp.up", "mlp.down"], choices=["qkv", "mlp.up", "mlp.down"])
    p.add_argument("--svd", default="auto", choices=["auto", "full", "randomized"])
    p.add_argument("--lowrank-iters", type=int, default=100)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "both"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if has_cuda else [])
    elif args.device == "both":
        devices = ["cpu", "cuda"]
    else:
        devices = [args.device]
    if "cuda" in devices and not has_cuda:
        raise SystemExit("--device cuda: no CUDA device here")
    print(f"torch {torch.__version__}, cores {os.cpu_count()}", end="")
    print(f", GPU {torch.cuda.get_device_name()}" if has_cuda else ", no GPU")
    for device in devices:
        run(args, device)


if __name__ == "__main__":
    main()
