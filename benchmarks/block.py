"""A FLUX-sized transformer block in bf16 against the same block quantized with each preset: eager and compiled.

The block is FLUX.1's double-stream (MMDiT) block at its real dimensions with random weights: hidden 3072, 24 heads
of 128, MLP 12288 (GELU-tanh), adaLN modulation linears (3072 -> 6*3072, run at M = batch), per-stream q/k/v,
output and MLP linears, RMSNorm on q and k, one joint attention (``scaled_dot_product_attention``) over
4096 image + 512 text tokens. Rotary embeddings are left out (elementwise, the same for every preset).

Each preset is applied with ``vqsuite.quantize_model`` (data-free: SVDQuant presets get their low-rank branch from
the SVD of W with λ = 1, which times the same as a calibrated one) and runs through the kernel dispatcher's
``auto`` choice; the table says which implementation each preset's linears got. Reported: median ms per forward
over --iters runs (CUDA events), the ratio to bf16 eager and to bf16 compiled, peak allocated memory during a
forward, the block's weight bytes and the output SQNR against the bf16 block (a sanity check, not a quality claim:
random weights, no calibration).

Run: ``.venv/bin/python benchmarks/block.py [--quick] [--json out.json]`` (needs a CUDA GPU; refuses otherwise).
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
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("benchmarks.block")

PRESETS: tuple[str, ...] = (
    "w8a8",
    "w8a8-fp8",
    "w4a16",
    "w4a16-r32",
    "w4a16-nvfp4",
    "w4a8",
    "w4a4",
    "svdquant-int4",
    "nvfp4",
    "svdquant-nvfp4",
)
QUICK_PRESETS: tuple[str, ...] = ("w8a8", "w4a16", "svdquant-int4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"presets {QUICK_PRESETS}, fewer iterations")
    ap.add_argument("--presets", nargs="*", help=f"presets to run (default {PRESETS}; w4a16-r32 = w4a16 + rank 32)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards (default 20, quick 5)")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--mlp", type=int, default=12288)
    ap.add_argument("--img-tokens", type=int, default=4096)
    ap.add_argument("--txt-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", type=str, help="also write the rows as JSON here")
    ap.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)  # check the script itself on CPU
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------ the block
class FluxDoubleBlock(nn.Module):
    """FLUX.1 double-stream block: ``(img [B, Li, D], txt [B, Lt, D], temb [B, D]) -> (img, txt)``."""

    def __init__(self, hidden: int = 3072, heads: int = 24, mlp: int = 12288) -> None:
        super().__init__()
        self.heads = heads
        head_dim = hidden // heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", nn.Linear(hidden, 6 * hidden))
            setattr(self, f"{s}_qkv", nn.Linear(hidden, 3 * hidden))
            setattr(self, f"{s}_q_norm", nn.RMSNorm(head_dim, eps=1e-6))
            setattr(self, f"{s}_k_norm", nn.RMSNorm(head_dim, eps=1e-6))
            setattr(self, f"{s}_proj", nn.Linear(hidden, hidden))
            setattr(self, f"{s}_mlp_up", nn.Linear(hidden, mlp))
            setattr(self, f"{s}_mlp_down", nn.Linear(mlp, hidden))

    def _pre(self, s: str, h: torch.Tensor, temb: torch.Tensor):
        mod = getattr(self, f"{s}_mod")(F.silu(temb))[:, None, :].chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        hn = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale1) + shift1
        b, n, d = hn.shape
        q, k, v = getattr(self, f"{s}_qkv")(hn).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = getattr(self, f"{s}_q_norm")(q), getattr(self, f"{s}_k_norm")(k)
        return (q, k, v), (gate1, shift2, scale2, gate2)

    def _post(self, s: str, h: torch.Tensor, attn: torch.Tensor, mods) -> torch.Tensor:
        gate1, shift2, scale2, gate2 = mods
        h = h + gate1 * getattr(self, f"{s}_proj")(attn)
        hn = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale2) + shift2
        mlp = getattr(self, f"{s}_mlp_down")(F.gelu(getattr(self, f"{s}_mlp_up")(hn), approximate="tanh"))
        return h + gate2 * mlp

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (qi, ki, vi), mi = self._pre("img", img, temb)
        (qt, kt, vt), mt = self._pre("txt", txt, temb)
        q, k, v = (torch.cat([t, i], dim=2) for t, i in ((qt, qi), (kt, ki), (vt, vi)))
        o = F.scaled_dot_product_attention(q, k, v)
        b, h, n, dh = o.shape
        o = o.transpose(1, 2).reshape(b, n, h * dh)
        lt = txt.shape[1]
        return self._post("img", img, o[:, lt:], mi), self._post("txt", txt, o[:, :lt], mt)


# ------------------------------------------------------------------------------------------ measuring
def _config(preset: str):
    import vqsuite

    if preset == "w4a16-r32":
        base = vqsuite.get_preset("w4a16")
        return base.with_overrides(default=base.default.replace(rank=32), name="w4a16-r32")
    return preset


def _impls(model: nn.Module, sample: dict[tuple[int, int], torch.Tensor]) -> str:
    """Which implementation the dispatcher picks for this model's quantized linears (counted)."""
    import vqsuite.kernels as vk
    from vqsuite.nn.linear import QLinear

    counts: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, QLinear):
            x = sample[mod.gemm_shape[1], 0 if mod.gemm_shape[0] == 6 * mod.gemm_shape[1] else 1]
            name, _ = vk.select("qlinear", mod.spec.kernel, mod.kernel_key, x=x, layer=mod)
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) or "none"


def _time(fn, iters: int, device: str) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(2):
        fn()
    if device == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn, device: str) -> float:
    if device == "cpu":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = float((ref - out).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)


def _measure(model, inputs, label, iters, device, compile_mode, ref_out):
    rows = []
    modes = [("eager", model)]
    if compile_mode is not None:
        modes.append(("compiled", None))
    for mode, fn_model in modes:
        row = {"preset": label, "mode": mode}
        try:
            if mode == "compiled":
                torch._dynamo.reset()
                fn_model = torch.compile(model, mode=compile_mode)

            def fn(m=fn_model):
                with torch.no_grad():
                    return m(*inputs)

            out = fn()
            row["ms"] = _time(fn, iters, device)
            row["peak_mib"] = _peak_mib(fn, device)
            row["sqnr_vs_bf16_db"] = None if ref_out is None else round(_sqnr(ref_out[0], out[0]), 1)
        except Exception as err:  # a preset or compile that fails is reported, the run goes on
            text = str(err).strip().splitlines()
            row["skipped"] = f"{type(err).__name__}: {text[0] if text else ''}"[:160]
            logger.warning("%s %s failed: %s", label, mode, row["skipped"])
        rows.append(row)
    return rows


def run(args: argparse.Namespace | None = None) -> list[dict]:
    """bf16 block, then each preset: eager and compiled ms, ratios to bf16 eager/compiled, peak memory."""
    import vqsuite

    args = args or parse_args([])
    device = "cpu" if getattr(args, "smoke_cpu", False) else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmarks/block.py needs a CUDA GPU")
    dtype = torch.float16 if device == "cpu" else torch.bfloat16  # the CPU interpreter cannot take bf16 dots
    presets = args.presets or (QUICK_PRESETS if args.quick else PRESETS)
    iters = args.iters or (5 if args.quick else 20)
    compile_mode = None if args.no_compile else args.compile_mode
    torch.manual_seed(0)
    block = FluxDoubleBlock(args.hidden, args.heads, args.mlp).to(device=device, dtype=dtype).eval()
    d, b = args.hidden, args.batch
    inputs = (
        torch.randn(b, args.img_tokens, d, device=device, dtype=dtype),
        torch.randn(b, args.txt_tokens, d, device=device, dtype=dtype),
        torch.randn(b, d, device=device, dtype=dtype),
    )
    sample = {
        (d, 0): torch.randn(b, d, device=device, dtype=dtype),
        (d, 1): torch.randn(b * args.img_tokens, d, device=device, dtype=dtype),
        (args.mlp, 1): torch.randn(b * args.img_tokens, args.mlp, device=device, dtype=dtype),
    }
    with torch.no_grad():
        ref_out = block(*inputs)
    base_label = "bf16" if dtype == torch.bfloat16 else "fp16"
    rows = _measure(block, inputs, base_label, iters, device, compile_mode, None)
    for r in rows:
        r["weights_mib"] = round(vqsuite.module_nbytes(block) / 2**20, 1)
        r["kernels"] = "torch"
    for preset in presets:
        qblock = copy.deepcopy(block)
        try:
            vqsuite.quantize_model(qblock, _config(preset))
            impls = _impls(qblock, sample)
        except Exception as err:
            rows.append({"preset": preset, "mode": "-", "skipped": f"quantize failed: {type(err).__name__}: {err}"})
            continue
        for r in _measure(qblock, inputs, preset, iters, device, compile_mode, ref_out):
            r["weights_mib"] = round(vqsuite.module_nbytes(qblock) / 2**20, 1)
            r["kernels"] = impls
            rows.append(r)
        del qblock
        if device == "cuda":
            torch.cuda.empty_cache()
    base = {r["mode"]: r["ms"] for r in rows if r["preset"] == base_label and "ms" in r}
    for r in rows:
        if "ms" in r:
            r["ms"] = round(r["ms"], 3)
            if "eager" in base:
                r["x_vs_bf16_eager"] = round(base["eager"] / r["ms"], 3)
            if "compiled" in base:
                r["x_vs_bf16_compiled"] = round(base["compiled"] / r["ms"], 3)
            r["peak_mib"] = round(r["peak_mib"], 1)
    return rows


def print_rows(rows: list[dict]) -> None:
    print("| preset | mode | ms | × bf16 eager | × bf16 compiled | peak MiB | weights MiB | out SQNR dB | kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['preset']} | {r['mode']} | skipped: {r['skipped']} | | | | | | |")
            continue
        print(
            f"| {r['preset']} | {r['mode']} | {r['ms']:.2f} | {r.get('x_vs_bf16_eager', '')} "
            f"| {r.get('x_vs_bf16_compiled', '')} | {r['peak_mib']} | {r['weights_mib']} "
            f"| {r.get('sqnr_vs_bf16_db') or ''} | {r['kernels']} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("benchmarks/block.py needs a CUDA GPU and none is visible here; nothing was measured.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    import triton

    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if not args.smoke_cpu else "cpu smoke test: timings meaningless",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print("command: " + " ".join(sys.argv))
    rows = run(args)
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
