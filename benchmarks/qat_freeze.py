"""QAT frozen into packed checkpoints on the shipped ``fmnist-vit``: short OFQ / LSQ QAT, ``freeze_qat``, save, load.

For each ``method:bits`` it prints (and writes as JSON to ``--out``) top-1 on the first ``--n-test`` Fashion-MNIST
test images of the QAT model (eval), the frozen model (reference kernels, and ``auto``), the checkpoint loaded onto
a float model and loaded from its recorded zoo source; whether the logits are bit-identical; top-1 with the
attention's matmul quantizers (q/k operands, softmax output) replaced by identities; and bytes (FP32 model, frozen
model, its packed weight codes, the checkpoint file).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qat_freeze.py --steps 40 --n-test 2000 --runs ofq:4 lsq:4 ofq:2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from torch import nn

import vqsuite
from vqsuite import zoo
from vqsuite.finetune import freeze_qat, ofq
from vqsuite.nn import QuantLayer
from vqsuite.zoo.datasets import fashion_mnist


def logits(model: nn.Module, x: torch.Tensor, pre, batch: int = 250) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return torch.cat([model(pre(x[i : i + batch])) for i in range(0, len(x), batch)])


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float | None:
    err = float((ref - x).double().pow(2).sum())
    return None if err == 0 else round(10 * torch.log10(ref.double().pow(2).sum() / err).item(), 1)


def code_bytes(model: nn.Module) -> int:
    """Bytes of the packed weight codes alone (``qweight`` of every frozen layer)."""
    return sum(m.qweight.numel() * m.qweight.element_size() for m in model.modules() if isinstance(m, QuantLayer))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--runs", nargs="+", default=["ofq:4", "lsq:4", "ofq:2"], help="method:bits")
    p.add_argument("--out", default="qat_freeze.json")
    args = p.parse_args()
    torch.manual_seed(0)
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    xte, yte = xte[: args.n_test], yte[: args.n_test]

    def top1(lg: torch.Tensor) -> float:
        return round(100.0 * float((lg.argmax(-1) == yte).float().mean()), 2)

    zm = zoo.load("fmnist-vit")
    pre, fp_bytes = zm.preprocess, vqsuite.module_nbytes(zm.model)
    res: dict = {"fp32": {"top1": top1(logits(zm.model.eval(), xte, pre)), "bytes": fp_bytes}}
    print("fp32", res["fp32"], flush=True)
    for run in args.runs:
        method, bits = run.split(":")
        model = zoo.load("fmnist-vit").model
        t0 = time.perf_counter()
        ofq(model, int(bits), (xtr, ytr), steps=args.steps, batch_size=args.batch, method=method, preprocess=pre,
            log_every=0)  # fmt: skip
        train_s = time.perf_counter() - t0
        lq = logits(model, xte, pre)
        lr = logits(freeze_qat(copy.deepcopy(model), kernel="reference"), xte, pre)
        freeze_qat(model)  # kernel="auto"
        lf = logits(model, xte, pre)
        with tempfile.TemporaryDirectory() as d:
            src = {"library": "vqsuite.zoo", "name": "fmnist-vit"}
            path = vqsuite.save_quantized(model, os.path.join(d, "q"), model_source=src)
            file_bytes = os.path.getsize(os.path.join(path, "model.safetensors"))
            ll = logits(vqsuite.load_quantized(path, model=zoo.load("fmnist-vit").model.eval()), xte, pre)
            ls = logits(vqsuite.load_quantized(path), xte, pre)
        dropped = copy.deepcopy(model)
        for m in dropped.modules():
            for q in ("q_q", "k_q", "attn_q"):
                if isinstance(getattr(m, q, None), nn.Module):
                    setattr(m, q, nn.Identity())
        ld = logits(dropped, xte, pre)
        r = {
            "steps": args.steps, "train_s": round(train_s, 1), "formats": model.vqsuite_qat_frozen["formats"],
            "top1_qat": top1(lq), "top1_frozen_reference": top1(lr), "top1_frozen_auto": top1(lf),
            "top1_loaded": top1(ll), "top1_loaded_from_source": top1(ls),
            "frozen_reference_bit_exact": torch.equal(lq, lr), "frozen_auto_bit_exact": torch.equal(lq, lf),
            "frozen_auto_sqnr_db": sqnr_db(lq, lf),
            "frozen_auto_top1_agreement": round(100 * float((lq.argmax(-1) == lf.argmax(-1)).float().mean()), 2),
            "loaded_bit_exact": torch.equal(lf, ll), "loaded_from_source_bit_exact": torch.equal(lf, ls),
            "top1_without_matmul_quant": top1(ld), "without_matmul_quant_sqnr_db": sqnr_db(lf, ld),
            "bytes_fp32": fp_bytes, "bytes_frozen": vqsuite.module_nbytes(model), "bytes_codes": code_bytes(model),
            "bytes_file": file_bytes,
        }  # fmt: skip
        r["fp32_over_frozen"] = round(fp_bytes / r["bytes_frozen"], 2)
        res[run] = r
        print(run, r, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
