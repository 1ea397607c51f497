"""Architecture coverage: every timm family and every diffusers denoiser, quantized with every generic preset.

Each case (one small model per timm family from ``tests/coverage/timm_cases.py``, one small-config denoiser per
diffusers class from ``tests/coverage/denoiser_cases.py``) is run by ``coverage_run.run_case``: float forward,
``quantize_model`` with the preset (denoisers through their architecture rule), quantized forward. Printed: one
row per architecture × preset (status, quantized fraction of the matrix weights, output SQNR vs float in dB, first
error line), then a summary per preset (ok / noop / nonfinite / error) and the most common reasons layers were
skipped. Denoiser classes of the installed diffusers without a builder are listed as "no case".

Run: ``.venv/bin/python benchmarks/coverage.py [--timm] [--diffusers] [--presets w8a8 w4a16]
[--families resnet convnext] [--out results.jsonl] [--markdown]`` (neither --timm nor --diffusers: both).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "coverage"))

from coverage_run import GENERIC_PRESETS, Builder, CaseResult, run_case  # noqa: E402

logger = logging.getLogger("benchmarks.coverage")

#: status of a denoiser class that has no builder in DENOISER_CASES
NO_CASE = "no case"
#: skip reasons shown in the summary
TOP_REASONS = 12


@dataclasses.dataclass
class Case:
    kind: str  # "timm" or "diffusers"
    arch: str  # timm family or diffusers class
    model: str  # timm model name or diffusers class
    build: Builder | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timm", action="store_true", help="run the timm families")
    ap.add_argument("--diffusers", action="store_true", help="run the diffusers denoisers")
    ap.add_argument("--presets", nargs="+", default=list(GENERIC_PRESETS), help="presets (default: GENERIC_PRESETS)")
    ap.add_argument("--families", nargs="+", help="only these timm families / timm models / diffusers classes")
    ap.add_argument("--out", type=Path, help="write one JSON line per case here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--load", type=Path, nargs="+", help="print the tables of these --out files instead of running")
    args = ap.parse_args(argv)
    if not args.timm and not args.diffusers:
        args.timm = args.diffusers = True
    return args


def collect_cases(args: argparse.Namespace) -> list[Case]:
    cases: list[Case] = []
    wanted = set(args.families) if args.families else None
    if args.timm:
        from timm_cases import TIMM_FAMILIES, timm_case

        for family, model in TIMM_FAMILIES.items():
            if wanted is None or family in wanted or model in wanted:
                cases.append(Case("timm", family, model, timm_case(model)))
    if args.diffusers:
        from denoiser_cases import DENOISER_CASES, all_denoiser_classes

        for cls in sorted(set(all_denoiser_classes()) | set(DENOISER_CASES)):
            if wanted is None or cls in wanted:
                cases.append(Case("diffusers", cls, cls, DENOISER_CASES.get(cls)))
    return cases


def run(args: argparse.Namespace) -> list[dict]:
    """Run every case × preset; one dict per run (CaseResult fields + kind, arch)."""
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    cases = collect_cases(args)
    rows: list[dict] = []
    out = args.out.open("w") if args.out else None
    todo = [(c, p) for c in cases for p in args.presets]
    try:
        for case, preset in tqdm(todo, desc="coverage", unit="case", file=sys.stderr):
            if case.build is None:
                res = CaseResult(case.model, preset, NO_CASE)
            else:
                res = run_case(case.model, case.build, preset, denoiser=case.kind == "diffusers")
            row = {"kind": case.kind, "arch": case.arch, **dataclasses.asdict(res)}
            rows.append(row)
            if out is not None:
                out.write(json.dumps(row, default=str) + "\n")
                out.flush()
    finally:
        if out is not None:
            out.close()
    return rows


def _table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in body])


def _db(x: float) -> str:
    return "inf" if x == float("inf") else ("-" if x != x else f"{x:.1f}")


def normalize_reason(reason: str) -> str:
    """A skip reason with its numbers replaced by N, so the same cause on different shapes counts once."""
    return re.sub(r"\d+", "N", reason)


def report(rows: list[dict], presets: list[str], markdown: bool) -> str:
    """The per-case table, the per-preset summary and the most common skip reasons."""
    parts = []
    body = [
        [
            r["kind"],
            r["arch"] if r["arch"] == r["name"] else f"{r['arch']} ({r['name']})",
            r["preset"],
            r["status"],
            f"{r['fraction']:.2f}",
            _db(r["sqnr_db"]),
            f"{r['seconds']:.1f}",
            r["error"][:160],
        ]
        for r in rows
    ]
    parts.append(_table(["kind", "architecture", "preset", "status", "frac", "SQNR dB", "s", "error"], body, markdown))
    statuses = ["ok", "noop", "nonfinite", "error", NO_CASE]
    summary = []
    for kind in sorted({r["kind"] for r in rows}):
        for p in presets:
            c = Counter(r["status"] for r in rows if r["preset"] == p and r["kind"] == kind)
            fr = [r["fraction"] for r in rows if r["preset"] == p and r["kind"] == kind and r["status"] == "ok"]
            mean = f"{sum(fr) / len(fr):.2f}" if fr else "-"
            summary.append([kind, p] + [str(c.get(s, 0)) for s in statuses] + [mean])
    parts.append(_table(["kind", "preset", *statuses, "mean frac (ok)"], summary, markdown))
    reasons: Counter[str] = Counter()
    archs: dict[str, set[str]] = {}
    for r in rows:
        for reason, n in r["skipped"].items():
            key = normalize_reason(reason)
            reasons[key] += n
            archs.setdefault(key, set()).add(r["arch"])
    top = [[str(n), str(len(archs[k])), k[:140]] for k, n in reasons.most_common(TOP_REASONS)]
    parts.append(_table(["layers skipped", "architectures", "reason (numbers as N)"], top, markdown))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.load:
        rows = [json.loads(line) for path in args.load for line in path.read_text().splitlines() if line.strip()]
        # the last run of an (architecture, preset) wins (a rerun after an interrupted run)
        rows = list({(r["kind"], r["arch"], r["preset"]): r for r in rows if r["preset"] in args.presets}.values())
    else:
        rows = run(args)
    print(report(rows, args.presets, args.markdown))
    import diffusers
    import timm

    cpu = platform.processor() or platform.machine()
    print(
        f"\n{len(rows)} runs"
        + ("" if args.load else f" in {time.perf_counter() - t0:.0f} s")
        + f"; {datetime.date.today()}, {cpu}, "
        f"torch {torch.__version__}, timm {timm.__version__}, diffusers {diffusers.__version__}, "
        f"{args.threads} thread(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
