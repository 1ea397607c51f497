"""Low-bit GEMM kernels against torch's bf16 matmul (and torch's own _scaled_mm / _int_mm) in one run.

Every vqsuite kernel is timed through the frozen layer API (``QLinear``/``QLinearLowRank`` forward under
``vqsuite.kernels.prefer("triton")``), so what is measured is what a model runs: activation quantization, the
low-rank branch, bias and output included. Baselines: ``F.linear`` in bf16 (the ratio's denominator), the same plus an
unfused rank-r branch, and, where this torch and GPU have them, ``torch._scaled_mm`` (FP8 E4M3, row-wise scales;
GEMM only, and with a torch-ops per-token activation quantization) and ``torch._int_mm`` (INT8 -> INT32, GEMM only).

Method: several copies of every weight are rotated (at least ~3x the L2 cache of weights per timing, so the weight
really streams from HBM); small-M calls (M <= --graph-max-m) are captured in a CUDA graph so launch overhead does not
hide the kernel; the time is the median of --trials timings of --iters calls. TFLOP/s counts 2*M*K*N (plus the
low-rank branch's 2*M*r*(K+N) when present); GB/s counts weight storage (codes, scales, low-rank factors, bias) plus
x and y once. Ratio = bf16 time / kernel time (higher is faster).

Run: ``.venv/bin/python benchmarks/gemm.py [--quick] [--json out.json]`` (needs a CUDA GPU; refuses otherwise).
Importable: ``run(parse_args([...])) -> list[dict]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("benchmarks.gemm")

#: diffusion shapes (K, N): FLUX attention/MLP, SDXL attention/MLP
SHAPES: tuple[tuple[int, int], ...] = ((3072, 3072), (3072, 12288), (12288, 3072), (640, 640), (1280, 5120))
M_VALUES: tuple[int, ...] = (1, 16, 256, 4096)
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((3072, 12288), (640, 640))
QUICK_M: tuple[int, ...] = (1, 4096)
RANK = 32
#: (label, preset, rank): vqsuite kernels through the layer API; every one is tried, missing families are reported
LAYER_KERNELS: tuple[tuple[str, str, int], ...] = (
    ("w4a16 int4-g64", "w4a16", 0),
    ("w4a16 int4-g64 +r32", "w4a16", RANK),
    ("w4a16 nvfp4", "w4a16-nvfp4", 0),
    ("w4a16 nvfp4 +r32", "w4a16-nvfp4", RANK),
    ("w8a8 int8", "w8a8", 0),
    ("w8a8 int8 +r32", "svdquant-int4-w8a8", RANK),
    ("w8a8 fp8", "w8a8-fp8", 0),
    ("w4a8 int4-g64", "w4a8", 0),
    ("w4a4 int4-g64", "w4a4", 0),
    ("w4a4 int4-g64 +r32 (svdquant-int4)", "svdquant-int4", RANK),
    ("w4a4 nvfp4", "nvfp4", 0),
    ("w4a4 nvfp4 +r32 (svdquant-nvfp4)", "svdquant-nvfp4", RANK),
)
#: minimum bytes of weights touched per timed round, as a multiple of the L2 size
L2_MULTIPLE = 3
MAX_COPIES = 64
#: SQNR below which a kernel's output is flagged (against the reference path of the same layer)
SQNR_WARN_DB = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_M}, shapes {QUICK_SHAPES}, fewer iterations")
    ap.add_argument("--m", type=int, nargs="*", help=f"token counts (default {M_VALUES})")
    ap.add_argument("--shapes", type=str, help="K,N pairs separated by ';' (default: FLUX and SDXL shapes)")
    ap.add_argument("--kernels", type=str, nargs="*", help="only kernels whose label contains one of these")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--iters", type=int, default=None, help="calls per timing (default 50, quick 20)")
    ap.add_argument("--trials", type=int, default=None, help="timings per kernel, median taken (default 7, quick 3)")
    ap.add_argument("--graph-max-m", type=int, default=256, help="capture calls with M up to this in a CUDA graph")
    ap.add_argument("--no-graphs", action="store_true", help="never use CUDA graphs")
    ap.add_argument("--json", type=str, help="also write the rows as JSON here")
    ap.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)  # check the script itself on CPU
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------ environment
def environment(device: str = "cuda") -> dict:
    """Device, driver, versions, clocks and power cap (what the numbers depend on)."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if device == "cpu":
        return env | {"device": f"cpu ({platform.machine()}), smoke test: timings meaningless", "l2_mib": 0.0}
    props = torch.cuda.get_device_properties(0)
    env |= {
        "device": props.name,
        "sm": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "l2_mib": round(getattr(props, "L2_cache_size", 50 * 2**20) / 2**20, 1),
        "cuda": torch.version.cuda,
    }
    try:
        q = "driver_version,power.limit,clocks.max.sm,clocks.sm"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        env["nvidia_smi"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else "n/a"
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = "n/a"
    return env


# ------------------------------------------------------------------------------------------ timing
def time_calls(calls: list[Callable[[], object]], *, graph: bool, iters: int, trials: int) -> tuple[float, str]:
    """Median seconds per call, cycling through ``calls`` (one per weight copy). Returns ``(seconds, mode)``."""
    if not torch.cuda.is_available():  # --smoke-cpu: exercise the code path, the time means nothing
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) / len(calls), "cpu-smoke"
    for _ in range(3):  # warm-up: autotuning, lazy init, allocator
        for c in calls:
            c()
    torch.cuda.synchronize()
    rounds = max(1, math.ceil(iters / len(calls)))
    n_calls = rounds * len(calls)
    mode = "eager"
    replay: Callable[[], None]
    if graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(rounds):
                    for c in calls:
                        c()
            replay, mode = g.replay, "graph"
        except Exception as err:  # an op that syncs or allocates un-capturably: time it eagerly instead
            logger.warning("CUDA graph capture failed (%s); timing eagerly", err)
            torch.cuda.synchronize()

    if mode == "eager":

        def replay() -> None:
            for _ in range(rounds):
                for c in calls:
                    c()

    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n_calls)
    return statistics.median(times), mode


def n_copies(weight_bytes: int, l2_bytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(L2_MULTIPLE * l2_bytes / max(weight_bytes, 1))))


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:120]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = float((ref - out).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)


# ------------------------------------------------------------------------------------------ kernels
def _module_bytes(mod: torch.nn.Module) -> int:
    tensors = list(mod.parameters()) + list(mod.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _torch_rows(x, lin, copies, l2, *, graph, iters, trials):
    """Baselines: bf16 F.linear, bf16 + unfused rank-r branch, torch._scaled_mm FP8, torch._int_mm INT8."""
    m, k = x.shape
    n = lin.out_features
    w_bytes = n * k * x.element_size()
    ws = [lin.weight.detach().clone() for _ in range(copies)]
    out = []

    def row(name, sec, mode, wbytes, flops, note=""):
        out.append(
            {"kernel": name, "seconds": sec, "mode": mode, "bytes": wbytes + x.numel() * 2 + m * n * 2, "flops": flops}
            | ({"note": note} if note else {})
        )

    flops = 2 * m * k * n
    sec, mode = time_calls([lambda w=w: F.linear(x, w) for w in ws], graph=graph, iters=iters, trials=trials)
    dname = "bf16" if x.dtype == torch.bfloat16 else "fp16"
    row(f"torch {dname} F.linear", sec, mode, w_bytes, flops)
    down = [torch.randn(k, RANK, device=x.device, dtype=x.dtype) / k**0.5 for _ in range(copies)]
    up = [torch.randn(n, RANK, device=x.device, dtype=x.dtype) / RANK**0.5 for _ in range(copies)]
    lr = [lambda w=w, d=d, u=u: F.linear(x, w) + (x @ d) @ u.t() for w, d, u in zip(ws, down, up)]
    sec, mode = time_calls(lr, graph=graph, iters=iters, trials=trials)
    row(f"torch {dname} +r{RANK} unfused", sec, mode, w_bytes + (k + n) * RANK * 2, flops + 2 * m * RANK * (k + n))

    if hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn"):
        try:
            w8 = [(w.float() / (w.float().abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn) for w in ws]
            sw = [(w.float().abs().amax(1, keepdim=True) / 448).t().contiguous() for w in ws]  # [1, N]
            x8 = x.to(torch.float8_e4m3fn)
            sx = torch.ones(m, 1, device=x.device)

            def fp8_gemm(w=None, s=None):
                return torch._scaled_mm(x8, w.t(), scale_a=sx, scale_b=s, out_dtype=x.dtype)

            def fp8_quant_gemm(w=None, s=None):
                amax = x.abs().amax(1, keepdim=True).float().clamp_min(1e-12)
                scale = amax / 448
                xq = (x.float() / scale).to(torch.float8_e4m3fn)
                return torch._scaled_mm(xq, w.t(), scale_a=scale, scale_b=s, out_dtype=x.dtype)

            calls = [lambda w=w, s=s: fp8_gemm(w, s) for w, s in zip(w8, sw)]
            sec, mode = time_calls(calls, graph=graph, iters=iters, trials=trials)
            row("torch._scaled_mm fp8 rowwise (GEMM only)", sec, mode, n * k + 4 * n, flops)
            calls = [lambda w=w, s=s: fp8_quant_gemm(w, s) for w, s in zip(w8, sw)]
            sec, mode = time_calls(calls, graph=graph, iters=iters, trials=trials)
            row("torch._scaled_mm fp8 rowwise + torch act-quant", sec, mode, n * k + 4 * n, flops)
        except Exception as err:  # shape or GPU not supported by this torch
            out.append({"kernel": "torch._scaled_mm fp8 rowwise", "skipped": short_error(err)})
    if hasattr(torch, "_int_mm"):
        try:
            wi = [torch.randint(-127, 128, (n, k), device=x.device, dtype=torch.int8) for _ in range(copies)]
            xi = torch.randint(-127, 128, (m, k), device=x.device, dtype=torch.int8)
            calls = [lambda w=w: torch._int_mm(xi, w.t()) for w in wi]
            sec, mode = time_calls(calls, graph=graph, iters=iters, trials=trials)
            row("torch._int_mm int8 (GEMM only, int32 out)", sec, mode, n * k, flops)
        except Exception as err:
            out.append({"kernel": "torch._int_mm int8", "skipped": short_error(err)})
    return out


def _time_layer(layer, x, l2, *, graph, iters, trials):
    """``(seconds, mode, reference output, triton output)`` of a frozen layer, rotating deep copies of it."""
    import vqsuite.kernels as vk

    layers = [layer] + [copy.deepcopy(layer) for _ in range(n_copies(_module_bytes(layer), l2) - 1)]
    with torch.no_grad():
        with vk.prefer("reference"):
            ref = layer(x)
        with vk.prefer("triton"):
            got = layer(x)
            sec, mode = time_calls([lambda lay=lay: lay(x) for lay in layers], graph=graph, iters=iters, trials=trials)
    return sec, mode, ref, got


def _layer_rows(x, lin, kernels, l2, *, graph, iters, trials):
    """vqsuite kernels through the frozen layer API, forced onto Triton; output checked against the reference."""
    import vqsuite.kernels as vk
    from vqsuite.config import get_preset
    from vqsuite.nn.linear import QLinear, QLinearLowRank

    m, k = x.shape
    n = lin.out_features
    out = []
    for label, preset, rank in kernels:
        try:
            spec = get_preset(preset).default.replace(rank=rank)
            layer = (QLinearLowRank if rank else QLinear).from_float(lin, spec).freeze().eval()
            with vk.prefer("triton"):
                impl, _ = vk.select("qlinear", spec.kernel, layer.kernel_key, x=x, layer=layer)
        except Exception as err:
            out.append({"kernel": label, "skipped": short_error(err)})
            continue
        wbytes = _module_bytes(layer)
        try:
            sec, mode, ref, got = _time_layer(layer, x, l2, graph=graph, iters=iters, trials=trials)
        except Exception as err:  # a family that fails here is reported, the run goes on
            logger.warning("%s failed: %s", label, short_error(err))
            out.append({"kernel": label, "impl": impl, "skipped": "failed: " + short_error(err)})
            continue
        flops = 2 * m * k * n + (2 * m * rank * (k + n) if rank else 0)
        q = sqnr_db(ref, got)
        row = {
            "kernel": label,
            "impl": impl,
            "seconds": sec,
            "mode": mode,
            "bytes": wbytes + x.numel() * 2 + m * n * 2,
            "flops": flops,
            "sqnr_vs_reference_db": round(q, 1),
        }
        if q < SQNR_WARN_DB:
            row["note"] = f"SQNR vs reference path only {q:.1f} dB"
        out.append(row)
    return out


def run(args: argparse.Namespace | None = None) -> list[dict]:
    """Time every kernel on every (M, K, N); rows carry seconds, TFLOP/s, GB/s and the ratio to bf16."""
    args = args or parse_args([])
    device = "cpu" if getattr(args, "smoke_cpu", False) else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmarks/gemm.py needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";"))
    ms = args.m or (QUICK_M if args.quick else M_VALUES)
    iters = args.iters or (20 if args.quick else 50)
    trials = args.trials or (3 if args.quick else 7)
    kernels = [kk for kk in LAYER_KERNELS if not args.kernels or any(s in kk[0] for s in args.kernels)]
    l2 = int(environment(device)["l2_mib"] * 2**20)
    rows: list[dict] = []
    torch.manual_seed(0)
    for k, n in shapes:
        lin = torch.nn.Linear(k, n, device=device, dtype=dtype)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            graph = not args.no_graphs and m <= args.graph_max_m
            copies = n_copies(n * k * 2, l2)
            shape_rows = _torch_rows(x, lin, copies, l2, graph=graph, iters=iters, trials=trials)
            shape_rows += _layer_rows(x, lin, kernels, l2, graph=graph, iters=iters, trials=trials)
            base = shape_rows[0]["seconds"]
            by_label = {r["kernel"]: r for r in shape_rows if "seconds" in r}
            for r in shape_rows:
                r.update({"M": m, "K": k, "N": n, "dtype": args.dtype})
                if "seconds" not in r:
                    continue
                r["us"] = round(r["seconds"] * 1e6, 2)
                r["tflops"] = round(r["flops"] / r["seconds"] / 1e12, 2)
                r["gbps"] = round(r["bytes"] / r["seconds"] / 1e9, 1)
                r["ratio_vs_bf16"] = round(base / r["seconds"], 3)
                plain = by_label.get(r["kernel"].replace(f" +r{RANK}", "").split(" (")[0])
                if f"+r{RANK}" in r["kernel"] and plain is not None:
                    r["lowrank_overhead_pct"] = round(100 * (r["seconds"] / plain["seconds"] - 1), 1)
            rows += shape_rows
            print_rows(shape_rows)
        del lin
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\nM={r0['M']} K={r0['K']} N={r0['N']} ({r0['dtype']})")
    print("| kernel | impl | µs | TFLOP/s | GB/s | × bf16 | low-rank overhead | SQNR vs ref dB | mode |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "seconds" not in r:
            print(f"| {r['kernel']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        lo = f"{r['lowrank_overhead_pct']:+.1f}%" if "lowrank_overhead_pct" in r else ""
        print(
            f"| {r['kernel']} | {r.get('impl', 'torch')} | {r['us']:.1f} | {r['tflops']:.1f} | {r['gbps']:.0f} "
            f"| {r['ratio_vs_bf16']:.2f} | {lo} | {r.get('sqnr_vs_reference_db', '')} | {r['mode']} |"
            + (f" {r['note']}" if "note" in r else "")
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("benchmarks/gemm.py needs a CUDA GPU and none is visible here; nothing was measured.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    env = environment("cpu" if args.smoke_cpu else "cuda")
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print("command: " + " ".join(sys.argv))
    rows = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
