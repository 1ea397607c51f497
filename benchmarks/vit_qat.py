"""ViT quantization on ``fmnist-vit``: FP, PTQ (plain min-max vs PTQ4ViT / RepQ-ViT quantizers) and QAT (LSQ vs OFQ).

Prints one line per configuration (test top-1 on the first ``--n-test`` Fashion-MNIST test images, the
oscillating-weight fraction at the end of QAT, wall time) and writes them as JSON lines to ``--out``.
Runs on CPU with one thread by default; QAT budgets are tiny (``--steps`` updates of ``--batch`` images).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_qat.py --steps 100 --cga-steps 20 --n-test 2000
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import torch


def load_model(random_init: bool = False):
    if random_init:  # smoke test of the script before the trained weights exist
        from vqsuite.zoo.vit import build_fmnist_vit

        torch.manual_seed(0)
        return build_fmnist_vit(embed_dim=48, depth=2, num_heads=3).eval()
    from vqsuite import zoo

    try:
        return zoo.load("fmnist-vit").model
    except Exception:  # noqa: BLE001 - registry entry may not exist yet; the module loader is the same model
        from vqsuite.zoo.vit import load_fmnist_vit

        return load_fmnist_vit()


@torch.no_grad()
def top1(model, x, y, pre, batch: int = 250) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        out = model(pre(x[i : i + batch]))
        out = out[0] if isinstance(out, tuple) else out
        correct += int((out.argmax(-1) == y[i : i + batch]).sum())
    return 100.0 * correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cga-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--ptq", nargs="+", default=["vit-w8a8-minmax", "vit-w8a8-ptq", "vit-w4a4-minmax",
                                                  "vit-w4a4-ptq4vit", "vit-w4a4-repq", "vit-w4a4-ptq"])  # fmt: skip
    ap.add_argument("--skip-qat", action="store_true")
    ap.add_argument("--random-init", action="store_true", help="a small untrained ViT (smoke test only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="vit_qat.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from vqsuite import quantize_model
    from vqsuite.finetune import ofq
    from vqsuite.zoo.datasets import fashion_mnist
    from vqsuite.zoo.vit import vit_preprocess

    xt, yt = fashion_mnist("test")
    xt, yt = xt[: args.n_test], yt[: args.n_test]
    xtr, ytr = fashion_mnist("train")
    calib = vit_preprocess(xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[: args.n_calib]])
    fp = load_model(args.random_init)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    t = time.perf_counter()
    emit({"config": "FP32", "top1": top1(fp, xt, yt, vit_preprocess), "wall_s": time.perf_counter() - t})
    for preset in args.ptq:
        t = time.perf_counter()
        m = quantize_model(copy.deepcopy(fp), preset, calib_data=[calib], freeze=False)
        wall = time.perf_counter() - t
        emit({"config": f"PTQ {preset}", "top1": top1(m, xt, yt, vit_preprocess), "wall_s": wall})
    if args.skip_qat:
        return
    ckpt = Path(tempfile.mkdtemp()) / "ofq.pt"
    for bits in args.bits:
        for method in ("lsq", "ofq"):
            kw = dict(teacher=fp, steps=args.steps, cga_steps=args.cga_steps if method == "ofq" else 0, method=method,
                      preprocess=vit_preprocess, batch_size=args.batch, lr=args.lr, cga_lr=args.lr / 10, log_every=25,
                      checkpoint_path=ckpt)  # fmt: skip
            t = time.perf_counter()
            # OFQ is evaluated at the end of the main stage (StatsQ + QKR), then resumed for the CGA stage
            stages = [("", args.steps), (" +CGA", None)] if kw["cga_steps"] else [("", None)]
            for i, (tag, stop) in enumerate(stages):
                m = ofq(copy.deepcopy(fp), bits, (xtr, ytr), stop_after=stop, resume=i > 0, **kw)
                rep = m.vqsuite_ofq
                emit({
                    "config": f"QAT W{bits}A{bits} {method.upper()}{tag}",
                    "top1": top1(m, xt, yt, vit_preprocess),
                    "oscillating_fraction": rep["oscillation"]["total"]["oscillating_fraction"],
                    "flip_ema_mean": rep["oscillation"]["total"]["flip_ema_mean"],
                    "osc_ema_mean": rep["oscillation"]["total"]["osc_ema_mean"],
                    "final_loss": sum(h["loss"] for h in rep["history"][-10:]) / len(rep["history"][-10:]),
                    "steps": len(rep["history"]), "batch": args.batch, "wall_s": time.perf_counter() - t,
                })  # fmt: skip


if __name__ == "__main__":
    main()
