"""OFQ layer rules: QKR for Swin window attention (bias + shift mask as timm) and DeiT distilled (two 8-bit heads,
KD on (cls, dist)); CGA and the oscillation report cover their W_qk; other attention forms still fall back."""

from __future__ import annotations

import copy
import importlib
import logging

import pytest
import torch
from torch import nn

from vqsuite.finetune.lsq import LSQActQuantizer, LSQWeightQuantizer
from vqsuite.finetune.ofq import (
    CGA,
    QATAttention,
    QATWindowAttention,
    StatsQ,
    kd_loss,
    oscillation_report,
    prepare_qat,
    statsq_preround,
)

timm = pytest.importorskip("timm")
ofq_mod = importlib.import_module("vqsuite.finetune.ofq")  # ``vqsuite.finetune.ofq`` the attribute is the function

#: float64 QKR / explicit-bias path vs timm's float64 module (only summation order differs)
FLOAT64_ATOL = 1e-10
#: relative drop of the KD loss a short QAT run must reach (mean of the last 5 vs the first 5 steps)
LOSS_DROP = 0.8
#: CGA boundary for the freezing test: wide, so both sets are non-empty on a tiny model
WIDE_BOUNDARY = 0.05
#: the log line prepare_qat writes for an attention it cannot rebuild
FALLBACK_TEXT = "fall back to LSQ"

BITS = 4
STEPS, CGA_STEPS = 20, 5


def tiny_swin(seed: int = 0) -> nn.Module:
    """Two stages (16x16 then 8x8 tokens, window 4): both stages have shifted blocks with a window mask."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    return SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=10
    )


def tiny_deit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=24, depth=2,
        num_heads=2, num_classes=10,
    )  # fmt: skip


MODELS = {"swin": tiny_swin, "deit": tiny_deit}


def toy_data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes: channel 0, 1 or 2 brighter, or none (survives Swin's global average pool)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 3, 32, 32, generator=g)
    for c in range(3):
        x[y == c, c] += 1.0
    return x, y


def disable_quantizers(model: nn.Module) -> nn.Module:
    """Replace every weight/activation quantizer by ``Identity`` (the float path of the QAT modules)."""
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, (LSQActQuantizer, LSQWeightQuantizer, StatsQ)):
                setattr(m, name, nn.Identity())
    return model


def zero_qk_bias(attn: nn.Module) -> None:
    """QKR drops the q/k biases (official code); zero them in the float reference so the outputs must agree."""
    hd = attn.qkv.out_features // 3
    with torch.no_grad():
        attn.qkv.bias[: 2 * hd].zero_()


def shift_mask(dim: int = 24, res: int = 8, window: int = 4) -> torch.Tensor:
    """timm's SW-MSA mask ``[nW, N, N]`` (0 / -100) of a shifted block."""
    from timm.models.swin_transformer import SwinTransformerBlock

    blk = SwinTransformerBlock(dim, (res, res), num_heads=2, window_size=window, shift_size=window // 2)
    assert blk.attn_mask is not None and bool((blk.attn_mask == -100).any())
    return blk.attn_mask


def fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if FALLBACK_TEXT in r.getMessage()]


# ------------------------------------------------------------------------------------------ float equivalence
@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused-sdpa"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-shift", "shift-mask"])
@pytest.mark.parametrize("qkr", [True, False], ids=["qkr", "no-qkr"])
def test_window_attention_matches_timm_in_float(qkr, masked, fused):
    from timm.models.swin_transformer import WindowAttention

    torch.manual_seed(1)
    ref = WindowAttention(24, num_heads=3, window_size=4, qkv_bias=True).double().eval()
    ref.fused_attn = fused
    with torch.no_grad():
        ref.relative_position_bias_table.normal_(0, 0.5)  # large enough that a misplaced bias shows
        ref.qkv.bias.normal_(0, 0.3)
    if qkr:
        zero_qk_bias(ref)
    mask = shift_mask().double() if masked else None  # [4, 16, 16]
    x = torch.randn(2 * 4, 16, 24, dtype=torch.float64)  # [nW·B, N, C]
    qa = disable_quantizers(QATWindowAttention(ref, bits=BITS, qkr=qkr).double())
    assert qa.qkr == qkr and (hasattr(qa, "w_qk") == qkr)

    # logits: timm's explicit path (q·scale)·kᵀ + rel-pos bias (+ mask per window)
    qkv = ref.qkv(x).reshape(8, 16, 3, 3, 8).permute(2, 0, 3, 1, 4)
    want = (qkv[0] * ref.scale) @ qkv[1].transpose(-2, -1) + ref._get_rel_pos_bias()
    if masked:
        want = (want.view(-1, 4, 3, 16, 16) + mask.unsqueeze(1).unsqueeze(0)).view(-1, 3, 16, 16)
    logits, v = qa.logits_and_values(x)
    torch.testing.assert_close(qa.bias_logits(logits, mask), want, atol=FLOAT64_ATOL, rtol=0)
    torch.testing.assert_close(v, qkv[2], atol=FLOAT64_ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(qa(x, mask=mask), ref(x, mask=mask), atol=FLOAT64_ATOL, rtol=0)


def test_prepared_swin_matches_timm_in_float():
    """The whole model: blocks pass their shift masks to the QKR window attention and windows line up."""
    ref = tiny_swin().double().eval()
    for m in ref.modules():
        if type(m).__name__ == "WindowAttention":
            zero_qk_bias(m)
    qat = disable_quantizers(prepare_qat(copy.deepcopy(ref), BITS, "ofq")).eval()
    assert sum(isinstance(m, QATWindowAttention) for m in qat.modules()) == 4
    x = toy_data(4)[0].double()
    with torch.no_grad():
        torch.testing.assert_close(qat(x), ref(x), atol=FLOAT64_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ layer rules
def test_swin_gets_qkr_rule_not_fallback(caplog):
    caplog.set_level(logging.INFO, logger="vqsuite.finetune.ofq")
    swin = prepare_qat(tiny_swin(), 3, "ofq")
    assert fallback_lines(caplog) == []
    attns = [m for n, m in swin.named_modules() if n.endswith(".attn")]
    assert len(attns) == 4 and all(isinstance(a, QATWindowAttention) and a.qkr for a in attns)
    assert attns[1].w_qk.shape == (2, 24, 24) and attns[3].w_qk.shape == (4, 48, 48)
    assert isinstance(attns[0].qk_wq, StatsQ) and attns[0].qk_wq.bits == 3
    assert swin.patch_embed.proj.wq.bits == 8 and swin.head.fc.wq.bits == 8 and swin.head.fc.aq.bits == 8
    red = swin.layers[1].downsample.reduction
    assert isinstance(red.wq, StatsQ) and red.wq.bits == 3


def test_deit_gets_qkr_rule_and_8bit_heads(caplog):
    caplog.set_level(logging.INFO, logger="vqsuite.finetune.ofq")
    deit = prepare_qat(tiny_deit(), 2, "ofq")
    assert fallback_lines(caplog) == []
    assert all(isinstance(b.attn, QATAttention) and b.attn.qkr for b in deit.blocks)
    for head in (deit.head, deit.head_dist):
        assert isinstance(head.wq, LSQWeightQuantizer) and head.wq.bits == 8 and head.aq.bits == 8
    assert isinstance(deit.blocks[0].mlp.fc1.wq, StatsQ) and deit.blocks[0].mlp.fc1.wq.bits == 2


def test_swin_v2_window_attention_still_falls_back(caplog):
    """The registry is keyed by class: V2's same-named cosine-attention WindowAttention is not rebuilt."""
    from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2

    caplog.set_level(logging.INFO, logger="vqsuite.finetune.ofq")
    model = nn.Sequential()
    model.attn = WindowAttentionV2(24, window_size=(4, 4), num_heads=2)
    prepare_qat(model, 4, "ofq")
    assert len(fallback_lines(caplog)) == 1
    assert type(model.attn) is WindowAttentionV2 and type(model.attn.qkv.wq).__name__ == "LSQWeight"


# ------------------------------------------------------------------------------------------ CGA
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_cga_freezes_exactly_outside_boundary(arch):
    model = prepare_qat(MODELS[arch](), 2, "ofq")
    qk_cls = QATWindowAttention if arch == "swin" else QATAttention
    w_qks = {id(m.w_qk) for m in model.modules() if type(m) is qk_cls}
    assert w_qks
    cga = CGA(model, boundary=WIDE_BOUNDARY)
    assert w_qks <= {id(p) for p, _, _ in cga.params}, "every W_qk must be under CGA"
    x, y = toy_data(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    before = [p.detach().clone() for p, _, _ in cga.params]
    masks = [cga.mask_of(p, b, h) for p, b, h in cga.params]
    out = model(x)
    torch.nn.functional.cross_entropy(out if torch.is_tensor(out) else out[0], y).backward()
    frac = cga.mask_gradients()
    opt.step()
    cga.restore()
    moved_qk = 0
    for (p, bits, per_head), m, old in zip(cga.params, masks, before, strict=True):
        assert torch.equal(p.detach()[~m], old[~m]), "a weight outside the boundary changed"
        z = statsq_preround(old.reshape(-1, old.shape[-1]) if per_head else old, bits).reshape(old.shape)
        assert torch.equal(m, ((z - z.floor()) - 0.5).abs() <= WIDE_BOUNDARY)
        if id(p) in w_qks:
            assert per_head and 0 < int(m.sum()) < m.numel()
            moved_qk += int((p.detach()[m] != old[m]).sum())
    assert moved_qk > 0 and 0 < frac < 1


# ------------------------------------------------------------------------------------------ short QAT runs
def _check_run(model: nn.Module, qk_cls: type) -> None:
    hist = model.vqsuite_ofq["history"]
    losses = [h["loss"] for h in hist]
    assert len(losses) == STEPS + CGA_STEPS
    assert sum(losses[-5:]) < LOSS_DROP * sum(losses[:5])
    assert all(h["trainable_fraction"] < 1 for h in hist[STEPS:])
    rep = oscillation_report(model)
    qk_names = {n for n, m in model.named_modules() if type(m) is qk_cls}
    assert qk_names and {f"{n}.w_qk" for n in qk_names} <= set(rep)
    assert all(0 <= rep[f"{n}.w_qk"]["oscillating_fraction"] <= 1 for n in qk_names)
    assert not model.training


def test_ofq_on_tiny_swin(caplog):
    caplog.set_level(logging.INFO, logger="vqsuite.finetune.ofq")
    x, y = toy_data()
    out = ofq_mod.ofq(tiny_swin(), bits=BITS, train_data=(x, y), steps=STEPS, cga_steps=CGA_STEPS, batch_size=16,
                      lr=3e-3, cga_lr=1e-3, log_every=0)  # fmt: skip
    assert fallback_lines(caplog) == []
    _check_run(out, QATWindowAttention)
    assert out(x[:2]).shape == (2, 10)


def test_ofq_on_tiny_deit_distilled(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="vqsuite.finetune.ofq")
    seen: list[tuple[str, str]] = []

    def spy(logits, teacher_logits, labels, tau=1.0):
        seen.append((type(logits).__name__, type(teacher_logits).__name__))
        return kd_loss(logits, teacher_logits, labels, tau)

    monkeypatch.setattr(ofq_mod, "kd_loss", spy)
    x, y = toy_data()
    deit = tiny_deit()
    assert not deit.distilled_training
    out = ofq_mod.ofq(deit, bits=BITS, train_data=(x, y), steps=STEPS, cga_steps=CGA_STEPS, batch_size=16, lr=3e-3,
                      cga_lr=1e-3, log_every=0)  # fmt: skip
    assert fallback_lines(caplog) == []
    # trained on (cls, dist) from the student, the averaged logits from the eval-mode teacher
    assert seen == [("tuple", "Tensor")] * (STEPS + CGA_STEPS)
    _check_run(out, QATAttention)
    assert not out.distilled_training  # restored
    with torch.no_grad():
        assert out(x[:2]).shape == (2, 10)  # eval: the average of the two heads


def test_kd_loss_reads_cls_for_ce_and_dist_for_kl():
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(3, 4, 10).unbind(0)
    y = torch.tensor([0, 3, 9, 1])
    kl = torch.nn.functional.kl_div(dist.log_softmax(-1), teacher.softmax(-1), reduction="batchmean")
    torch.testing.assert_close(kd_loss((cls, dist), teacher, y), torch.nn.functional.cross_entropy(cls, y) + kl)
    # a (cls, dist) teacher is reduced to the average timm returns in eval mode
    torch.testing.assert_close(kd_loss((cls, dist), (teacher, -teacher), y), torch.nn.functional.cross_entropy(cls, y)
                               + torch.nn.functional.kl_div(dist.log_softmax(-1), torch.zeros_like(teacher).softmax(-1),
                                                            reduction="batchmean"))  # fmt: skip
