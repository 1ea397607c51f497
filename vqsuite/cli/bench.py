"""``vqsuite bench [gemm|block] [--quick]``: the kernel and block benchmarks of ``benchmarks/`` (CUDA only).

Options this command does not know go to the scripts' own parsers (``vqsuite bench gemm --m 16 --shapes 3072,3072``).
The benchmark scripts live in the source checkout (``benchmarks/gemm.py``, ``benchmarks/block.py``), not in the
installed package; each exposes ``run(args) -> list[dict]``. Rows are printed as a table and, with ``--json``,
written as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from vqsuite.cli.errors import CLIError, one_line, unavailable

logger = logging.getLogger(__name__)

BENCHMARKS = ("gemm", "block")


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    b = sub.add_parser(
        "bench",
        parents=parents,
        help="run the kernel (gemm) and transformer-block (block) benchmarks against the torch baseline (CUDA)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    b.add_argument("which", nargs="?", choices=BENCHMARKS + ("all",), default="all", help="which benchmark (all)")
    b.add_argument("--quick", action="store_true", help="a few shapes, few repeats (a smoke run)")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    b.add_argument("--force", action="store_true", help="replace an existing --json file")
    # the benchmark scripts' own check of themselves on CPU (tiny shapes, no timing worth reading)
    b.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    b.set_defaults(fn=run, pass_through=True, extra=[])


def benchmarks_dir() -> Path:
    """``benchmarks/`` beside the ``vqsuite`` package (a source checkout or an editable install)."""
    import vqsuite

    return Path(vqsuite.__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` by path; one line when this build does not have it."""
    file = benchmarks_dir() / f"{name}.py"
    if not file.is_file():
        raise unavailable(f"vqsuite bench {name}", f"no {file}; run from a source checkout of vqsuite")
    spec = importlib.util.spec_from_file_location(f"vqsuite_bench_{name}", file)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        raise unavailable(f"vqsuite bench {name}", one_line(e)) from None
    if not callable(getattr(mod, "run", None)):
        raise unavailable(f"vqsuite bench {name}", f"{file} has no run(args)")
    return mod


def _bench_args(mod: ModuleType, quick: bool, smoke_cpu: bool = False, extra: list[str] | None = None) -> Any:
    """The benchmark's own argument namespace (its ``parse_args``), with ``--quick`` and pass-through flags."""
    argv = (["--quick"] if quick else []) + (["--smoke-cpu"] if smoke_cpu else []) + list(extra or [])
    parse = getattr(mod, "parse_args", None)
    if callable(parse):
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                return parse(argv)
        except SystemExit:
            last = " ".join(err.getvalue().strip().splitlines()[-1:])
            why = last.split("error: ", 1)[-1] or f"rejected {argv}"
            raise CLIError(f"{mod.__file__}: {why}") from None
    if extra:
        raise CLIError(f"{mod.__file__} takes no options of its own ({' '.join(extra)})")
    return argparse.Namespace(quick=quick, smoke_cpu=smoke_cpu)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as an aligned text table."""
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [keys] + [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    return "\n".join("  ".join(row[i].rjust(widths[i]) for i in range(len(keys))) for row in table)


class _WatchedStdout:
    """stdout that remembers whether anything was printed (did the benchmark print its own table?)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.wrote = stream, False

    def write(self, s: str) -> int:
        self.wrote = self.wrote or bool(s.strip())
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def run(args: argparse.Namespace) -> int:
    import torch

    names = BENCHMARKS if args.which == "all" else (args.which,)
    target = Path(args.json).expanduser() if args.json else None
    if target is not None:
        if target.is_dir():
            raise CLIError(f"--json {target} is a folder")
        if target.exists() and not args.force:
            raise CLIError(f"--json {target} exists; pass --force to replace it")
    mods = {name: load_benchmark(name) for name in names}
    parsed = {name: _bench_args(mod, args.quick, args.smoke_cpu, args.extra) for name, mod in mods.items()}
    if not torch.cuda.is_available() and not args.smoke_cpu:
        raise CLIError("vqsuite bench needs a CUDA GPU (the benchmarks time GPU kernels); none is visible")
    device = "cpu (smoke run, timings meaningless)" if args.smoke_cpu else torch.cuda.get_device_name()
    results: dict[str, list[dict[str, Any]]] = {}
    for name, mod in mods.items():
        print(f"== vqsuite bench {name} on {device} ==", flush=True)
        watch = _WatchedStdout(sys.stdout)
        with contextlib.redirect_stdout(watch):
            rows = list(mod.run(parsed[name]))
        results[name] = rows
        if not watch.wrote:  # gemm prints each shape's table as it goes; block leaves printing to its caller
            show = getattr(mod, "print_rows", None)
            if callable(show) and rows:
                show(rows)
            else:
                print(format_rows(rows))
        print(f"{name}: {len(rows)} rows")
    if target is not None:
        target.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {target}")
    return 0
