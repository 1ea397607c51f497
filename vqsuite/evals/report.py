"""Rendering a sweep: a markdown table, matplotlib plots, sample grids, and one self-contained HTML file.

Input is the sweep's ``results.jsonl`` (:func:`vqsuite.evals.sweep.read_results`). Outputs, under
``<sweep dir>/report/``:

* ``report.md`` -- one table per model: config, bits per weight, MiB, compression, every numeric metric, wall time;
  FID columns come with their N, extractor and resize in a note under the table.
* ``plot-<metric>-bits.png`` / ``plot-<metric>-memory.png`` -- the model's primary quality metric against bits per
  weight and against quantized MiB, one series per model, with its Pareto front (fewest bits / least memory for the
  best quality) drawn as a step line. matplotlib with the Agg backend (no display needed).
* ``grid-<model>.png`` -- the FP samples and each config's samples from the same seeds, one labelled row each.
* ``report.html`` -- all of the above in one file, images inlined as base64 PNG, no external resources.

API::

    paths = render_report("runs/x")                # {"markdown": Path, "html": Path, "plots": [...], "grids": [...]}
    print(markdown_table(read_results("runs/x/results.jsonl")))
    pareto_front([(4.5, 0.71), (8.2, 0.74), (6.0, 0.70)])   # indices on the front: [0, 1]
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: primary quality metric per model, first present wins: (metric key, higher is better)
PRIMARY_METRICS: tuple[tuple[str, bool], ...] = (
    ("top1", True),
    ("top1_agreement", True),
    ("fid_vs_data", False),
    ("fid_vs_fp", False),
    ("psnr", True),
    ("ssim", True),
    ("sqnr_median_db", True),
)
#: metric keys that are not numbers to tabulate
_NOTE_KEYS = ("fid_resize", "fid_extractor")
_COUNT_KEYS = ("n", "fid_n", "fid_data_n", "sqnr_layers")
#: sample strips lower than this are scaled up by an integer factor (nearest neighbour) in the grids
MIN_STRIP_HEIGHT = 64


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def _metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k, v in r.get("metrics", {}).items():
            if k not in keys and k not in _NOTE_KEYS and k not in _COUNT_KEYS and isinstance(v, (int, float)):
                keys.append(k)
    return keys


def _by_model(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def _mib(r: dict[str, Any]) -> float:
    return r["memory"]["bytes_q"] / 2**20


def _table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    keys = _metric_keys(rows)
    header = ["config", "bits/w", "MiB", "compression", *keys, "wall s"]
    body = []
    notes: list[str] = []
    for r in rows:
        m, mem = r.get("metrics", {}), r["memory"]
        body.append(
            [
                r["config_name"],
                f"{mem['bits_per_weight']:.2f}",
                f"{_mib(r):.2f}",
                f"{mem['compression']:.2f}x" if mem.get("compression") else "",
                *(_fmt(m.get(k)) for k in keys),
                f"{r.get('wall_s', 0):.1f}",
            ]
        )
        for note in _notes(r):
            if note not in notes:
                notes.append(note)
    return header, body, notes


def _notes(r: dict[str, Any]) -> list[str]:
    m = r.get("metrics", {})
    out = []
    if "fid_vs_fp" in m or "fid_floor" in m:
        out.append(
            f"FID: N={m.get('fid_n')} per set, extractor {m.get('fid_extractor')}, resize {m.get('fid_resize')}; "
            "fid_floor = FID between two FP sample sets with different seeds (what a perfect quantization shows)"
        )
    if "fid_vs_data" in m:
        out.append(f"fid_vs_data / kid_vs_data: N={m.get('fid_n')} samples vs {m.get('fid_data_n')} reference images")
    if "clip_score" in m:
        out.append("clip_score: torchmetrics CLIPScore with the sweep's local CLIP model")
    if "n" in m:
        out.append(f"accuracy/agreement/fidelity over n={m['n']} inputs")
    return out


def markdown_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """One markdown table per model (config rows), with notes on N, FID extractor and resize."""
    parts = [f"# {title}\n"] if title else []
    for model, mrows in _by_model(rows).items():
        header, body, notes = _table_rows(mrows)
        parts.append(f"## {model} ({mrows[0].get('kind', '')}, {mrows[0].get('source', '')})\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        parts.extend("| " + " | ".join(b) + " |" for b in body)
        parts.extend(["", *(f"- {n}" for n in notes), ""])
    return "\n".join(parts)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points ``(cost, quality)`` not dominated by another (no other point has cost <= and
    quality >= with one strict), sorted by cost. ``higher_is_better=False`` for metrics like FID."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (c, q) in enumerate(points):
        qi = sign * q
        dominated = any(
            (c2 <= c and sign * q2 >= qi) and (c2 < c or sign * q2 > qi) for j, (c2, q2) in enumerate(points) if j != i
        )
        if not dominated and not math.isnan(q):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def primary_metric(rows: Sequence[dict[str, Any]]) -> tuple[str, bool] | None:
    """The first of :data:`PRIMARY_METRICS` that every row has."""
    for key, hib in PRIMARY_METRICS:
        if rows and all(isinstance(r.get("metrics", {}).get(key), (int, float)) for r in rows):
            return key, hib
    return None


def plot_quality(
    rows: Sequence[dict[str, Any]], metric: str, higher_is_better: bool, x: str, path: str | os.PathLike
) -> Path:
    """Scatter of ``metric`` against ``x`` (``"bits"``: bits per weight, ``"memory"``: quantized MiB), one series per
    model, configs labelled, each model's Pareto front as a dashed step line. Written as PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for model, mrows in _by_model(rows).items():
        pts = [
            (r["memory"]["bits_per_weight"] if x == "bits" else _mib(r), float(r["metrics"][metric]))
            for r in mrows
            if isinstance(r.get("metrics", {}).get(metric), (int, float))
        ]
        if not pts:
            continue
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=model, zorder=3)
        for r, p in zip(mrows, pts):
            ax.annotate(r["config_name"], p, textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(pts, higher_is_better)
        if len(front) > 1:
            fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
            ax.step(fx, fy, where="post", linestyle="--", color=sc.get_facecolor()[0], alpha=0.7)
    ax.set_xlabel("bits per weight (module bytes x 8 / weight elements)" if x == "bits" else "quantized MiB")
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} vs {'bits per weight' if x == 'bits' else 'memory'} (dashed: Pareto front)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grid(rows: Sequence[dict[str, Any]], sweep_dir: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Stack one model's per-config sample strips (FP first), each labelled on the left; ``None`` without samples."""
    from PIL import Image, ImageDraw

    sweep_dir = Path(sweep_dir)
    strips = []
    ordered = sorted(rows, key=lambda r: (r["config_name"] != "fp",))
    for r in ordered:
        if r.get("samples") and (sweep_dir / r["samples"]).is_file():
            s = Image.open(sweep_dir / r["samples"]).convert("RGB")
            k = -(-MIN_STRIP_HEIGHT // s.height)  # small images (8x8 tests, 28x28 digits) scaled up, pixels kept
            strips.append((r["config_name"], s.resize((s.width * k, s.height * k), Image.NEAREST) if k > 1 else s))
    if not strips:
        return None
    label_w = 110
    width = label_w + max(s.width for _, s in strips)
    height = sum(s.height for _, s in strips)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, s in strips:
        canvas.paste(s, (label_w, y))
        draw.text((4, y + s.height // 2 - 5), name[:18], fill="black")
        y += s.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def html_report(
    rows: Sequence[dict[str, Any]],
    plots: Sequence[Path],
    grids: Sequence[tuple[str, Path]],
    path: str | os.PathLike,
    title: str = "vqsuite sweep",
) -> Path:
    """One self-contained HTML page: tables per model, plots and grids inlined as base64 PNG."""
    css = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;margin:0.5em 0;image-rendering:pixelated}.note{color:#555;font-size:0.9em}"
    )
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{css}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for model, mrows in _by_model(rows).items():
        header, body, notes = _table_rows(mrows)
        out.append(f"<h2>{html.escape(model)}</h2>")
        out.append(f'<table class="results" data-model="{html.escape(model)}"><thead><tr>')
        out.extend(f"<th>{html.escape(h)}</th>" for h in header)
        out.append("</tr></thead><tbody>")
        for b in body:
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in b) + "</tr>")
        out.append("</tbody></table>")
        out.extend(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    if plots:
        out.append("<h2>Plots</h2>")
        out.extend(
            f"<figure>{_img_tag(p, p.stem)}<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in plots
        )
    if grids:
        out.append("<h2>Samples (same seeds; FP first)</h2>")
        for name, p in grids:
            out.append(f"<figure>{_img_tag(p, 'samples ' + name)}<figcaption>{html.escape(name)}</figcaption></figure>")
    vers = rows[0].get("versions", {}) if rows else {}
    out.append('<p class="note">versions: ' + html.escape(", ".join(f"{k} {v}" for k, v in vers.items())) + "</p>")
    # lets a headless browser test read how many images decoded (no external resources are involved)
    out.append(
        "<script>window.addEventListener('load',()=>{const im=[...document.images];"
        "document.body.dataset.imagesLoaded=im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length;});"
        "</script>"
    )
    out.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def render_report(
    sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None
) -> dict[str, Any]:
    """Render everything for the sweep in ``sweep_dir``; returns the written paths.

    Under a multi-process launcher only rank 0 writes (other ranks return ``{}``), so ``accelerate launch vqsuite
    sweep ...`` renders one report."""
    from vqsuite.evals.sweep import RESULTS_FILE, read_results

    if int(os.environ.get("RANK", "0") or 0) != 0:
        logger.info("rank %s: the report is rendered by rank 0", os.environ.get("RANK"))
        return {}
    sweep_dir = Path(sweep_dir)
    rows = [r for r in read_results(sweep_dir / RESULTS_FILE) if r.get("status") == "ok"]
    if not rows:
        raise FileNotFoundError(f"no finished cells in {sweep_dir / RESULTS_FILE}")
    out_dir = Path(out) if out is not None else sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or f"vqsuite sweep {rows[0].get('sweep', '')}".strip()
    md = out_dir / "report.md"
    md.write_text(markdown_table(rows, title), encoding="utf-8")
    plots: list[Path] = []
    by_metric: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for mrows in _by_model(rows).values():
        pm = primary_metric(mrows)
        if pm is not None:
            by_metric.setdefault(pm, []).extend(mrows)
    for (metric, hib), mrows in by_metric.items():
        for x in ("bits", "memory"):
            plots.append(plot_quality(mrows, metric, hib, x, out_dir / f"plot-{metric}-{x}.png"))
    grids: list[tuple[str, Path]] = []
    for model, mrows in _by_model(rows).items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)
        g = sample_grid(mrows, sweep_dir, out_dir / f"grid-{safe}.png")
        if g is not None:
            grids.append((model, g))
    page = html_report(rows, plots, grids, out_dir / "report.html", title)
    logger.info("report written to %s", page)
    return {"markdown": md, "html": page, "plots": plots, "grids": [g for _, g in grids]}
