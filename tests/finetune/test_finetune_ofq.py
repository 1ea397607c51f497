"""OFQ: StatsQ levels/scale, QKR logits, CGA freezing, a short QAT run and exact checkpoint resume."""

from __future__ import annotations

import copy

import pytest
import torch

import vqsuite.finetune as ft
from vqsuite.finetune.ofq import CGA, QATAttention, oscillation_report, prepare_qat, statsq_preround

pytest.importorskip("timm")

#: float64 QKR vs unfused logits (float32 model)
QKR_ATOL = 1e-4
#: relative drop of the KD loss a short QAT run must reach (first 5 vs last 5 steps)
LOSS_DROP = 0.9


def tiny_vit(seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2, qkv_bias=True
    )


def toy_data(n: int = 96, seed: int = 0):
    """Three classes separated by the mean brightness of each image quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, :, :4, :4] += 1.5
    x[y == 1, :, 4:, 4:] += 1.5
    return x, y


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_statsq_levels_and_scale(bits):
    torch.manual_seed(bits)
    w = torch.randn(5, 40)
    q = ft.statsq_quantize(w, bits)
    s = 2 * w.abs().mean(1, keepdim=True)
    n = 2 ** (bits - 1)
    k = torch.arange(-n, n, dtype=torch.float32)
    levels = s * (k + 0.5) / n  # [5, 2^b]: mid-rise, no zero level
    for r in range(5):
        assert set(q[r].tolist()) <= set(levels[r].tolist())
    assert not bool((q == 0).any())
    codes = ft.statsq_codes(w, bits)
    assert codes.min() >= -n and codes.max() <= n - 1
    assert torch.equal(q, s * (codes + 0.5) / n)
    # a weight at +/- 10 s saturates to the outer levels
    w2 = w.clone()
    w2[:, 0], w2[:, 1] = 1e3, -1e3
    s2 = 2 * w2.abs().mean(1)
    q2 = ft.statsq_quantize(w2, bits)
    assert torch.equal(q2[:, 0], s2 * (n - 0.5) / n) and torch.equal(q2[:, 1], s2 * (-n + 0.5) / n)


def test_statsq_ste_gradient_is_identity():
    w = torch.randn(3, 8, requires_grad=True)
    ft.statsq_quantize(w, 2).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qkr_logits_equal_unfused_qk():
    vit = tiny_vit().double()
    attn = vit.blocks[0].attn
    # the q/k biases are dropped by QKR; zero them so the float logits must match exactly
    with torch.no_grad():
        attn.qkv.bias[: 2 * 16].zero_()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = (qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale
    qa = QATAttention(attn, bits=4, qkr=True).double()
    wqk = qa.w_qk  # un-quantized reparameterized weight
    got = torch.einsum("bnc,hce,bme->bhnm", x, wqk, x) * qa.scale
    torch.testing.assert_close(got, ref, atol=QKR_ATOL, rtol=0)
    # the module's own logits path with its weight and activation quantizers switched off
    qa.qk_wq, qa.k_q, qa.v_wq = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
    logits, v = qa.logits_and_values(x)
    torch.testing.assert_close(logits, ref, atol=QKR_ATOL, rtol=0)
    torch.testing.assert_close(v, qkv[2], atol=QKR_ATOL, rtol=0)
    assert qa.w_qk.shape == (2, 16, 16) and qa.v_weight.shape == (16, 16)
    assert not hasattr(qa, "qkv")


def test_cga_freezes_exactly_outside_boundary():
    vit = prepare_qat(tiny_vit(), 2, "ofq")
    x, y = toy_data(32)
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-2, weight_decay=0.05)
    cga = CGA(vit, boundary=0.05)  # wide boundary so both sets are non-empty on a tiny model
    assert any(p.ndim == 3 for p, _, _ in cga.params), "W_qk must be under CGA"
    before = [p.detach().clone() for p, _, _ in cga.params]
    masks = [cga.mask_of(p, b, h) for p, b, h in cga.params]
    torch.nn.functional.cross_entropy(vit(x), y).backward()
    frac = cga.mask_gradients()
    for (p, _, _), m in zip(cga.params, masks, strict=True):
        assert bool((p.grad[~m] == 0).all())
    opt.step()
    cga.restore()
    n_moved = 0
    for (p, bits, h), m, old in zip(cga.params, masks, before, strict=True):
        assert torch.equal(p.detach()[~m], old[~m]), "a weight outside the boundary changed"
        n_moved += int((p.detach()[m] != old[m]).sum())
        z = statsq_preround(old.reshape(-1, old.shape[-1]) if h else old, bits).reshape(old.shape)
        dist = ((z - z.floor()) - 0.5).abs()
        assert torch.equal(m, dist <= 0.05)
    assert n_moved > 0 and 0 < frac < 1


def test_prepare_qat_swaps_layers():
    vit = prepare_qat(tiny_vit(), 3, "ofq")
    assert isinstance(vit.blocks[0].attn, QATAttention) and vit.blocks[0].attn.qkr
    assert vit.patch_embed.proj.wq.bits == 8 and vit.head.wq.bits == 8
    assert vit.blocks[0].mlp.fc1.wq.bits == 3 and not vit.blocks[0].mlp.fc2.aq.signed
    lsq = prepare_qat(tiny_vit(), 3, "lsq")
    assert not lsq.blocks[0].attn.qkr and type(lsq.blocks[0].mlp.fc1.wq).__name__ == "LSQWeight"


@pytest.mark.parametrize("method", ["ofq", "lsq"])
def test_short_qat_lowers_loss(method):
    x, y = toy_data()
    vit = tiny_vit()
    cga = 10 if method == "ofq" else 0
    out = ft.ofq(vit, bits=4, train_data=(x, y), steps=60, cga_steps=cga, method=method, batch_size=32, lr=3e-3,
                 cga_lr=1e-3, log_every=0)  # fmt: skip
    losses = [h["loss"] for h in out.vqsuite_ofq["history"]]
    assert len(losses) == 60 + cga
    assert sum(losses[-5:]) < LOSS_DROP * sum(losses[:5])
    rep = oscillation_report(out)
    assert "total" in rep and 0 <= rep["total"]["oscillating_fraction"] <= 1
    if method == "ofq":
        assert any(k.endswith("w_qk") for k in rep)
        assert all(h["trainable_fraction"] < 1 for h in out.vqsuite_ofq["history"][60:])


def test_checkpoint_resume_is_exact(tmp_path):
    x, y = toy_data()
    kw = dict(bits=2, train_data=(x, y), steps=6, cga_steps=4, batch_size=16, lr=3e-3, log_every=0)
    ref = ft.ofq(tiny_vit(), **kw)
    teacher = tiny_vit()
    ck = tmp_path / "ofq.pt"
    ft.ofq(tiny_vit(), teacher=teacher, checkpoint_path=ck, stop_after=7, **kw)
    res = ft.ofq(tiny_vit(), teacher=copy.deepcopy(teacher), checkpoint_path=ck, resume=True, **kw)
    for (n, a), (_, b) in zip(ref.state_dict().items(), res.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in ref.vqsuite_ofq["history"]] == [h["loss"] for h in res.vqsuite_ofq["history"]]


def test_oscillation_tracker_counts_flips_and_reversals():
    from vqsuite.finetune.ofq import OscillationTracker

    tr = OscillationTracker((3,), momentum=0.5)
    # weight 0 oscillates 0 -> 1 -> 0; weight 1 climbs 0 -> 1 -> 2; weight 2 never moves
    for codes in ([0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0]):
        tr.update(torch.tensor(codes))
    assert tr.flip_ema.tolist() == [0.75, 0.75, 0.0]
    assert tr.osc_ema.tolist() == [0.5, 0.0, 0.0]
    assert tr.summary(threshold=0.5)["oscillating_fraction"] == pytest.approx(1 / 3)


def test_unsupported_attention_falls_back_to_lsq():
    vit = tiny_vit()
    vit.blocks[0].attn.relative_position_bias_table = torch.nn.Parameter(torch.zeros(1))  # a Swin-like attention
    prepare_qat(vit, 4, "ofq")
    attn = vit.blocks[0].attn
    assert not isinstance(attn, QATAttention)
    assert type(attn.qkv.wq).__name__ == "LSQWeight" and type(vit.blocks[0].mlp.fc1.wq).__name__ == "StatsQ"
