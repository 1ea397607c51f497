"""The ``vqsuite`` command: a thin shell over the library.

Subcommands: ``demo``, ``presets``, ``formats``, ``quantize``, ``info``. A user error (wrong path, corrupt
checkpoint, impossible config) prints one line to stderr and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_USAGE = 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from vqsuite.cli.demo import DEMO_PRESETS, run_demo

    presets = tuple(args.presets.split(",")) if args.presets else DEMO_PRESETS
    import vqsuite

    for p in presets:
        vqsuite.get_preset(p)  # an unknown name fails before any work
    run_demo(presets, out=args.out)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    import vqsuite

    for name, desc in vqsuite.describe_presets().items():
        spec = vqsuite.get_preset(name).default
        print(f"{name:<14} {spec.short():<34} {desc}")
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    from vqsuite.formats import get_format, list_formats

    for name in list_formats():
        f = get_format(name)
        print(f"{name:<10} {f.bits} bits  {f.bits_per_element:5.2f} bits/elem with block scales  {f.description}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    import vqsuite
    from vqsuite.cli.models import build_model

    model = build_model(args.model, args.weights)
    calib = None
    if args.calib_batches:
        size = args.input_size
        calib = [torch.randn(args.batch_size, 3, size, size) for _ in range(args.calib_batches)]
    vqsuite.quantize_model(model, args.preset, calib_data=calib, exclude=args.exclude or None)
    print(model.vqsuite_report if args.verbose else model.vqsuite_report.summary())
    lib, _, arch = args.model.partition(":")
    source = {"library": "timm", "name": arch, "kwargs": {}} if lib == "timm" else None
    path = vqsuite.save_quantized(model, args.out, model_source=source)
    print(f"saved to {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from vqsuite.pipelines.io import read_checkpoint_meta

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqsuite", description="Low-bit quantization for diffusion and vision models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="quantize a real pretrained MobileNetV2 with every baseline preset")
    d.add_argument("--presets", help="comma-separated preset names (default: all baselines)")
    d.add_argument("--out", help="also save the last preset's model to this folder and reload it")
    d.set_defaults(fn=_cmd_demo)

    sub.add_parser("presets", help="list the named presets").set_defaults(fn=_cmd_presets)
    sub.add_parser("formats", help="list the number formats").set_defaults(fn=_cmd_formats)

    q = sub.add_parser("quantize", help="quantize a timm/torchvision model and save it")
    q.add_argument("--model", required=True, help="timm:<name> or torchvision:<name>")
    q.add_argument("--weights", help="local weights file (.safetensors, or .pt/.pth loaded with weights_only)")
    q.add_argument("--preset", default="w8a8", help="preset name (vqsuite presets)")
    q.add_argument("--exclude", action="append", help="fnmatch pattern of layers to keep in float (repeatable)")
    q.add_argument("--calib-batches", type=int, default=0, help="random calibration batches (static presets)")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--input-size", type=int, default=224)
    q.add_argument("--out", required=True, help="checkpoint folder to write")
    q.set_defaults(fn=_cmd_quantize)

    i = sub.add_parser("info", help="describe a saved quantized checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print the raw JSON")
    i.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from vqsuite.cli.models import CLIError
    from vqsuite.pipelines.io import CheckpointError

    try:
        return args.fn(args)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"vqsuite {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
