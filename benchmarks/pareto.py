"""Bytes-vs-quality Pareto fronts of vqsuite and SDNQ on the suite's trained pipelines and ImageNet CNNs, one run.

Every point quantizes a fresh copy of the model, counts the bytes of the denoiser (or the whole CNN) with
:func:`vqsuite.module_nbytes` (parameters + buffers after freeze/pack, each storage once; the very same function
for both libraries, so SDNQ's packed ``weight``/``scale``/``zero_point``/``svd_*`` tensors and everything either
library leaves float are counted alike), and measures fidelity to the FP32 model on the same inputs:

- ``mini-sd`` / ``mini-pixart``: PSNR and SSIM against the FP32 images of the same seeds (generated once per run),
  prompt alignment read by ``mnist-cnn3`` (functions of ``benchmarks/diffusion_quality.py``); 20 DDIM steps,
  guidance 4, image ``i`` from ``manual_seed(seed + i)``;
- ``mobilenet-v2`` / ``efficientnet-lite0``: top-1 agreement with FP32 over the shipped photos (helpers of
  ``benchmarks/quality_table.py --sections imagenet``).

Point labels (``--points``, comma-separated; ``+`` joins modifiers):

- ``fp32``; ``vq:<preset>`` (``quantize_pipeline`` / ``quantize_model``); ``vq:mixed<bits>``: per-layer INT4 g64 /
  INT8 weights (16-bit activations) from :func:`vqsuite.calibrators.allocate_bits` at that average-bits budget;
- ``sdnq:<dtype>[:g<group>][:svd<rank>][:conv][:all]``: ``sdnq_post_load_quant`` with that ``weights_dtype``,
  ``group_size``, ``use_svd``/``svd_rank``, ``quant_conv``, and ``:all`` = its size thresholds off
  (``minimum_allowed_numel=0``, ``minimum_allowed_channel_size=1``: its defaults skip layers under 16384 weights,
  i.e. most of a 1M-parameter denoiser);
- modifiers: ``+kept8`` (the layers the architecture rule keeps float get INT8 per-channel weights; ``+kept8t``: all
  but the timestep embedder; ``+kept8io``: all but the first and last layers; ``+kept8g``: the first and last
  layers in groups of 4), ``+g<N>`` (ImageNet CNNs: the preset's weights in groups of N along K),
  ``+norules`` (no architecture rule: every layer gets the recipe), ``+all`` (mixed: the kept layers take part in
  the allocation too), ``+bf16`` (every layer left float is stored and run in bfloat16 — for SDNQ too).

Rows are appended to ``--out`` (JSON lines, one per point, resumable: labels already there are skipped); ``--plot``
renders both fronts (bytes vs PSNR, or vs agreement) from every row of ``--out``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pareto.py --model mini-sd \\
        --out benchmarks/quality/pareto-mini-sd.jsonl --plot benchmarks/quality/pareto-mini-sd.png

SDNQ is a benchmark-only dependency (``pip install -r requirements/benchmarks.txt``); without it the SDNQ points
are skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# SDNQ compiles its dequantize-and-matmul with torch.compile(dynamic=False) and recompiles for every new shape,
# which on CPU costs far more than the sampling; eager runs the same math (set the variable to 1 to compile)
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import torch  # noqa: E402
from torch import nn  # noqa: E402

# this checkout's vqsuite (not whichever one the venv installed), and the sibling benchmark helpers
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

logger = logging.getLogger("pareto")

MIB = 2**20
DIFFUSION_MODELS = ("mini-sd", "mini-pixart")
IMAGENET_MODELS = ("mobilenet-v2", "efficientnet-lite0")
SENSITIVITY_STEPS = 4
SENSITIVITY_IMAGES = 8
#: the allocation's candidates: per-layer INT4 g64 (bf16 scales) or INT8 per-channel weights, 16-bit activations
MIXED_CANDIDATES = ("w4a16", "w8a16")

DIFFUSION_POINTS = (
    "fp32",
    "vq:w8a16",
    "vq:w8a16+bf16",
    "vq:w8a16+kept8",
    "vq:w8a16+kept8+bf16",
    "vq:w8a16+norules",
    "vq:w8a8",
    "vq:w4a16",
    "vq:w4a16+bf16",
    "vq:w4a16+kept8+bf16",
    "vq:w4a16+norules",
    "vq:w4a8",
    "vq:svdquant-int4",
    "vq:mixed5",
    "vq:mixed6",
    "vq:mixed5+all",
    "vq:mixed6+all",
    "vq:mixed7+all",
    "vq:mixed6+all+bf16",
    "sdnq:int8",
    "sdnq:int8:conv:all",
    "sdnq:int8:conv:all+bf16",
    "sdnq:int6:conv:all",
    "sdnq:uint4:conv:all",
    "sdnq:uint4:conv:all+bf16",
    "sdnq:uint4:g32:conv:all",
    "sdnq:int4:conv:all",
    "sdnq:uint4:svd16:conv:all",
)
IMAGENET_POINTS = (
    "fp32",
    "vq:w8a16", "vq:w8a8", "vq:w4a16", "vq:w8a16+bf16", "vq:mixed6",
    "sdnq:int8:conv", "sdnq:int8:conv:all", "sdnq:int6:conv:all", "sdnq:uint4:conv:all", "sdnq:uint4:g32:conv:all",
    "sdnq:int8:conv:all+bf16",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ modifiers
def float_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules that still hold float32 weights: neither vqsuite's quantized layers nor SDNQ's."""
    from vqsuite.nn import QConvBase, QLinear

    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QConvBase)) or hasattr(m, "sdnq_dequantizer") or any(True for _ in m.children()):
            continue
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if any(t.dtype == torch.float32 for t in own):
            out.append((name, m))
    return out


def float_weight_layers(model: nn.Module) -> list[str]:
    """Names of the float leaves with a weight of two or more dims (the Linear/conv/embedding layers left float)."""
    return [n for n, m in float_leaves(model) if getattr(getattr(m, "weight", None), "ndim", 0) >= 2]


def _to_bf16(args: Any) -> Any:
    if isinstance(args, torch.Tensor):
        return args.to(torch.bfloat16) if args.is_floating_point() else args
    if isinstance(args, tuple):
        return tuple(_to_bf16(a) for a in args)
    if isinstance(args, list):
        return [_to_bf16(a) for a in args]
    if isinstance(args, dict):
        return {k: _to_bf16(v) for k, v in args.items()}
    return args


def _to_f32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype == torch.bfloat16 else out
    if isinstance(out, tuple):
        return tuple(_to_f32(o) for o in out)
    return out


def store_float_leaves_bf16(model: nn.Module) -> int:
    """Store every float32 leaf left by quantization in bfloat16 and run it in bfloat16 (inputs cast in, outputs
    cast back to float32); returns how many modules changed."""
    leaves = float_leaves(model)
    for _, m in leaves:
        m.to(torch.bfloat16)
        m.register_forward_pre_hook(lambda _m, a, kw: (_to_bf16(a), _to_bf16(kw)), with_kwargs=True)
        m.register_forward_hook(lambda _m, _a, out: _to_f32(out))
    return len(leaves)


def parse_label(label: str) -> tuple[str, list[str], set[str]]:
    """``"sdnq:uint4:conv+bf16"`` -> (``"sdnq"``, [``"uint4"``, ``"conv"``], {``"bf16"``})."""
    head, *mods = label.split("+")
    lib, _, rest = head.partition(":")
    return lib, rest.split(":") if rest else [], set(mods)


def sdnq_kwargs(parts: list[str]) -> dict[str, Any]:
    """``["uint4", "g32", "svd16", "conv", "all"]`` -> ``sdnq_post_load_quant`` keyword arguments."""
    kw: dict[str, Any] = {"weights_dtype": parts[0]}
    for p in parts[1:]:
        if p == "conv":
            kw["quant_conv"] = True
        elif p == "all":
            kw.update(minimum_allowed_numel=0, minimum_allowed_channel_size=1)
        elif p.startswith("g"):
            kw["group_size"] = int(p[1:])
        elif p.startswith("svd"):
            kw.update(use_svd=True, svd_rank=int(p[3:]))
        else:
            raise ValueError(f"unknown SDNQ option {p!r} in {parts}")
    return kw


def have_sdnq() -> bool:
    try:
        import sdnq  # noqa: F401
    except ImportError:
        return False
    return True


def sdnq_quantize(model: nn.Module, parts: list[str]) -> nn.Module:
    from sdnq import sdnq_post_load_quant

    return sdnq_post_load_quant(model, **sdnq_kwargs(parts))


# ------------------------------------------------------------------------------------------------ fronts
def plot(rows: list[dict], metric: str, path: Path, title: str) -> None:
    from vqsuite.evals.pareto import pareto_front

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=90)
    for lib, color in (("vq", "tab:blue"), ("sdnq", "tab:orange")):
        rs = [r for r in rows if r["config"].split(":")[0] == lib and r.get(metric) is not None]
        if not rs:
            continue
        xs = [r["mib"] for r in rs]
        ys = [min(r[metric], 80.0) for r in rs]
        ax.scatter(xs, ys, s=14, color=color, alpha=0.5)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color=color,
                label={"vq": "vqsuite", "sdnq": "SDNQ 0.2.8"}[lib])  # fmt: skip
        for i in front:
            ax.annotate(rs[i]["config"].split(":", 1)[1], (xs[i], ys[i]), fontsize=6, color=color,
                        xytext=(3, 2), textcoords="offset points")  # fmt: skip
    fp = [r for r in rows if r["config"] == "fp32"]
    if fp:
        ax.axvline(fp[0]["mib"], color="grey", ls=":", lw=1, label="FP32 size")
    ax.set_xlabel("MiB (parameters + buffers after quantization)")
    ax.set_ylabel({"psnr": "PSNR vs FP32 images (dB)", "agreement": "top-1 agreement with FP32"}[metric])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    logger.info("wrote %s", path)


# ------------------------------------------------------------------------------------------------ vqsuite points
#: ``+kept8t``: the timestep embedder stays float (SDNQ's default skip list keeps ``time_embed*`` too)
TIME_EMBEDDER_PATTERNS = ("time_embedding.*", "*timestep_embedder*")


#: ``+kept8io``: the first and last layers stay float (by the rule's role text: "input conv (first layer)", ...)
IO_ROLES = ("first layer", "last layer")
#: ``+kept8g``: as ``+kept8`` but the first and last layers get INT8 in groups of this many weights along K (SDNQ's
#: INT8 conv scales are per output channel *and* kernel tap, which is what saves its first/last convs)
KEPT_IO_GROUP = 4


def kept8_config(
    model: nn.Module,
    preset: str,
    spare: tuple[str, ...] = (),
    spare_roles: tuple[str, ...] = (),
    io_group: int | None = None,
) -> Any:
    """``preset`` plus one INT8 per-channel override for each layer the architecture rule keeps float, except the
    layers matching ``spare`` and those whose rule role mentions one of ``spare_roles``; with ``io_group``, the
    first and last layers get INT8 in groups of ``io_group`` instead."""
    import fnmatch

    from vqsuite.calibrators.allocation import _escape
    from vqsuite.config import QuantSpec, resolve_config
    from vqsuite.pipelines.rules import _weight_layers, denoiser_config, layer_role, rule_for

    folded = denoiser_config(model, preset)
    kept = [n for n, _ in _weight_layers(model) if folded.spec_for(n) is None]
    kept = [n for n in kept if not any(fnmatch.fnmatchcase(n, p) for p in spare)]
    rules = rule_for(model)[0].layer_rules(model)
    kept = [n for n in kept if not any(r in getattr(layer_role(rules, n), "role", "") for r in spare_roles)]
    cfg = resolve_config(preset)
    io = {n for n in kept if any(r in getattr(layer_role(rules, n), "role", "") for r in IO_ROLES)}
    grouped = QuantSpec(weight="int8", weight_group_size=io_group) if io_group else QuantSpec(weight="int8")
    extra = tuple((_escape(n), grouped if n in io else QuantSpec(weight="int8")) for n in kept)
    return dataclasses.replace(cfg, overrides=extra + tuple(cfg.overrides), name=f"{cfg.name}+kept8")


class Runner:
    """Builds fresh models, quantizes them by label and measures them; caches the allocation's sensitivities."""

    def __init__(self, model_name: str, args: argparse.Namespace) -> None:
        self.name, self.a = model_name, args
        self.diffusion = model_name in DIFFUSION_MODELS
        self._sens: dict[bool, Any] = {}
        if self.diffusion:
            self._init_diffusion()
        else:
            self._init_imagenet()

    # -------------------------------------------------------------- diffusion
    def _init_diffusion(self) -> None:
        from diffusion_quality import call_kwargs, generate

        import vqsuite.zoo as zoo

        self.generate = generate
        self.cnn = zoo.load("mnist-cnn3")
        self.digits = torch.arange(10).repeat_interleave(self.a.n_per_digit)
        pipe, self.prompt_of = self.fresh()
        self.kw = call_kwargs(pipe)
        self.calib_prompts = [self.prompt_of(k) for k in range(10)]
        t0 = time.perf_counter()
        self.fp = generate(pipe, self.prompt_of, self.digits, self.a.seed, self.a.steps, self.a.batch)
        self.fp_s = time.perf_counter() - t0

    def fresh(self) -> tuple[Any, Any]:
        import vqsuite.zoo as zoo

        m = zoo.load(self.name)
        return m.model, m.preprocess

    def quantize_diffusion(self, label: str) -> tuple[Any, nn.Module, dict]:
        from vqsuite.pipelines.diffusers import find_denoiser, quantize_pipeline
        from vqsuite.pipelines.rules import ArchRule

        lib, parts, mods = parse_label(label)
        pipe, _ = self.fresh()
        den = find_denoiser(pipe)[1]
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if lib == "fp32":
            pass
        elif lib == "sdnq":
            sdnq_quantize(den, parts)
            extra["layers_quantized"] = sum(1 for m in den.modules() if hasattr(m, "sdnq_dequantizer"))
        else:
            preset = parts[0]
            qkw = dict(calib_prompts=self.calib_prompts, num_inference_steps=self.a.steps, guidance_scale=4.0,
                       calib_batch_size=10, **self.kw)  # fmt: skip
            if preset.startswith("mixed"):
                cfg = self.mixed_config(pipe, float(preset[5:]), "all" in mods)
                extra["avg_bits"] = round(self._last_alloc.avg_bits, 3)
            elif mods & {"kept8", "kept8t", "kept8io", "kept8g"}:
                spare = TIME_EMBEDDER_PATTERNS if "kept8t" in mods else ()
                io_group = KEPT_IO_GROUP if "kept8g" in mods else None
                cfg = kept8_config(den, preset, spare, IO_ROLES if "kept8io" in mods else (), io_group)
            else:
                cfg = preset
            rule = ArchRule("none", description="no rule: every layer gets the recipe") if "norules" in mods else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_pipeline(pipe, cfg, rule=rule, **qkw)
            extra["layers_quantized"] = len(den.vqsuite_report.quantized)
        self._float_layers = float_weight_layers(den)
        if "bf16" in mods:
            extra["bf16_modules"] = store_float_leaves_bf16(den)
        extra["quantize_s"] = round(time.perf_counter() - t0, 1)
        return pipe, den, extra

    def mixed_config(self, pipe: Any, budget: float, with_kept: bool) -> Any:
        from vqsuite.calibrators import allocate_bits
        from vqsuite.pipelines.diffusers import find_denoiser
        from vqsuite.pipelines.rules import _weight_layers

        if self.diffusion:
            den = find_denoiser(pipe)[1]
            layers = [n for n, _ in _weight_layers(den)] if with_kept else None
            kw: dict[str, Any] = dict(num_inference_steps=SENSITIVITY_STEPS, prompts=self.calib_prompts,
                                      pipe_kwargs=dict(guidance_scale=4.0, **self.kw), layers=layers)  # fmt: skip
        else:  # one model run per layer and candidate: score on the first SENSITIVITY_IMAGES calibration photos
            kw = dict(calib_data=[self.calib[0][:SENSITIVITY_IMAGES]])
        cfg, alloc, sens = allocate_bits(pipe, budget, MIXED_CANDIDATES, sensitivity=self._sens.get(with_kept),
                                         return_details=True, **kw)  # fmt: skip
        self._sens[with_kept] = sens
        self._last_alloc = alloc
        return cfg

    def measure_diffusion(self, label: str) -> dict:
        from digits_common import rgb

        from vqsuite.evals.fidelity import paired_metrics
        from vqsuite.pipelines.report import module_nbytes

        pipe, den, extra = self.quantize_diffusion(label)
        t0 = time.perf_counter()
        u8 = self.fp if label == "fp32" else self.generate(pipe, self.prompt_of, self.digits, self.a.seed,
                                                           self.a.steps, self.a.batch)  # fmt: skip
        gen_s = self.fp_s if label == "fp32" else time.perf_counter() - t0
        with torch.no_grad():
            pred = self.cnn.model(self.cnn.preprocess(u8)).argmax(-1)
        row: dict[str, Any] = {"model": self.name, "config": label, "n": int(self.digits.numel())}
        row["mib"] = round(module_nbytes(den) / MIB, 4)
        row["alignment"] = round((pred == self.digits).float().mean().item(), 4)
        if label != "fp32":
            pm = paired_metrics(rgb(self.fp), rgb(u8))
            row.update(psnr=round(pm["psnr"], 2), ssim=round(pm["ssim"], 4))
        row.update(extra, generate_s=round(gen_s, 1))
        return row

    # -------------------------------------------------------------- imagenet
    def _init_imagenet(self) -> None:
        from quality_table import run_batched

        import vqsuite.zoo as zoo
        from vqsuite.zoo.datasets import agreement_photos, foolbox_small_photos

        self.run_batched = run_batched
        m = zoo.load(self.name)
        self.fp_model = m.model
        self.xa = torch.stack([m.preprocess(i) for _, i in agreement_photos()[: self.a.max_photos]])
        self.calib = [torch.stack([m.preprocess(i) for i in foolbox_small_photos()])]
        self.fpa, self.fp_s = run_batched(m.model, [self.xa], 32)

    def measure_imagenet(self, label: str) -> dict:
        import vqsuite
        from vqsuite.evals.accuracy import agreement_from_logits

        lib, parts, mods = parse_label(label)
        q = copy.deepcopy(self.fp_model)
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if lib == "sdnq":
            q = sdnq_quantize(q, parts)
            extra["layers_quantized"] = sum(1 for m in q.modules() if hasattr(m, "sdnq_dequantizer"))
        elif lib == "vq":
            preset = parts[0]
            if preset.startswith("mixed"):
                cfg = self.mixed_config(q, float(preset[5:]), False)
                extra["avg_bits"] = round(self._last_alloc.avg_bits, 3)
            else:
                cfg = preset
            groups = [int(x[1:]) for x in mods if x.startswith("g") and x[1:].isdigit()]
            if groups:
                from vqsuite.config import get_preset

                base = get_preset(preset)
                cfg = dataclasses.replace(base, default=base.default.replace(weight_group_size=groups[0]))
            needs_calib = preset.startswith("svdquant")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = vqsuite.quantize_model(q, cfg, calib_data=self.calib if needs_calib else None)
            extra["layers_quantized"] = len(q.vqsuite_report.quantized)
        self._float_layers = float_weight_layers(q)
        if "bf16" in mods:
            extra["bf16_modules"] = store_float_leaves_bf16(q)
        extra["quantize_s"] = round(time.perf_counter() - t0, 1)
        qa, run_s = self.run_batched(q, [self.xa], 32)
        agr = agreement_from_logits(self.fpa, qa)
        row: dict[str, Any] = {"model": self.name, "config": label, "n": int(self.xa.shape[0])}
        row["mib"] = round(vqsuite.module_nbytes(q) / MIB, 4)
        row.update(agreement=round(agr["top1_agreement"], 4), kl=round(agr["kl"], 4),
                   logit_cosine=round(agr["logit_cosine"], 5))  # fmt: skip
        row.update(extra, run_s=round(run_s, 1))
        return row

    def measure(self, label: str) -> dict:
        row = self.measure_diffusion(label) if self.diffusion else self.measure_imagenet(label)
        row["float_weight_layers"] = self._float_layers
        row["date"] = time.strftime("%Y-%m-%d")
        return row


# ------------------------------------------------------------------------------------------------ main
def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict], metric: str) -> str:
    """Markdown table of ``rows`` sorted by bytes; ``*`` marks each library's Pareto front."""
    from vqsuite.evals.pareto import pareto_front

    fronts: set[str] = set()
    for lib in ("vq", "sdnq"):
        rs = [r for r in rows if r["config"].split(":")[0] == lib and r.get(metric) is not None]
        fronts |= {rs[i]["config"] for i in pareto_front([(r["mib"], r[metric]) for r in rs])}
    if metric == "psnr":
        head = "| config | MiB | PSNR vs FP (dB) | SSIM vs FP | alignment (mnist-cnn3) | layers q | sample s |"
    else:
        head = "| config | MiB | top-1 agreement % | mean KL | logit cosine | layers q | run s |"
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in sorted(rows, key=lambda r: r["mib"]):

        def f(k: str, fmt: str = "{}", r: dict = r) -> str:
            v = r.get(k)
            return "-" if v is None else fmt.format(v)

        name = f"**{r['config']}** *" if r["config"] in fronts else r["config"]
        if metric == "psnr":
            cells = [name, f("mib", "{:.3f}"), f("psnr", "{:.2f}"), f("ssim", "{:.4f}"), f("alignment", "{:.1%}"),
                     f("layers_quantized"), f("generate_s", "{:.0f}")]  # fmt: skip
        else:
            cells = [name, f("mib", "{:.3f}"), f("agreement", "{:.1%}"), f("kl", "{:.4f}"), f("logit_cosine", "{:.4f}"),
                     f("layers_quantized"), f("run_s", "{:.1f}")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("%", " %")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mini-sd", help=f"one of {DIFFUSION_MODELS + IMAGENET_MODELS}")
    p.add_argument("--points", default=None, help="comma-separated point labels (default: the model family's list)")
    p.add_argument("--n-per-digit", type=int, default=3, help="images per digit prompt (diffusion)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--max-photos", type=int, default=None, help="cap on the agreement photos (ImageNet models)")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended; labels already there are skipped")
    p.add_argument("--plot", type=Path, default=None, help="PNG of both fronts from every row of --out")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "transformers", "vqsuite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    diffusion = a.model in DIFFUSION_MODELS
    if not diffusion and a.model not in IMAGENET_MODELS:
        raise SystemExit(f"--model {a.model!r}: pick one of {DIFFUSION_MODELS + IMAGENET_MODELS}")
    metric = "psnr" if diffusion else "agreement"
    labels = a.points.split(",") if a.points else list(DIFFUSION_POINTS if diffusion else IMAGENET_POINTS)
    if not have_sdnq():
        skipped = [x for x in labels if x.startswith("sdnq")]
        if skipped:
            logger.warning("sdnq is not installed (pip install -r requirements/benchmarks.txt): skipping %s", skipped)
        labels = [x for x in labels if not x.startswith("sdnq")]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["config"] for r in read_rows(a.out)}
    todo = [x for x in labels if x not in done]
    if todo:
        from diffusion_quality import append_row

        t_run = time.perf_counter()
        runner = Runner(a.model, a)
        for label in todo:
            try:
                row = runner.measure(label)
            except Exception as e:  # a point that fails is a finding: record it, go on
                logger.exception("%s failed", label)
                row = {"model": a.model, "config": label, "error": f"{type(e).__name__}: {e}"[:300], "mib": None}
            logger.info("%s", {k: v for k, v in row.items() if k != "per_digit"})
            append_row(a.out, row)
        logger.info("run took %.0f s", time.perf_counter() - t_run)
    rows = [r for r in read_rows(a.out) if r.get("mib") is not None]
    print(table(rows, metric))
    if a.plot is not None:
        n = rows[0].get("n", "?") if rows else "?"
        what = f"{a.model}: PSNR vs FP32 over {n} images" if diffusion else f"{a.model}: agreement over {n} photos"
        plot(rows, metric, a.plot, f"{what}; blue vqsuite, orange SDNQ, lines = Pareto fronts")


if __name__ == "__main__":
    main()
