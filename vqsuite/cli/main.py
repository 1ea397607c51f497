"""The ``vqsuite`` command: a thin shell over the library.

Subcommands: ``quantize``, ``generate``, ``eval``, ``sweep``, ``bench``, ``finetune``, ``presets``, ``formats``,
``info``, ``demo`` (one module per command under :mod:`vqsuite.cli`).

Errors are sorted in two (:func:`vqsuite.cli.errors.user_error_line` holds the rules):

* **the input is wrong** -- :class:`~vqsuite.cli.errors.CLIError`, the library's :class:`~vqsuite.errors.UserError`
  (``ConfigError``, ``CheckpointError``, ``SweepError``, ...), a missing, unreadable or unwritable file, a full or
  read-only disk, a missing optional dependency, out of memory: one line ``vqsuite <cmd>: error: ...`` on stderr,
  exit code 2 (:data:`EXIT_USAGE`), never a traceback;
* **a bug** -- any other exception (a plain ``ValueError``, ``TypeError``, ``RuntimeError``, ``KeyError`` ...):
  one line ``vqsuite <cmd>: internal error: <Type>: ... -- this is a bug, please report it``, exit code 1
  (:data:`EXIT_INTERNAL`).

``--debug`` (or ``VQSUITE_DEBUG=1``) prints the traceback before either line. ``--device`` is checked (and ``auto``
resolved) before a command runs, for every command that takes it.

The CLI only reads local files: ``HF_HUB_OFFLINE=1`` is set unless the environment says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from vqsuite.cli.errors import (
    EXIT_INTERNAL,
    EXIT_USAGE,
    ArgParser,
    ArgumentError,
    CLIError,
    check_device,
    check_out_dir,
    internal_error_line,
    user_error_line,
)

__all__ = ["EXIT_INTERNAL", "EXIT_USAGE", "build_parser", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    import vqsuite
    from vqsuite.cli.demo import DEMO_PRESETS, run_demo
    from vqsuite.cli.demo_sd import DEMO_SD_PRESET, mini_sd_available, run_sd_demo

    model = args.model or ("mini-sd" if mini_sd_available() else "mobilenet-v2")
    if model == "mini-sd":
        if not mini_sd_available():
            raise CLIError("mini-sd does not ship in this install (vqsuite/zoo/weights/mini-sd is missing)")
        if not 1 <= args.steps <= 1000:
            raise CLIError(f"--steps {args.steps} must lie in [1, 1000]")
        presets = tuple(args.presets.split(",")) if args.presets else (DEMO_SD_PRESET,)
        for p in presets:
            vqsuite.get_preset(p)  # an unknown name fails before any work
        out = Path(args.out or "vqsuite-demo")
        # a rerun replaces the demo's own earlier output (every file listed in its manifest), nothing else
        check_out_dir(out, force=True, kind="demo", force_flag=None)
        if len(presets) == 1:
            run_sd_demo(out, preset=presets[0], steps=args.steps)
            return 0
        from vqsuite.fileio import atomic_folder

        with atomic_folder(out, kind="demo") as tmp:  # one folder per preset, replaced together
            for p in presets:
                run_sd_demo(tmp / p, preset=p, steps=args.steps, shown_as=out / p)
        return 0
    presets = tuple(args.presets.split(",")) if args.presets else DEMO_PRESETS
    for p in presets:
        vqsuite.get_preset(p)  # an unknown name fails before any work
    if args.out:  # a quantized checkpoint; a rerun replaces the demo's own earlier one, nothing else
        check_out_dir(args.out, force=True, kind="checkpoint", force_flag=None)
    run_demo(presets, out=args.out)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    import vqsuite

    for name, desc in vqsuite.describe_presets().items():
        spec = vqsuite.get_preset(name).default
        print(f"{name:<18} {spec.short():<34} {desc}")
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    from vqsuite.formats import get_format, list_formats

    names = list_formats()
    width = max(map(len, names), default=0)
    for name in names:
        f = get_format(name)
        print(f"{name:<{width}} {f.bits} bits  {f.bits_per_element:5.2f} bits/elem with block scales  {f.description}")
    return 0


def _info_pipeline(args: argparse.Namespace) -> int:
    from vqsuite.pipelines.diffusers_io import read_pipeline_meta

    meta = read_pipeline_meta(args.path)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    comps = ", ".join(f"{k} ({v.get('class')})" for k, v in meta["quantized"].items())
    print(f"{args.path}: quantized {meta['pipeline_class']}, vqsuite {meta.get('vqsuite_version')}; quantized: {comps}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vqsuite.pipelines.io import PIPELINE_META_NAME, read_checkpoint_meta, recover_interrupted_save

    recover_interrupted_save(args.path)  # a save killed mid-way: restore the previous folder before looking
    if (Path(args.path) / PIPELINE_META_NAME).is_file():
        return _info_pipeline(args)
    meta = read_checkpoint_meta(args.path)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(
        f"{args.path}: {len(meta['layers'])} quantized layers, vqsuite {meta.get('vqsuite_version')}, "
        f"model {meta.get('model_class')}"
    )
    if meta.get("config"):
        print(f"config: {meta['config'].get('name') or 'custom'}")
    counts: dict[str, int] = {}
    from vqsuite.config import QuantSpec

    for entry in meta["layers"].values():
        label = QuantSpec.from_dict(entry["spec"]).short()
        counts[label] = counts.get(label, 0) + 1
    for label, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d} x {label}")
    return 0


def _common_parent() -> argparse.ArgumentParser:
    """Flags every subcommand also accepts after its name (``vqsuite generate ... --debug``).

    ``SUPPRESS`` defaults keep a flag given before the subcommand from being reset by the subparser.
    """
    p = ArgParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens (INFO)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return p


def build_parser() -> argparse.ArgumentParser:
    from vqsuite.cli import bench, finetune, generate, quantize, sweep
    from vqsuite.cli import eval as eval_cmd

    p = ArgParser(prog="vqsuite", description="Low-bit quantization for diffusion and vision models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parents = [_common_parent()]
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgParser)

    quantize.add_parser(sub, parents)
    generate.add_parser(sub, parents)
    eval_cmd.add_parser(sub, parents)
    sweep.add_parser(sub, parents)
    bench.add_parser(sub, parents)
    finetune.add_parser(sub, parents)

    sub.add_parser("presets", parents=parents, help="list the named presets").set_defaults(fn=_cmd_presets)
    sub.add_parser("formats", parents=parents, help="list the number formats").set_defaults(fn=_cmd_formats)

    i = sub.add_parser("info", parents=parents, help="describe a saved quantized checkpoint or pipeline folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print the raw JSON")
    i.set_defaults(fn=_cmd_info)

    d = sub.add_parser(
        "demo",
        parents=parents,
        help="the main job: mini-sd (trained here) at 4 bits, FP vs quantized grid, memory, fidelity, alignment; "
        "--model mobilenet-v2: a real MobileNetV2 with every baseline preset",
    )
    d.add_argument(
        "--model",
        choices=("mini-sd", "mobilenet-v2"),
        help="demo model (default: mini-sd when it ships in this install, else mobilenet-v2)",
    )
    d.add_argument("--presets", help="comma-separated preset names (default: svdquant-int4 / all baselines)")
    d.add_argument("--steps", type=int, default=20, help="mini-sd denoising steps (default 20)")
    d.add_argument(
        "--out", help="mini-sd: output folder (default vqsuite-demo); mobilenet-v2: save the last preset and reload"
    )
    d.set_defaults(fn=_cmd_demo)
    return p


def _wants_debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("VQSUITE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    debug = _wants_debug(argv)
    command = "vqsuite"
    args: argparse.Namespace | None = None
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra and getattr(args, "pass_through", False):  # `vqsuite bench gemm --m 16`: the script's own flags
            args.extra, extra = extra, []
        if extra:  # name the subcommand whose options were wrong (argparse would blame the top-level parser)
            prog = f"vqsuite {args.command}"
            raise ArgumentError(f"unrecognized arguments: {' '.join(extra)} (see {prog} --help)", prog)
        args.verbose = getattr(args, "verbose", False)
        args.quiet = getattr(args, "quiet", False)
        command = f"vqsuite {args.command}"
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        if isinstance(getattr(args, "device", None), str):  # refused (or resolved) before the command does any work
            args.device = check_device(args.device)
        return args.fn(args)
    except SystemExit as e:  # --help and friends
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        command = getattr(e, "prog", command)
        if debug:
            traceback.print_exc()
        line = user_error_line(e, out=getattr(args, "out", None) if args is not None else None)
        if line is not None:
            print(f"{command}: error: {line}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{command}: {internal_error_line(e, debug=debug)}", file=sys.stderr)
        return EXIT_INTERNAL


def _run() -> Any:
    sys.exit(main())


if __name__ == "__main__":
    _run()
