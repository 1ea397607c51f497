"""``vqsuite sweep config.toml [--out DIR]``: run a resumable grid of models x configs x metric sets.

The declaration format and the results folder are :mod:`vqsuite.evals.sweep`'s. Rerunning the same command resumes:
finished cells (one JSON line each in ``DIR/results.jsonl``) are never recomputed. When the report renderer is in
this build, the tables, plots and one self-contained HTML report are written to ``DIR`` after the cells.

A ``python:pkg.module:function`` model source, data or reference in the TOML imports that module and calls the
function: running a sweep file runs the code it names. Run only sweep files you trust, or pass
``--no-python-targets`` to refuse such targets.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from vqsuite.cli.errors import CLIError, check_int, one_line, unavailable

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "sweep",
        parents=parents,
        help="run a resumable sweep declared in TOML (models x presets x metric sets) and render its report",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=__doc__.split("\n\n")[2].replace("``", ""),
    )
    s.add_argument("config", help="sweep declaration (.toml)")
    s.add_argument("--out", help="results folder (default: the TOML's `out`, else sweep-<name>)")
    s.add_argument("--force", action="store_true", help="use a non-empty --out that holds no sweep results")
    s.add_argument("--max-cells", type=int, help="compute at most this many cells, then stop (resume later)")
    s.add_argument("--stop-on-error", action="store_true", help="stop at the first failing cell (default: log it)")
    s.add_argument("--no-report", action="store_true", help="do not render the report after the cells")
    s.add_argument("--no-python-targets", action="store_true", help="refuse python:pkg.mod:fn model sources, data "
                   "and references (they import and run that code)")  # fmt: skip
    s.set_defaults(fn=run)


def load_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML, or one line naming the file, line and column of the syntax error."""
    import tomllib

    if not path.exists():
        raise CLIError(f"sweep file {path} does not exist")
    if path.is_dir():
        raise CLIError(f"{path} is a folder; give the sweep's .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"{path} is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CLIError(f"{path} is not valid TOML: {one_line(e, with_type=False)}") from None


def check_results_dir(out: Path, force: bool) -> None:
    """A sweep folder is reused on purpose (resume); a folder of other files is refused without ``--force``."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULTS_FILE).is_file() and not force:
        raise CLIError(f"--out {out} is not empty and holds no {RESULTS_FILE}; pass --force to write the sweep there")


def _render(rows: list[dict[str, Any]], out: Path, quiet: bool) -> list[str]:
    """Render the report when :mod:`vqsuite.evals.report` is in this build; the files written."""
    try:
        from vqsuite.evals import report
    except ImportError:
        logger.warning("vqsuite.evals.report is not in this build; results only")
        return []
    render = getattr(report, "render_report", None)
    if render is None:
        logger.warning("vqsuite.evals.report has no render_report; results only")
        return []
    written = render(out)
    files: list[str] = []
    for v in written.values() if isinstance(written, dict) else [written]:
        files += [str(f) for f in v] if isinstance(v, (list, tuple)) else [str(v)] if v else []
    return files


def _table(rows: list[dict[str, Any]]) -> str:
    try:
        from vqsuite.evals.report import markdown_table
    except ImportError:
        markdown_table = None
    if markdown_table is not None:
        try:
            return markdown_table(rows)
        except TypeError:
            pass
    lines = []
    for r in rows:
        metrics = r.get("metrics") or {}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        lines.append(f"{r.get('model')} x {r.get('config_name')}: {shown}")
    return "\n".join(lines)


def check_configs(spec: Any) -> None:
    """Resolve every config before any cell runs: an unknown preset or a bad config dict is the user's error,
    not a failed cell to be logged and retried."""
    for c in spec.configs:
        try:
            c.resolved()
        except ValueError as e:
            raise CLIError(f"config {c.name!r}: {one_line(e, with_type=False)}") from None


def is_main_process() -> bool:
    """Under ``accelerate launch`` every process runs the sweep; only rank 0 prints and renders."""
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    try:
        from vqsuite.evals import sweep as sweep_mod
    except ImportError as e:
        raise unavailable("vqsuite sweep", f"vqsuite.evals.sweep: {one_line(e)}") from None
    path = Path(args.config).expanduser()
    check_int(args.max_cells, "--max-cells", 1, 10**9)
    data = load_toml(path)
    # SweepError (a ValueError): one line
    spec = sweep_mod.spec_from_dict(data, base_dir=path.parent, allow_python=not args.no_python_targets)
    check_configs(spec)
    out = Path(args.out).expanduser() if args.out else Path(spec.out or f"sweep-{sweep_mod._safe(spec.name)}")
    check_results_dir(out, args.force)
    n_cells = len(spec.cells())
    if is_main_process():
        print(f"sweep {spec.name}: {n_cells} cells -> {out / RESULTS_FILE}")
    rows = sweep_mod.run_sweep(
        spec, out, progress=not args.quiet, stop_on_error=args.stop_on_error, max_cells=args.max_cells
    )
    if not is_main_process():
        return 0
    ok = {r.get("hash") for r in rows}
    errors = {
        r.get("hash")
        for r in sweep_mod.read_results(out / RESULTS_FILE)
        if r.get("status") == "error" and r.get("hash") not in ok
    }
    print(_table(rows))
    print(f"{len(rows)}/{n_cells} cells finished")
    if errors:
        print(f"{len(errors)} cell(s) failed; their errors are in {out / RESULTS_FILE} (rerun to retry them)")
    if not args.no_report and rows:
        for f in _render(rows, out, args.quiet):
            print(f"wrote {f}")
    return 0
