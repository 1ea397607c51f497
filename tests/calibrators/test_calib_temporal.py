"""Q-Diffusion's split shortcut and TFMQ-DM's finite-set calibration of the temporal information block."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vqsuite import quantize_model
from vqsuite.calibrators.split_shortcut import SplitConv2d, shortcut_splits, split_shortcuts
from vqsuite.calibrators.temporal import temporal_layer_names, with_temporal_calibration
from vqsuite.config import QuantSpec
from vqsuite.nn import QuantLayer
from vqsuite.nn.steps import current_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusers"))

#: splitting must cut the static W8A8 output error at least this much when the halves' ranges differ 50x
MIN_SPLIT_GAIN = 4.0
FLOAT_ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def halves(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(2, 32, 8, 8, generator=g), 50 * torch.randn(2, 32, 8, 8, generator=g)], dim=1)


@torch.no_grad()
def test_split_conv_is_exact_in_float_and_quantizes_halves_apart() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 48, 1)
    conv.weight[:, 32:] /= 50  # both halves contribute alike to the output, as in a trained decoder
    split = SplitConv2d(conv, 32)
    x = halves(0)
    torch.testing.assert_close(split(x), conv(x), atol=FLOAT_ATOL, rtol=FLOAT_ATOL)
    spec = QuantSpec(weight="int8", act="int8", act_mode="static")
    data = [halves(s) for s in range(2)]
    whole = quantize_model(nn.Sequential(conv), spec, calib_data=data)
    parts = quantize_model(nn.Sequential(SplitConv2d(conv, 32)), spec, calib_data=data)
    assert isinstance(parts[0].part1, QuantLayer) and isinstance(parts[0].part2, QuantLayer)
    assert float(parts[0].part2.act_scale) > 20 * float(parts[0].part1.act_scale)
    ref = conv(x)
    e_whole = float((whole(x) - ref).pow(2).mean() / ref.pow(2).mean())
    e_split = float((parts(x) - ref).pow(2).mean() / ref.pow(2).mean())
    assert e_split * MIN_SPLIT_GAIN < e_whole, f"relative MSE: split {e_split:.3e}, whole {e_whole:.3e}"
    with pytest.raises(ValueError, match="1x1"):
        SplitConv2d(nn.Conv2d(64, 8, 3), 32)


@torch.no_grad()
def test_split_shortcuts_on_a_unet() -> None:
    import tiny_pipelines as tp

    pipe = tp.sd15(64)
    unet = pipe.unet
    splits = shortcut_splits(unet)
    assert splits and all(".conv_shortcut" in n and n.startswith("up_blocks.") for n in splits)
    # C1 is the channel count of what the up block concatenates in front of the skip (its hidden_states for j=0)
    seen: dict[int, int] = {}

    def record(i: int):
        def hook(_m: nn.Module, _a: tuple, kw: dict) -> None:
            seen.setdefault(i, kw["hidden_states"].shape[1])

        return hook

    hooks = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(unet.up_blocks)]
    x = torch.randn(1, 4, 16, 16)
    enc = torch.randn(1, 16, 64)
    ref = unet(x, 500, encoder_hidden_states=enc).sample
    for h in hooks:
        h.remove()
    for name, c1 in splits.items():
        i, j = int(name.split(".")[1]), int(name.split(".")[3])
        if j == 0:
            assert c1 == seen[i], (name, c1, seen)
    assert split_shortcuts(unet) == list(splits)
    assert split_shortcuts(unet) == []  # idempotent
    torch.testing.assert_close(unet(x, 500, encoder_hidden_states=enc).sample, ref, atol=FLOAT_ATOL, rtol=FLOAT_ATOL)
    q = quantize_model(unet, "w8a8", freeze=False)
    assert all(isinstance(q.get_submodule(n).part1, QuantLayer) for n in splits)


def test_temporal_block_finite_set_calibration() -> None:
    """Time-embedding layers get one static scale per step, and each equals max|input| at that step / 127."""
    import tiny_pipelines as tp

    pipe = tp.sd15(64)
    names = temporal_layer_names(pipe.unet)
    assert "time_embedding.linear_1" in names and "time_embedding.linear_2" in names
    assert any(n.endswith("resnets.0.time_emb_proj") for n in names)
    cfg = with_temporal_calibration("w8a8", pipe.unet)
    pipe = tp.quantize("sd15", "w8a8", pipe=pipe, config=cfg, num_inference_steps=3)
    for n in names:
        layer = pipe.unet.get_submodule(n)
        assert isinstance(layer, QuantLayer) and layer.spec.act_granularity == "per_step", n
        assert layer.spec.n_buckets == 3 and bool(torch.isfinite(layer.act_scale_steps).all()), n
    # finite set: the layer input depends on t alone, so the calibrated scale is exact for every step
    layer = pipe.unet.get_submodule("time_embedding.linear_1")
    amax: dict[int, float] = {}

    def grab(m, a) -> None:
        step = current_step()
        amax[step.index] = max(amax.get(step.index, 0.0), float(a[0].abs().amax()))

    h = layer.register_forward_pre_hook(grab)
    try:
        tp.generate(pipe, "sd15", steps=3)
    finally:
        h.remove()
    assert sorted(amax) == [0, 1, 2]
    for i, a in amax.items():
        assert float(layer.act_scale_steps[i]) == pytest.approx(a / 127, rel=1e-6), i
