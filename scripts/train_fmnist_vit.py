"""Train ``fmnist-vit``: a timm VisionTransformer on Fashion-MNIST train (60k), fixed seed, CPU.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_fmnist_vit.py --epochs 2 --out vqsuite/zoo/weights/fmnist-vit

Writes ``model.safetensors`` (fp16) and ``train.json`` (config, wall time, steps, final loss, test top-1).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

logger = logging.getLogger("train_fmnist_vit")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("vqsuite/zoo/weights/fmnist-vit"))
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budget-min",
        type=float,
        default=0.0,
        help="wall-clock budget: after 10 steps, shorten the run (and its cosine schedule) to fit it",
    )
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from tqdm import tqdm

    from vqsuite.zoo.datasets import fashion_mnist
    from vqsuite.zoo.vit import build_fmnist_vit, vit_preprocess

    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    cfg = {"embed_dim": a.dim, "depth": a.depth, "num_heads": a.heads}
    model = build_fmnist_vit(**cfg)
    n = xtr.shape[0]
    steps_per_epoch = n // a.batch
    total = a.steps or int(math.ceil(a.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )  # reads ``total`` at each step, so a budget-shortened run still anneals to zero
    g = torch.Generator().manual_seed(a.seed)
    model.train()
    t0 = time.perf_counter()
    ema = None
    step = 0
    bar = tqdm(total=total, desc="fmnist-vit", mininterval=5)
    while step < total:
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * a.batch : (i + 1) * a.batch]
            x = xtr[idx]
            # light augmentation: random horizontal flip (clothes are left-right symmetric classes)
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(model(vit_preprocess(x)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(1)
            if step == 10 and a.budget_min > 0:
                fit = int(a.budget_min * 60 / ((time.perf_counter() - t0) / 10))
                if fit < total:
                    logger.info("budget %.1f min: %d steps instead of %d", a.budget_min, fit, total)
                    total = fit
                    bar.total = total
            if step % 50 == 0 or step == total:
                logger.info("step %d/%d loss %.4f (ema %.4f) %.1fs", step, total, loss.item(), ema,
                            time.perf_counter() - t0)  # fmt: skip
    bar.close()
    wall = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, xte.shape[0], 500):
            correct += (model(vit_preprocess(xte[i : i + 500])).argmax(-1) == yte[i : i + 500]).sum().item()
    top1 = correct / xte.shape[0]
    logger.info(
        "test top-1 %.4f (n=%d), wall %.0fs, %d steps, final loss ema %.4f", top1, xte.shape[0], wall, step, ema
    )
    if a.no_save:
        return
    from safetensors.torch import save_file

    a.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, a.out / "model.safetensors")
    rec = {"config": cfg, "seed": a.seed, "batch": a.batch, "lr": a.lr, "steps": step, "epochs": step / steps_per_epoch,
           "wall_s": round(wall, 1), "final_loss_ema": round(ema, 4), "test_top1": top1, "test_n": int(xte.shape[0]),
           "threads": a.threads, "budget_min": a.budget_min,
           "data": "Fashion-MNIST train 60k (Debian dataset-fashion-mnist)",
           "stored_dtype": "float16"}  # fmt: skip
    (a.out / "train.json").write_text(json.dumps(rec, indent=1) + "\n")
    logger.info("saved %s", a.out)


if __name__ == "__main__":
    main()
