"""CPU kernels against torch, in one run: FP32 ``F.linear``, bf16 ``F.linear``, the reference path and the CPU family
(``vqsuite.kernels.cpu``) per preset, and a whole mini-sd UNet step FP32 vs quantized.

Per (preset, M, K x N): a frozen ``QLinear`` (``QLinearLowRank`` rank 32 for svdquant-int4, λ = ones) on fp32 inputs,
timed with ``vqsuite.kernels.prefer("reference")`` and with the default dispatch (which takes ``cpu.qlinear`` where
it accepts the layer; the "path" column says which ran). Ratios are FP32 ``F.linear`` time / path time (> 1: faster
than FP32), measured in the same run. Timing: ``time.perf_counter`` around repeated calls (at least --min-seconds per
sample), median of --samples; --threads intra-op threads (default 1).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/cpu_kernels.py`` (a few minutes on 2 shared cores);
``--quick`` for a smoke run.
Importable: ``run(parse_args([...])) -> dict``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch
import torch.nn.functional as F
from cpu_reference import time_call  # the same median-of-samples timer (run as a script: its folder is on sys.path)

PRESETS: tuple[str, ...] = ("w8a16", "w4a16-g32", "w4a16-g64", "w4a16-g128", "w8a8", "w4a4", "svdquant-int4")
SHAPES: tuple[tuple[int, int], ...] = ((1024, 1024), (4096, 4096))
M_VALUES: tuple[int, ...] = (1, 16, 128)
UNET_PRESETS: tuple[str, ...] = ("w4a16", "w8a8", "svdquant-int4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--m", type=int, nargs="*", default=list(M_VALUES))
    ap.add_argument("--shapes", type=str, help="K,N pairs separated by ';'")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.05, help="minimum wall time of one sample")
    ap.add_argument("--no-unet", action="store_true", help="skip the mini-sd UNet step")
    ap.add_argument("--quick", action="store_true", help="one small shape, M=1, 2 samples (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--unet-presets", nargs="*", default=list(UNET_PRESETS))
    ap.add_argument("--json", type=str)
    return ap.parse_args(argv)


def preset_spec(name: str):  # noqa: ANN201
    from vqsuite.config import get_preset

    if name.startswith("w4a16-g"):
        return get_preset("w4a16").default.replace(weight_group_size=int(name.split("-g")[1]))
    return get_preset(name).default


def frozen_layer(preset: str, lin: torch.nn.Linear):  # noqa: ANN001, ANN201
    from vqsuite.nn.linear import QLinear, QLinearLowRank

    spec = preset_spec(preset)
    if spec.rank:
        return QLinearLowRank.from_float(lin, spec, rank=spec.rank).freeze()
    return QLinear.from_float(lin, spec).freeze()


def layer_rows(args: argparse.Namespace) -> list[dict]:
    import vqsuite.kernels as vk

    shapes = SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";"))
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n)
        w, b = lin.weight.detach(), lin.bias.detach()
        wb, bb = w.bfloat16(), b.bfloat16()
        layers = {p: frozen_layer(p, lin) for p in args.presets}
        for m in args.m:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            t_fp32 = time_call(lambda x=x, w=w, b=b: F.linear(x, w, b), args.samples, args.min_seconds)
            t_bf16 = time_call(lambda xb=xb, wb=wb, bb=bb: F.linear(xb, wb, bb), args.samples, args.min_seconds)
            base = {"K": k, "N": n, "M": m, "fp32_ms": t_fp32 * 1e3, "bf16_ms": t_bf16 * 1e3}
            print(f"K={k} N={n} M={m}: fp32 {t_fp32 * 1e3:.3f} ms, bf16 {t_bf16 * 1e3:.3f} ms", flush=True)
            for preset, q in layers.items():
                path, _ = vk.select("qlinear", "auto", q.kernel_key, x=x, ops=q.qlinear_operands())
                with vk.prefer("reference"):
                    t_ref = time_call(lambda q=q, x=x: q(x), args.samples, args.min_seconds)
                t_auto = time_call(lambda q=q, x=x: q(x), args.samples, args.min_seconds)
                t_fast = float("nan")
                with vk.prefer("triton"):  # the CPU family even where auto leaves the call to the reference
                    try:
                        t_fast = time_call(lambda q=q, x=x: q(x), args.samples, args.min_seconds)
                    except RuntimeError:  # the family declines this layer outright
                        pass
                row = dict(base, preset=preset, path=path, ref_ms=t_ref * 1e3, fast_ms=t_fast * 1e3)
                row["auto_ms"] = t_auto * 1e3
                row["auto_x_fp32"] = t_fp32 / t_auto
                row["ref_x_fp32"] = t_fp32 / t_ref
                row["fast_x_fp32"] = t_fp32 / t_fast
                row["fast_x_bf16"] = t_bf16 / t_fast
                rows.append(row)
                print(
                    f"  {preset:14s} {path:12s} ref {t_ref * 1e3:9.3f} ms ({row['ref_x_fp32']:.2f}x fp32)"
                    f"  cpu {t_fast * 1e3:9.3f} ms ({row['fast_x_fp32']:.2f}x fp32, {row['fast_x_bf16']:.2f}x bf16)"
                    f"  auto {t_auto * 1e3:9.3f} ms ({row['auto_x_fp32']:.2f}x fp32)",
                    flush=True,
                )
    return rows


def unet_rows(args: argparse.Namespace) -> list[dict]:
    """One mini-sd UNet forward (batch 2: the CFG pair) FP32 vs quantized (default dispatch and reference)."""
    import copy

    import vqsuite
    import vqsuite.kernels as vk
    from vqsuite.zoo.mini_sd import load_mini_sd

    unet = load_mini_sd(torch.float32).unet.eval()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    sample = torch.randn(2, cfg.in_channels, size, size)
    ehs = torch.randn(2, 8, cfg.cross_attention_dim)
    t = torch.tensor(500)

    def step(model) -> None:  # noqa: ANN001
        with torch.no_grad():
            model(sample, t, encoder_hidden_states=ehs)

    rows = []
    t_fp32 = time_call(lambda: step(unet), args.samples, args.min_seconds)
    print(f"mini-sd UNet step (batch 2, {size}x{size} latents): fp32 {t_fp32 * 1e3:.2f} ms", flush=True)
    for preset in args.unet_presets:
        q = vqsuite.quantize_model(copy.deepcopy(unet), preset)
        with vk.prefer("reference"):
            t_ref = time_call(lambda q=q: step(q), args.samples, args.min_seconds)
        t_fast = time_call(lambda q=q: step(q), args.samples, args.min_seconds)
        rows.append({"preset": preset, "fp32_ms": t_fp32 * 1e3, "ref_ms": t_ref * 1e3, "fast_ms": t_fast * 1e3})
        print(
            f"  {preset:8s} reference {t_ref * 1e3:8.2f} ms ({t_fp32 / t_ref:.2f}x fp32)"
            f"  default {t_fast * 1e3:8.2f} ms ({t_fp32 / t_fast:.2f}x fp32)",
            flush=True,
        )
    return rows


def run(args: argparse.Namespace | None = None) -> dict:
    from vqsuite.kernels.cpu.qlinear import cpu_capability

    args = args or parse_args([])
    if args.quick:
        args.shapes, args.m, args.samples, args.no_unet = "256,256", [1], 2, True
    torch.set_num_threads(args.threads)
    header = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "cpu": platform.processor() or platform.machine(),
        "capability": cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(header), flush=True)
    out = {"header": header, "layers": layer_rows(args), "unet": [] if args.no_unet else unet_rows(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    run(parse_args())
