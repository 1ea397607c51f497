"""Reports: markdown table, plots, sample grids and a self-contained HTML page (checked structurally, and in a
headless Chromium when one is installed)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from evals_helpers import TinyExtractor, TinyGen, gen_sample, tiny_classifier
from PIL import Image

from vqsuite.evals.report import markdown_table, pareto_front, primary_metric, render_report
from vqsuite.evals.sweep import ConfigSpec, GeneratorTarget, ModelSpec, SweepSpec, read_results, run_sweep

pytest.importorskip("matplotlib")
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = SweepSpec(
        models=[
            ModelSpec(
                "cls", tiny_classifier, data=(x, torch.arange(8) % 10), key="cls", metrics=["accuracy", "agreement"]
            ),
            ModelSpec(
                "gen",
                lambda: GeneratorTarget(TinyGen().eval(), gen_sample),
                key="gen",
                num_samples=4,
                metrics=["fidelity", "fid-vs-fp"],
            ),
        ],
        configs=[ConfigSpec("w8a8"), ConfigSpec("w4a4")],
        extractor=TinyExtractor(),
        name="report-test",
    )
    run_sweep(spec, out, progress=False, stop_on_error=True)
    return out


def test_pareto_front() -> None:
    pts = [(4.5, 0.71), (8.2, 0.74), (6.0, 0.70), (16.0, 0.74), (3.0, 0.2)]
    assert pareto_front(pts) == [4, 0, 1]  # (6.0, .70) and (16, .74) are dominated
    assert pareto_front([(4, 30.0), (8, 10.0), (6, 40.0)], higher_is_better=False) == [0, 1]
    assert pareto_front([]) == []


def test_markdown_table(sweep_dir: Path) -> None:
    rows = read_results(sweep_dir / "results.jsonl")
    md = markdown_table(rows, "T")
    assert md.startswith("# T")
    assert "## cls (classifier" in md and "## gen (generator" in md
    assert "| config | bits/w | MiB | compression |" in md
    assert md.count("| w4a4 |") == 2 and md.count("| fp |") == 2
    assert "N=4 per set, extractor tiny-extractor, resize PIL bicubic" in md
    assert primary_metric([r for r in rows if r["model"] == "cls"]) == ("top1", True)
    assert primary_metric([r for r in rows if r["model"] == "gen"]) == ("fid_vs_fp", False)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained(sweep_dir: Path) -> None:
    paths = render_report(sweep_dir)
    assert {p.name for p in paths["plots"]} == {
        "plot-top1-bits.png",
        "plot-top1-memory.png",
        "plot-fid_vs_fp-bits.png",
        "plot-fid_vs_fp-memory.png",
    }
    assert [p.name for p in paths["grids"]] == ["grid-gen.png"]
    grid = Image.open(paths["grids"][0])
    assert grid.height == 3 * (8 + 4) * 6  # FP + two configs, one strip each (8 px + 2x2 px padding, scaled x6)
    text = paths["html"].read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == 5  # 4 plots + 1 grid
    for a in imgs:
        src = a["src"] or ""
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.width > 10
    for t, a in parser.tags:  # nothing is fetched from anywhere
        assert not (a.get("href") or "").startswith(("http", "/", "file:")), (t, a)
        if t in ("script", "link", "iframe"):
            assert not a.get("src") and not a.get("href"), (t, a)
    tables = [a for t, a in parser.tags if t == "table"]
    assert [a["data-model"] for a in tables] == ["cls", "gen"]
    assert text.count("<tr><td>") == 6  # 3 configs x 2 models (+ one header row per table)


@pytest.mark.skipif(BROWSER is None, reason="no headless browser installed (chromium, chromium-browser, google-chrome)")
def test_html_in_headless_browser(sweep_dir: Path, tmp_path: Path) -> None:
    page = render_report(sweep_dir)["html"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run(
        [BROWSER, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2) == "5", dom[:500]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [BROWSER, *flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # something was drawn


def test_only_rank_zero_renders(sweep_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert render_report(sweep_dir, out=tmp_path / "r1") == {}
    assert not (tmp_path / "r1").exists()
    with pytest.raises(FileNotFoundError, match="no finished cells"):
        monkeypatch.setenv("RANK", "0")
        render_report(tmp_path)
